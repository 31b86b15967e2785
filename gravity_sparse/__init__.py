"""gravity_sparse: structured sparsity for gravity-attention language models.

measure (locality field) → solve (QUBO + simulated annealing) → apply (block-sparse kernel) → heal (LoRA)
→ export (pruned checkpoint) → bench → report.
"""

import os

# Nothing is ever fetched from a hub: set before transformers is imported anywhere in the package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# `kernels` is loaded with the package: a sparse model on CUDA finds its kernels in the process (the
# modeling file ships inside checkpoints and never imports gravity_sparse itself)
from gravity_sparse import kernels  # noqa: E402, F401
from gravity_sparse.errors import UserError  # noqa: E402
from gravity_sparse.model.configuration_gravity import GravityConfig  # noqa: E402
from gravity_sparse.model.io import DEFAULT_MODEL, load_model, save_model  # noqa: E402
from gravity_sparse.model.modeling_gravity import GravityForCausalLM  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "GravityConfig",
    "GravityForCausalLM",
    "UserError",
    "__version__",
    "load_model",
    "save_model",
]
