"""Batch statistics: instrument the graph, accumulate moments on the host, summarise, shard files."""
