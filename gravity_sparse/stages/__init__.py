"""The pipeline's stages, one subpackage each, numbered in pipeline order: s1_measure … s7_report.

Every stage has a light `config.py` (its section of the pipeline config), a `stage.py` with `inputs(cfg)`
(what it reads, hashed into its cache key) and `run(cfg) -> Path` (its finished folder), the math in modules
of its own, and its plots apart. `gravity_sparse.run.runner` runs them; `common` holds what they share.
"""

STAGES = ("measure", "solve", "apply", "heal", "export", "bench", "report")
# the subpackage of each stage is numbered like its run folder (s1_measure ↔ RUN/01_measure), so that
# the tree lists the stages in pipeline order
PACKAGES = {stage: f"s{i}_{stage}" for i, stage in enumerate(STAGES, start=1)}
