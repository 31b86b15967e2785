"""measure's chunked lm_head loss equals the full-logits cross entropy, values and gradients."""

from __future__ import annotations

import torch
from tiny_models import tiny_model
from torch.nn import functional as F

from gravity_sparse.model.chunked_loss import final_hidden
from gravity_sparse.model.data import block_loss, eval_loss, token_blocks
from gravity_sparse.stages.s1_measure.measure import _sequence_losses


def _full(model, hidden, ids):
    logits = model.lm_head(hidden)
    losses = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2),
        ids[:, 1:].expand(hidden.shape[0], -1),
        reduction="none",
    )
    return losses.mean(-1)


def test_chunked_losses_match_full_logits():
    model = tiny_model().eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=gen)
    with torch.no_grad():
        hidden = final_hidden(model, ids.expand(3, -1))
        assert torch.allclose(model(input_ids=ids).logits, model.lm_head(hidden[:1]), atol=1e-5)
    for chunk in (1, 7, 39, 100):
        h = hidden.clone().requires_grad_()
        got = _sequence_losses(model, h, ids, chunk=chunk)
        (g_got,) = torch.autograd.grad(got.sum(), h)
        h2 = hidden.clone().requires_grad_()
        want = _full(model, h2, ids)
        (g_want,) = torch.autograd.grad(want.sum(), h2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)


def test_eval_loss_matches_the_full_logit_loss_of_its_windows():
    model = tiny_model().eval()
    ids = torch.randint(
        0, model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(1)
    )
    got = eval_loss(model, ids, 48, 2)
    with torch.no_grad():
        want = block_loss(model, token_blocks(ids, 48)).item()  # full logits, every window at once
    assert got[1] == 4 * 48
    assert abs(got[0] - want) < 1e-5
