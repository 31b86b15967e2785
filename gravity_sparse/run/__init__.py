"""The run machinery: typed configs (YAML + overrides), the pipeline config, stage folders with meta.json
and cache keys (artifacts), and the runner that runs stages in order, skipping current ones."""
