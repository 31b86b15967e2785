"""apply: held-out loss of every solved pattern, unhealed (config, evaluation, stage)."""
