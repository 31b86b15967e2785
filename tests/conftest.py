"""Shared fixtures: tiny gravity models built in-process, so tests run offline in seconds."""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton decides whether to interpret when a kernel is decorated, and torch imports Triton early: without a
# GPU, the Triton kernels run under its CPU interpreter (set before anything imports torch).
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from gravity_sparse.model.modeling_gravity import GravityForCausalLM  # noqa: E402


@pytest.fixture
def model() -> GravityForCausalLM:
    return tiny_model()
