"""heal: a brief LoRA fine-tune of the sparse model, sparse attention active in forward and backward.

peft LoRA on every linear projection (explicit `target_modules`), the gravity masses trained too (they are
plain parameters, saved beside the adapter as `gravity_mass_log.safetensors` because peft saves only adapter
weights). Driven by transformers `Trainer`, so under `torchrun` / `accelerate launch` it trains with DDP
(Trainer's own; FSDP2 from an accelerate config, see `sharded`): `heal.batch_size` is the global batch,
split over the ranks, so the token budget and the number of steps do not depend on how many processes run;
every rank takes the early-stopping decision from rank 0's validation loss. Brief by design: a token budget
sets the number of steps; the heal split is divided into a train part and a validation part used for early
stopping (the best validation state is kept); the held-out text is only evaluated, before and after. LoRA
is merged into the weights at the end.

Defaults (rank 64, half next-token loss and half distillation from the dense model) are what healed the
tiny model best at a fixed token budget (benchmarks/results/*-tiny-heal-cpu.md): distillation alone and
rank 16 both healed less. On CPU the sparse attention runs in the chunked kernel with a hand-written
backward, on CUDA in the Triton kernels (`heal.kernel`, resolved by `kernels.resolve_backend`).
"""

from __future__ import annotations

import copy
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.nn import functional as F
from tqdm import tqdm
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from gravity_sparse import dist
from gravity_sparse.errors import UserError
from gravity_sparse.model.data import BlockDataset, encode_text, eval_loss, resolve_text
from gravity_sparse.stages.s4_heal.config import HealConfig
from gravity_sparse.stages.s4_heal.sharded import (
    OwnGpuArguments,
    gather_full,
    is_sharded,
    root_window_loss,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) in nats per token, averaged over tokens (computed in fp32)."""
    log_s = F.log_softmax(student_logits.float(), -1)
    log_t = F.log_softmax(teacher_logits.float(), -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


class KeepBest(TrainerCallback):
    """Early stopping on the validation loss that keeps the best trainable state (LoRA + masses).

    Under a launcher every rank calls `on_evaluate` with the (gathered) validation loss; each takes rank 0's
    value, so all ranks keep the same state and stop at the same step.
    """

    def __init__(self, model: torch.nn.Module, patience: int):
        self.model, self.patience = model, patience
        self.best = math.inf
        self.best_step = 0
        self.bad = 0
        self.state: dict[str, torch.Tensor] | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return control
        loss = dist.broadcast(float(loss))  # one decision for every rank
        if loss < self.best - 1e-5:
            self.best, self.best_step, self.bad = loss, state.global_step, 0
            self.state = {
                n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
            }
        else:
            self.bad += 1
            if self.bad >= self.patience:
                control.should_training_stop = True
        return control

    def restore(self) -> None:
        if self.state is None:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in self.state.items():
                params[n].copy_(t)


@contextmanager
def dense_teacher(model: torch.nn.Module, masses: list[torch.Tensor]):
    """The original dense model, borrowed from the sparse one being healed: adapters off, block/head
    masks detached, the masses set back to their values before healing; all restored after. An attached
    kernel stays (the CPU and Triton kernels run dense attention when the layer has no masks).

    The masses are swapped only while each attention layer runs (forward hooks): under FSDP the layer's
    parameter is a shard between forwards and the whole tensor only inside them.
    """
    layers = model.get_base_model().gravity_layers()
    saved = [(a.gravity_head_keep, a.gravity_block_mask) for a in layers]
    held: dict[int, torch.Tensor] = {}

    def swap_in(module, args, mass):
        held[id(module)] = module.gravity_mass_log.data
        module.gravity_mass_log.data = mass.to(held[id(module)].device)

    def swap_out(module, args, output):
        module.gravity_mass_log.data = held.pop(id(module))

    hooks = []
    try:
        with model.disable_adapter():
            for a, m in zip(layers, masses, strict=True):
                a.set_sparsity(None, None)
                hooks.append(
                    a.register_forward_pre_hook(lambda mod, args, m=m: swap_in(mod, args, m))
                )
                hooks.append(a.register_forward_hook(swap_out, always_call=True))
            yield model
    finally:
        for hook in hooks:
            hook.remove()
        for a, (hk, bm) in zip(layers, saved, strict=True):
            a.set_sparsity(hk, bm)


class HealTrainer(Trainer):
    """Trainer whose training loss mixes next-token loss with self-distillation from the dense model.

    loss = (1 − d) · CE(student) + d · KL(teacher ‖ student), per token, teacher = the dense model before
    healing. Evaluation keeps the plain next-token loss, so early stopping watches what is reported.

    With `val_ids`, validation is the mean next-token loss per token over the windows of `val_ids`
    (`data.eval_loss`), each rank scoring its share: the same number in any number of processes. (The
    Trainer's own evaluation averages per-batch means and, under DDP, pads a rank's last batch with repeated
    windows, so its number moves with the world size, and so would early stopping.)
    """

    def __init__(
        self,
        *args,
        distill: float = 0.0,
        val_ids: torch.Tensor | None = None,
        seq_len: int = 0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.distill = distill
        self.val_ids, self.seq_len = val_ids, seq_len
        # the loss is a per-batch mean: the Trainer must neither pass num_items_in_batch nor rescale it by
        # the number of processes (DDP averages the ranks' gradients, which is the global mean)
        self.model_accepts_loss_kwargs = False
        self.masses = [
            a.gravity_mass_log.detach().clone()
            for a in self.model.get_base_model().gravity_layers()
        ]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss
        if self.distill > 0.0 and model.training:
            peft_model = self.accelerator.unwrap_model(model)  # DDP hides peft's methods
            with torch.no_grad(), dense_teacher(peft_model, self.masses):
                teacher = model(input_ids=inputs["input_ids"]).logits.float()
            kl = kl_to_teacher(outputs.logits, teacher)
            loss = (1.0 - self.distill) * loss + self.distill * kl
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self.val_ids is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        batch = self.args.per_device_eval_batch_size
        if is_sharded(self):  # only the root's forward unshards the parameters
            loss = root_window_loss(self.model, self.val_ids, self.seq_len, batch)
        else:
            model = self.accelerator.unwrap_model(self.model).get_base_model()  # LoRA inside
            loss = eval_loss(model, self.val_ids, self.seq_len, batch, data_parallel=True)[0]
        metrics = {f"{metric_key_prefix}_loss": loss}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics


class ProgressBar(TrainerCallback):
    """A tqdm bar on stderr with the latest train and validation loss."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(
            total=state.max_steps,
            desc="heal",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not dist.is_main(),
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if getattr(self, "bar", None) is None:  # the evaluation before training logs too
            return
        shown = {k: round(v, 4) for k, v in (logs or {}).items() if k in ("loss", "eval_loss")}
        if shown:
            self.bar.set_postfix(shown)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def split_heal_text(
    ids: torch.Tensor, val_fraction: float, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation token streams: the last `val_fraction` of the heal text validates."""
    cut = int(ids.numel() * (1.0 - val_fraction))
    train, val = ids[:cut], ids[cut:]
    if train.numel() < seq_len + 1 or val.numel() < seq_len + 1:
        raise UserError(
            f"heal text of {ids.numel()} tokens is too short for seq_len {seq_len} "
            f"with a {val_fraction:.0%} validation part"
        )
    return train, val


def heal_model(
    model: torch.nn.Module, tokenizer: Any, cfg: HealConfig, scratch: Path, seed: int = 0
) -> tuple[Any, dict[str, Any]]:
    """LoRA-heal `model` (masks already attached) on `cfg.text` through the model's `tokenizer`.

    Returns (peft model, unmerged; a record of training). Under FSDP the peft model is a plain copy
    with the trained state on rank 0, and None on the other ranks.
    """
    from peft import LoraConfig, get_peft_model

    ids = encode_text(tokenizer, resolve_text(cfg.text))
    train_ids, val_ids = split_heal_text(ids, cfg.val_fraction, cfg.seq_len)
    train_set, val_set = BlockDataset(train_ids, cfg.seq_len), BlockDataset(val_ids, cfg.seq_len)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    if cfg.train_masses:
        for attn in model.gravity_layers():
            attn.gravity_mass_log.requires_grad_(True)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    world = dist.world_size()
    if cfg.batch_size % world:
        raise UserError(
            f"heal.batch_size {cfg.batch_size} is the global batch: it must be divisible by the "
            f"{world} processes"
        )
    on_cpu = next(model.parameters()).device.type == "cpu"
    arguments = OwnGpuArguments if dist.is_alone() and not on_cpu else TrainingArguments
    args = arguments(
        output_dir=str(scratch),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size // world,
        per_device_eval_batch_size=cfg.eval_batch_size,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(cfg.warmup_fraction * cfg.max_steps)),
        weight_decay=0.0,
        eval_strategy="steps",
        eval_steps=cfg.eval_every,
        # the unhealed state is the first candidate: healing that never beats it on validation changes
        # nothing. Evaluated by the Trainer at step 0, not by trainer.evaluate() before train(): that
        # marks the model prepared for evaluation, and accelerate then never wraps it in DDP (each rank
        # would train alone, silently)
        eval_on_start=True,
        logging_steps=max(1, min(cfg.eval_every, 5)),
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,  # its bars and log dicts go to stdout; ours goes to stderr
        use_cpu=on_cpu,  # CPU ranks: gloo DDP (without it accelerate sees one process)
        # a layer whose query heads are all dropped leaves its LoRA weights without a gradient
        ddp_find_unused_parameters=any(
            a.gravity_head_keep is not None and not bool(a.gravity_head_keep.any())
            for a in model.gravity_layers()
        ),
    )
    keep = KeepBest(peft_model, cfg.patience)
    trainer = HealTrainer(
        model=peft_model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        callbacks=[keep, ProgressBar()],
        distill=cfg.distill,
        val_ids=val_ids,
        seq_len=cfg.seq_len,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
    sharded = is_sharded(trainer)
    # FSDP shards the model in place: rank 0 keeps a plain copy to load the trained state into
    plain = copy.deepcopy(peft_model) if sharded and dist.is_main() else None
    trainer.train()
    final_val = dist.broadcast(float(trainer.evaluate()["eval_loss"]))
    if final_val > keep.best:
        keep.restore()
    if sharded:
        peft_model = gather_full(trainer, plain)
    record = {
        "steps_run": trainer.state.global_step,
        "max_steps": cfg.max_steps,
        "tokens_seen": trainer.state.global_step * cfg.batch_size * cfg.seq_len,
        "world_size": world,
        "per_device_batch_size": cfg.batch_size // world,
        "fsdp": sharded,
        "trained_as": type(trainer.model_wrapped).__name__,  # DDP, FSDP2 module, or the peft model
        "trainable_parameters": trainable,
        "best_val_loss": min(keep.best, final_val),
        "best_step": keep.best_step if keep.best <= final_val else trainer.state.global_step,
        "stopped_early": trainer.state.global_step < cfg.max_steps,
        "log_history": trainer.state.log_history,
    }
    return peft_model, record


def save_adapter(peft_model: Any, out: Path) -> None:
    """The LoRA adapter (peft format) and the trained masses beside it."""
    peft_model.save_pretrained(out)
    base = peft_model.get_base_model()
    masses = {
        f"model.layers.{i}.self_attn.gravity_mass_log": a.gravity_mass_log.detach()
        .cpu()
        .contiguous()
        for i, a in enumerate(base.gravity_layers())
    }
    save_file(masses, out / "gravity_mass_log.safetensors")


def held_out_loss(
    model: torch.nn.Module, tokenizer: Any, cfg: HealConfig, data_parallel: bool = False
) -> float:
    """Loss (nats per token of the model's tokenizer) on `cfg.eval_text`; `data_parallel`: every rank
    calls it and scores its share of the windows."""
    ids = encode_text(tokenizer, resolve_text(cfg.eval_text))
    return eval_loss(
        model,
        ids,
        cfg.seq_len,
        cfg.eval_batch_size,
        cfg.eval_max_tokens,
        data_parallel=data_parallel,
    )[0]


def write_record(record: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
