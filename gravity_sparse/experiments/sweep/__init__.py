"""The quality-vs-density sweep (`gravity-sparse sweep`): config, runner, plot."""
