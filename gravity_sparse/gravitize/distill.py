"""End-to-end LoRA distillation of a gravitized model from its original dot-product model.

After the layer-wise transfer, every layer reproduces its own original attention output approximately, but
the errors add up through the depth. A brief LoRA fine-tune (peft, transformers' Trainer) with the original
model as teacher closes the gap: loss = (1 − d) · CE + d · KL(teacher ‖ student) per token. The masses train
too. The adapter is merged at the end, so the result is a plain gravity model.

Resumable: the Trainer checkpoints (adapter, optimizer, scheduler, RNG, data position) at every
evaluation into `scratch`, and `SaveExtras` adds what peft does not save (the masses) and the best state
so far. A checkpoint is complete only once that file is there; a rerun resumes from the latest complete
one and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import UserError
from ..model.data import BlockDataset
from ..stages.s4_heal.heal import KeepBest, kl_to_teacher

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXTRAS = "gravity_distill.safetensors"  # written last into a checkpoint: marks it complete


def _extra_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters that peft's adapter checkpoint does not hold (the masses)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}


class SaveExtras(TrainerCallback):
    """After each Trainer checkpoint: the masses and KeepBest's best state, atomically, in its folder."""

    def __init__(self, model: torch.nn.Module, keep: KeepBest):
        self.model, self.keep = model, keep

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        tensors = {f"current.{n}": p.detach().cpu() for n, p in _extra_params(self.model).items()}
        for n, t in (self.keep.state or {}).items():
            tensors[f"best.{n}"] = t.detach().cpu()
        meta = {"best": json.dumps(self.keep.best), "best_step": str(self.keep.best_step)}
        tmp = ckpt / (EXTRAS + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, ckpt / EXTRAS)
        return control


def latest_checkpoint(scratch: Path) -> Path | None:
    """The newest checkpoint folder in `scratch` that is complete (has the extras file)."""
    done = [c for c in scratch.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if (c / EXTRAS).is_file()]
    return max(done, key=lambda c: int(c.name.rsplit("-", 1)[1]), default=None)


def _load_extras(ckpt: Path, model: torch.nn.Module, keep: KeepBest) -> None:
    with safe_open(str(ckpt / EXTRAS), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    params = _extra_params(model)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"current.{n}"])
    best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
    keep.state = best or None
    keep.best, keep.best_step = json.loads(meta["best"]), int(meta["best_step"])


class DistillTrainer(Trainer):
    """Trainer whose loss mixes next-token CE with the KL to a frozen teacher model."""

    def __init__(self, *args, teacher: torch.nn.Module, distill: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.distill = teacher, distill

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss
        if self.distill > 0.0 and model.training:
            with torch.no_grad():
                teacher = self.teacher(input_ids=inputs["input_ids"]).logits
            loss = (1.0 - self.distill) * loss + self.distill * kl_to_teacher(
                outputs.logits, teacher
            )
        return (loss, outputs) if return_outputs else loss


def distill_model(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    *,
    seq_len: int,
    steps: int,
    batch_size: int,
    lr: float,
    lora_r: int,
    distill: float,
    scratch: Path,
    seed: int = 0,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """LoRA-distil `student` from `teacher`; returns (merged student, record)."""
    from peft import LoraConfig, get_peft_model

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(
        r=lora_r,
        lora_alpha=2 * lora_r,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    set_seed(seed)  # LoRA's A matrices are drawn here: the same on a rerun
    peft_model = get_peft_model(student, lora)
    for attn in student.gravity_layers():
        attn.gravity_mass_log.requires_grad_(True)
    args = TrainingArguments(
        output_dir=str(scratch),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        eval_strategy="steps",
        eval_steps=max(1, steps // 5),
        logging_steps=max(1, steps // 20),
        save_strategy="steps",
        save_steps=max(1, steps // 5),
        save_total_limit=2,  # the previous complete checkpoint survives while the next is written
        report_to=[],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    keep = KeepBest(peft_model, patience=steps + 1)  # keeps the best state, never stops early
    trainer = DistillTrainer(
        model=peft_model,
        args=args,
        train_dataset=BlockDataset(train_ids, seq_len),
        eval_dataset=BlockDataset(val_ids, seq_len),
        callbacks=[keep, SaveExtras(peft_model, keep)],
        teacher=teacher,
        distill=distill,
    )
    resume = latest_checkpoint(scratch)
    if resume is None:
        keep.on_evaluate(args, trainer.state, trainer.control, metrics=trainer.evaluate())
    else:
        _load_extras(resume, peft_model, keep)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    keep.on_evaluate(args, trainer.state, trainer.control, metrics=trainer.evaluate())
    keep.restore()
    merged = peft_model.merge_and_unload().eval()
    record = {
        "steps": trainer.state.global_step,
        "resumed_from_step": int(resume.name.rsplit("-", 1)[1]) if resume else 0,
        "best_val_loss": keep.best,
        "log_history": trainer.state.log_history,
    }
    return merged, record


def repeat_windows(
    ids: torch.Tensor, seq_len: int, count: int, *, seed: int = 0, min_span: int = 8
) -> torch.Tensor:
    """A token stream of `count` windows of `seq_len` tokens that each repeat a span of the text.

    Window = [A][B][A][C]: A is a span of `min_span`..seq_len/4 tokens of `ids` at a random offset, B a
    gap of 0..(seq_len − 2|A|) tokens of other text, C the text that follows B. Natural text repeats itself
    too rarely for a distillation on it to teach copying from context (induction): gravity-smol, distilled
    on plain text of 256 tokens, copies 1–3 % of a repeated segment where its teacher copies 87 %. On these
    windows the teacher's distribution over the second A is the copy, which the KL then asks for (on
    gravity-smol, 100 LoRA steps of them at 2,048 tokens did not bring copying back:
    benchmarks/results/2026-12-07-retrieval-check-smol-2k-cpu.md). Windows are back to back, so
    `BlockDataset(stream, seq_len)` sees exactly them.
    """
    if seq_len < 4 * min_span or ids.numel() < 2 * seq_len:
        raise UserError(
            f"repeats need seq_len ≥ {4 * min_span} and a text of at least {2 * seq_len} tokens"
        )
    gen = torch.Generator().manual_seed(seed)

    def draw(high: int) -> int:
        return int(torch.randint(0, max(high, 1), (1,), generator=gen))

    out = torch.empty(count, seq_len, dtype=ids.dtype)
    for i in range(count):
        span = min_span + draw(seq_len // 4 - min_span + 1)
        gap = draw(seq_len - 2 * span + 1)
        a = draw(ids.numel() - span)
        b = draw(ids.numel() - seq_len)
        piece = ids[a : a + span]
        rest = ids[b : b + seq_len - 2 * span]
        out[i] = torch.cat([piece, rest[:gap], piece, rest[gap:]])
    return out.reshape(-1)


@torch.no_grad()
def teacher_text(
    teacher: torch.nn.Module,
    tokenizer,
    tokens: int,
    *,
    seed: int = 0,
    batch_size: int = 32,
    question_tokens: int = 48,
    answer_tokens: int = 160,
    progress: bool = True,
) -> torch.Tensor:
    """A token stream of at least `tokens` conversations sampled from the teacher (temperature 1, top-p
    0.95): it writes a user question after the chat template's opened user turn, then the answer to it,
    each ending at the end-of-turn token. Distilling on the model's own instruct distribution keeps
    gravity-smol an instruct model; a tokenizer without a chat template gets free text from BOS/newline."""
    from tqdm.auto import tqdm

    set_seed(seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        opened = tokenizer.apply_chat_template(
            [{"role": "user", "content": "\x00"}], tokenize=False
        )
        prefix = tokenizer(opened.split("\x00")[0], add_special_tokens=False)["input_ids"]
    else:
        prefix = (
            [tokenizer.bos_token_id]
            if tokenizer.bos_token_id is not None
            else tokenizer("\n")["input_ids"]
        )
    # stop on the tokenizer's end of turn, the token the stream is cut at
    sample = dict(do_sample=True, temperature=1.0, top_p=0.95, pad_token_id=pad, eos_token_id=eos)
    stream: list[torch.Tensor] = []
    total = 0
    bar = tqdm(total=tokens, desc="teacher text", disable=not progress, unit="tok")
    side = tokenizer.padding_side
    try:
        while total < tokens:
            ids = torch.tensor([prefix] * batch_size)
            first = teacher.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=question_tokens if chat else answer_tokens,
                **sample,
            )
            if chat:
                questions = tokenizer.batch_decode(
                    first[:, len(prefix) :], skip_special_tokens=True
                )
                convs = [[{"role": "user", "content": q.strip()}] for q in questions if q.strip()]
                tokenizer.padding_side = "left"
                batch = tokenizer.apply_chat_template(
                    convs,
                    add_generation_prompt=True,
                    padding=True,
                    return_tensors="pt",
                    return_dict=True,
                )
                out = teacher.generate(**batch, max_new_tokens=answer_tokens, **sample)
                starts = (batch["attention_mask"] == 0).sum(1).tolist()  # left padding
                width = batch["input_ids"].shape[1]
            else:
                out, starts, width = first, [0] * first.shape[0], len(prefix)
            for row, start in zip(out, starts, strict=True):
                gen = row[width:]
                end = (gen == eos).nonzero()
                gen = gen[: int(end[0]) + 1] if len(end) else gen  # through the end of the turn
                piece = torch.cat([row[start:width], gen])
                stream.append(piece)
                total += piece.numel()
                bar.update(piece.numel())
    finally:
        tokenizer.padding_side = side
        bar.close()
    return torch.cat(stream)
