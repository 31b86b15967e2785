"""heal: LoRA healing of the sparse model (config, trainer, plots, stage)."""
