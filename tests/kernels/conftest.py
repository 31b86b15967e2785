"""Kernel tests: run the Triton kernels through the interpreter when there is no GPU.

Triton decides between interpreting and compiling when a function is decorated with `triton.jit`, its own
`tl.sum`/`tl.max` included, so TRITON_INTERPRET=1 must be set before Triton is first imported. torch
imports Triton on its own (through transformers, from the root conftest) before this file runs, so the
already-imported Triton modules are dropped here and imported afresh by the kernels, which import Triton
lazily. On a CUDA machine the kernels run natively and nothing is changed.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for name in list(sys.modules):
        # the compiled extension (triton._C) cannot be loaded twice; it holds no decorated functions
        if name.startswith("triton._C"):
            continue
        if name == "triton" or name.startswith(("triton.", "gravity_sparse.kernels.triton")):
            del sys.modules[name]
    for name in ("gravity_sparse.kernels.ops",):
        sys.modules.pop(name, None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
