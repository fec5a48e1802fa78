"""Folding BN into its linear neighbour: plan (pattern -> check with a reason), layout tracing, rewrite."""
