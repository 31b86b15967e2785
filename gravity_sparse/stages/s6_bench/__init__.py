"""bench: dense vs sparse whole-model throughput through one backend (config, timing, stage)."""
