"""End-to-end LoRA distillation of a gravitized model from its original dot-product model.

After the layer-wise transfer, every layer reproduces its own original attention output approximately, but
the errors add up through the depth. A brief LoRA fine-tune (peft, transformers' Trainer) with the original
model as teacher closes the gap: loss = (1 − d) · CE + d · KL(teacher ‖ student) per token. The masses train
too. The adapter is merged at the end, so the result is a plain gravity model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from ..model.data import BlockDataset
from ..stages.s4_heal.heal import KeepBest, kl_to_teacher

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
        save_strategy="no",
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
        callbacks=[keep],
        teacher=teacher,
        distill=distill,
    )
    keep.on_evaluate(args, trainer.state, trainer.control, metrics=trainer.evaluate())
    trainer.train()
    keep.on_evaluate(args, trainer.state, trainer.control, metrics=trainer.evaluate())
    keep.restore()
    merged = peft_model.merge_and_unload().eval()
    record = {
        "steps": trainer.state.global_step,
        "best_val_loss": keep.best,
        "log_history": trainer.state.log_history,
    }
    return merged, record
