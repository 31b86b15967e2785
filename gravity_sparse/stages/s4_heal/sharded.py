"""heal across processes: what changes when the model is wrapped (DDP) or sharded (FSDP2).

- `OwnGpuArguments`: a rank that trains by itself inside a launched group (a sweep's point) keeps its own
  GPU (transformers would take cuda:0 and DataParallel over every GPU for what it sees as one process).
- FSDP (an accelerate config with `fsdp_version: 2`; the Trainer applies peft's wrapping policy, which
  puts the LoRA layers in units of their own): between forwards every parameter is a shard, the whole
  tensor exists only inside the forward of its unit, and each forward is a collective. So validation runs
  through the root module with the same number of forwards on every rank (`root_window_loss`), and at the
  end the full state is gathered into a plain copy of the peft model on rank 0 (`gather_full`), which is
  what is saved and merged.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import torch
from torch.nn import functional as F
from transformers import TrainingArguments

from gravity_sparse import dist
from gravity_sparse.errors import UserError
from gravity_sparse.model.data import iter_batches, token_blocks


class OwnGpuArguments(TrainingArguments):
    """TrainingArguments of a rank that trains by itself (`dist.alone`: a sweep's point) on a node of GPUs.

    A Trainer that sees one process takes cuda:0 and wraps the model in DataParallel over every GPU; this
    one keeps the rank's own GPU (the current device) and one GPU per process.
    """

    @cached_property
    def _setup_devices(self) -> torch.device:
        own = torch.cuda.current_device()
        TrainingArguments._setup_devices.func(self)
        torch.cuda.set_device(own)
        self._n_gpu = 1
        return torch.device("cuda", own)


def is_sharded(trainer: Any) -> bool:
    """True when the Trainer shards the model with FSDP; FSDP1 is refused (one line)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return False
    version = getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise UserError(
            f"heal under FSDP needs fsdp_version: 2 in the accelerate config (got {version}): "
            "the trainable masses sit beside frozen weights, which FSDP2 shards per parameter"
        )
    return True


@torch.no_grad()
def root_window_loss(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, batch: int) -> float:
    """Mean next-token loss per token over the windows of `ids`, through the (sharded) root module.

    Each rank scores its share of the batches, and every rank runs the same number of forwards (a rank
    with fewer repeats one and discards it), because each forward of a sharded model is a collective.
    """
    blocks = token_blocks(ids, seq_len)
    batches = list(iter_batches(blocks, batch))
    mine = dist.share(len(batches))
    rounds = math.ceil(len(batches) / dist.world_size())
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for r in range(rounds):
        index = mine.start + r if r < len(mine) else 0
        window = batches[index].to(device)
        logits = model(input_ids=window[:, :-1]).logits
        if r < len(mine):
            total += float(
                F.cross_entropy(logits.float().transpose(1, 2), window[:, 1:], reduction="sum")
            )
    model.train(was_training)
    return dist.sum_float(total) / (blocks.shape[0] * seq_len)


def gather_full(trainer: Any, plain: torch.nn.Module | None) -> torch.nn.Module | None:
    """The full (unsharded) trained state, loaded into `plain` (rank 0's unsharded copy of the peft model,
    None on the others); every rank must call it. Returns `plain`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(trainer.model, options=options)
    if plain is not None:
        device = next(plain.parameters()).device
        plain.load_state_dict({k: v.to(device) for k, v in full.items()})
    return plain
