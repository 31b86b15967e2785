"""export: the pruned checkpoint and its parity checks (config, pruning, plain-transformers parity, stage)."""
