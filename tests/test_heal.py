"""Healing pieces: the dense teacher borrowed from the sparse model, distillation loss, bad budgets."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import random_masks, tiny_model

from gravity_sparse.errors import UserError
from gravity_sparse.heal import LORA_TARGETS, HealConfig, dense_teacher
from gravity_sparse.masks import attach_masks


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
