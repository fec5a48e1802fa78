"""``check``: the CI gate: configuration, rules, baselines."""
