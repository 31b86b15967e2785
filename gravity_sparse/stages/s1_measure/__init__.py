"""measure: the locality field of every head (config, field math, model driver, plots, stage)."""
