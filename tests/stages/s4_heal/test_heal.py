"""Healing pieces: the dense teacher borrowed from the sparse model, distillation loss, bad budgets."""

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import random_masks, tiny_model
from torch.nn import functional as F

from gravity_sparse.errors import UserError
from gravity_sparse.model.masks import attach_masks
from gravity_sparse.stages.s4_heal.config import HealConfig
from gravity_sparse.stages.s4_heal.heal import LORA_TARGETS, HealTrainer, dense_teacher


def test_dense_teacher_is_the_original_model_and_restores_everything():
    x = torch.randint(0, 256, (2, 40))
    dense = tiny_model(seed=3)
    with torch.no_grad():
        want = dense(x).logits
    model = tiny_model(seed=3)
    attach_masks(model, random_masks())
    masses = [a.gravity_mass_log.detach().clone() for a in model.gravity_layers()]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=LORA_TARGETS))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained adapter: the student now differs from the teacher
        for a in model.gravity_layers():
            a.gravity_mass_log.add_(0.5)
        student = peft_model(input_ids=x).logits
        assert (student - want).abs().max() > 1e-2
        with dense_teacher(peft_model, masses):
            teacher = peft_model(input_ids=x).logits
        assert torch.allclose(teacher, want, atol=1e-5)
        assert torch.equal(
            peft_model(input_ids=x).logits, student
        )  # sparsity, adapter, masses back
    assert all(a.gravity_block_mask is not None for a in model.gravity_layers())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"token_budget": 0}, "token_budget must be positive"),
        ({"token_budget": 100}, "less than one step"),
        ({"distill": 1.5}, "heal.distill must be in"),
    ],
)
def test_bad_heal_config(kwargs, message):
    with pytest.raises(UserError, match=message):
        HealConfig(**kwargs)


def _student_and_teacher(seed: int = 3):
    """A sparse LoRA student whose adapter and masses moved, and the dense model it started from."""
    teacher = tiny_model(seed=seed)
    model = tiny_model(seed=seed)
    attach_masks(model, random_masks())
    masses = [a.gravity_mass_log.detach().clone() for a in model.gravity_layers()]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=LORA_TARGETS))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
        for a in model.gravity_layers():
            a.gravity_mass_log.add_(0.3)
    peft_model.train()
    return peft_model, teacher, masses


@pytest.mark.parametrize("distill", [0.0, 1.0])
def test_heal_loss_is_cross_entropy_or_kl_to_the_teacher(distill):
    """distill 0: exactly the next-token cross entropy; distill 1: exactly KL(teacher ‖ student)."""
    peft_model, teacher, masses = _student_and_teacher()
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    unwrapped = SimpleNamespace(unwrap_model=lambda m: m)  # one process: nothing wraps the model
    trainer = SimpleNamespace(distill=distill, masses=masses, accelerator=unwrapped)
    loss, outputs = HealTrainer.compute_loss(
        trainer, peft_model, {"input_ids": x, "labels": x}, return_outputs=True
    )
    logits = outputs.logits.float()
    if distill == 0.0:
        want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    else:
        with torch.no_grad():
            log_t = F.log_softmax(teacher(input_ids=x).logits.float(), -1)
        log_s = F.log_softmax(logits, -1)
        want = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1).mean()
        assert want > 1e-4  # the student really differs from the teacher
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss.backward()  # the loss trains the student
    assert any(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)
