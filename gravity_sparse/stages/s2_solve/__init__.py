"""solve: QUBO keep/drop decisions at a budget (config, field file, solve_field, plots, stage)."""
