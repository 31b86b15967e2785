"""The pipeline's stages, one subpackage each, in pipeline order.

Every stage has a light `config.py` (its section of the pipeline config), a `stage.py` with `inputs(cfg)`
(what it reads, hashed into its cache key) and `run(cfg) -> Path` (its finished folder), the math in modules
of its own, and its plots apart. `gravity_sparse.run.runner` runs them; `common` holds what they share.
"""

STAGES = ("measure", "solve", "apply", "heal", "export", "bench", "report")
