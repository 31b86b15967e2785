"""Names and limits that configs check against, without importing the QUBO numerics (dimod, scipy).

One registry of mask methods: the QUBO's and the baselines'. A masks file stores its method in its
metadata (`method`); `method_label` turns that into the name that configs, tables and plots use.
"""

from __future__ import annotations

QUBO = "qubo"  # the label of the QUBO's masks in configs (`masks: qubo`) and tables
QUBO_METHOD = "qubo-sa"  # the method stored in masks.safetensors (simulated annealing)
BASELINES = ("greedy", "window", "random", "uniform")  # at the same budget as the QUBO
METHODS = (QUBO, *BASELINES)
# row cost of a window structure (solve.structure_cost) for kept share k: −log k, 1 − k, (1 − k)²
STRUCTURE_COSTS = ("kl", "mass", "sq")
STRUCTURE_SINKS = (
    "always",
    "choose",
)  # a window structure keeps the sink column always, or may drop it
# what a structure's row cost is computed on: per query from the distance profile, or per query block
# from the measured block field (solve.structure_rows)
STRUCTURE_ROWS = ("profile", "field")
BRUTE_FORCE_MAX = 20  # exact checks enumerate at most 2^20 states per subproblem


def method_label(stored: str) -> str:
    """The label of a masks file's stored method: 'qubo-sa' (any 'qubo…') -> 'qubo', a baseline -> itself."""
    return QUBO if stored.startswith(QUBO) else stored


def masks_file_name(label: str) -> str:
    """Where solve writes the masks of a method: masks.safetensors (QUBO), masks_<baseline>.safetensors."""
    return "masks.safetensors" if label == QUBO else f"masks_{label}.safetensors"
