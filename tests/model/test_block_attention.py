"""The block path (model/gravity_block_attention.py) against the reference: odd lengths, GQA, dropped heads,
dropped blocks, chunked prefill, decode, padding; and that it computes only what the masks keep."""

import pytest
import torch
from tiny_models import assert_same_output_and_grads, attention_inputs

import gravity_sparse.model.gravity_reference as reference_module
from gravity_sparse.model.gravity_block_attention import block_sparse_attention
from gravity_sparse.model.gravity_reference import gravity_attention_reference


def block_mask(hq, nb, seed, keep=0.4, head_keep=None):
    g = torch.Generator().manual_seed(seed)
    bm = (torch.rand(hq, nb, nb, generator=g) < keep).tril() | torch.eye(nb, dtype=torch.bool)
    return bm if head_keep is None else bm & head_keep.view(-1, 1, 1)


def causal_padding_mask(keyok: torch.Tensor, s: int) -> torch.Tensor:
    """transformers' boolean mask (B, 1, S, Sk): causal ∩ keys that are not padding."""
    sk = keyok.shape[1]
    q_pos = torch.arange(sk - s, sk).view(-1, 1)
    causal = torch.arange(sk).view(1, -1) <= q_pos
    return (causal & keyok[:, None, :]).unsqueeze(1)


LAYOUTS = {  # (Hq, Hkv, D, kv_groups or None)
    "gqa-4q2kv": (4, 2, 8, None),
    "gravity2-9q3kv-d64": (9, 3, 64, None),
    "pruned-irregular": (5, 2, 8, [0, 1, 1, 0, 1]),
    "mha": (3, 3, 8, None),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("s,block", [(37, 8), (70, 16), (129, 32), (16, 16)])
def test_prefill_matches_reference_forward_and_backward(layout, s, block):
    hq, hkv, d, groups = LAYOUTS[layout]
    kv_groups = None if groups is None else torch.tensor(groups)
    q, k, v, mass_log = attention_inputs(2, hq, hkv, s, d, seed=s + hq)
    head_keep = torch.ones(hq, dtype=torch.bool)
    head_keep[1] = False
    nb = -(-s // block) + 1  # the mask is longer than the sequence
    bm = block_mask(hq, nb, seed=s, head_keep=head_keep)
    args = dict(block_mask=bm, head_keep=head_keep, block_size=block, kv_groups=kv_groups)
    ref, _ = gravity_attention_reference(q, k, v, mass_log, **args)
    dense, _ = gravity_attention_reference(q, k, v, mass_log, kv_groups=kv_groups)
    if s > block:
        assert (ref - dense).abs().max() > 1e-3, "the block mask must change the output"
    out = block_sparse_attention(q, k, v, mass_log, **args)
    assert_same_output_and_grads(out, ref, (q, k, v, mass_log))
    assert out[:, 1].abs().max() == 0  # the dropped head outputs zero


@pytest.mark.parametrize("s", [1, 5, 23])
def test_chunked_prefill_and_decode_match_reference(s):
    """Queries at the last s of 61 positions (a cache of 61 − s keys), with and without a mask."""
    q, k, v, mass_log = attention_inputs(2, 6, 2, 61, 16, seed=s)
    q = q[:, :, -s:].detach()
    bm = block_mask(6, 8, seed=3)
    for args in (dict(block_mask=bm, block_size=8), {}):
        ref, _ = gravity_attention_reference(q, k, v, mass_log, **args)
        out = block_sparse_attention(q, k, v, mass_log, **args)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_dense_model_path_matches_reference_with_gradients():
    q, k, v, mass_log = attention_inputs(
        1, 4, 2, 150, 8, seed=7
    )  # 3 blocks of 64, the last partial
    ref, _ = gravity_attention_reference(q, k, v, mass_log)
    out = block_sparse_attention(q, k, v, mass_log)
    assert_same_output_and_grads(out, ref, (q, k, v, mass_log))


@pytest.mark.parametrize("side", ["left", "right", "middle"])
def test_padding_matches_reference(side):
    s = 40
    q, k, v, mass_log = attention_inputs(3, 4, 2, s, 8, seed=1)
    keyok = torch.ones(3, s, dtype=torch.bool)
    if side == "left":
        keyok[0, :13], keyok[2, :1] = False, False
    elif side == "right":
        keyok[0, 30:], keyok[1, 17:] = False, False
    else:
        keyok[1, 5:20] = False
    mask = causal_padding_mask(keyok, s)
    bm = block_mask(4, 5, seed=2)
    args = dict(block_mask=bm, block_size=8, attention_mask=mask)
    ref, _ = gravity_attention_reference(q, k, v, mass_log, **args)
    out = block_sparse_attention(q, k, v, mass_log, **args)
    assert torch.isfinite(out).all()
    assert_same_output_and_grads(out, ref, (q, k, v, mass_log))
    if side == "left":
        assert (
            out[0, :, :13].abs().max() == 0
        )  # rows that see nothing give zeros, as in the reference


def test_a_kept_head_without_its_diagonal_block_gives_zero_rows_like_the_reference():
    q, k, v, mass_log = attention_inputs(1, 4, 2, 32, 8, seed=4)
    bm = block_mask(4, 4, seed=4)
    bm[0, 1, 1] = False
    bm[0, 1, 0] = False  # head 0, rows 8–15: nothing allowed
    ref, _ = gravity_attention_reference(q, k, v, mass_log, block_mask=bm, block_size=8)
    out = block_sparse_attention(q, k, v, mass_log, block_mask=bm, block_size=8)
    assert torch.isfinite(out).all() and out[0, 0, 8:16].abs().max() == 0
    assert_same_output_and_grads(out, ref, (q, k, v, mass_log))


def test_other_masks_are_left_to_the_reference():
    q, k, v, mass_log = attention_inputs(1, 2, 1, 12, 4)
    mask = torch.ones(1, 1, 12, 12, dtype=torch.bool)  # bidirectional: not causal
    assert block_sparse_attention(q, k, v, mass_log, attention_mask=mask) is None


def test_the_sequence_may_not_outgrow_the_mask():
    q, k, v, mass_log = attention_inputs(1, 2, 1, 33, 4)
    with pytest.raises(ValueError, match="longer than the block mask"):
        block_sparse_attention(q, k, v, mass_log, block_mask=block_mask(2, 4, 0), block_size=8)


def test_gradcheck_fp64():
    q, k, v, mass_log = attention_inputs(1, 4, 2, 11, 3, dtype=torch.float64)
    bm = block_mask(4, 3, seed=5)
    kv_groups = torch.tensor([0, 1, 1, 0])
    assert torch.autograd.gradcheck(
        lambda *x: block_sparse_attention(
            *x, block_mask=bm, block_size=4, kv_groups=kv_groups, head_keep=None
        ),
        (q, k, v, mass_log),
    )


def _scores_computed(monkeypatch, fn, head_dim: int = 16) -> int:
    """Score elements the block path computes (the sizes of its q·k matmuls: prefill's bmm of augmented
    queries, of width head_dim + 2, and decode's baddbmm)."""
    total = []
    baddbmm, bmm = torch.baddbmm, torch.bmm

    def counted_baddbmm(*args, **kwargs):
        out = baddbmm(*args, **kwargs)
        total.append(out.numel())
        return out

    def counted_bmm(a, b, **kwargs):
        out = bmm(a, b, **kwargs)
        if a.shape[-1] == head_dim + 2:
            total.append(out.numel())
        return out

    monkeypatch.setattr(torch, "baddbmm", counted_baddbmm)
    monkeypatch.setattr(torch, "bmm", counted_bmm)
    with torch.no_grad():
        fn()
    monkeypatch.undo()
    return sum(total)


def test_only_kept_blocks_and_kept_heads_are_computed(monkeypatch):
    s, block, hq = 256, 16, 8
    q, k, v, mass_log = attention_inputs(1, hq, 2, s, 16, seed=9)
    nb = s // block
    head_keep = torch.ones(hq, dtype=torch.bool)
    head_keep[[2, 5]] = False
    bm = block_mask(hq, nb, seed=9, keep=0.2, head_keep=head_keep)
    tril = torch.ones(nb, nb, dtype=torch.bool).tril()
    kept = int((bm & tril).sum()) * block * block
    dense = _scores_computed(
        monkeypatch,
        lambda: block_sparse_attention(
            q, k, v, mass_log, block_mask=tril.expand(hq, nb, nb), block_size=block
        ),
    )
    sparse = _scores_computed(
        monkeypatch,
        lambda: block_sparse_attention(
            q, k, v, mass_log, block_mask=bm, head_keep=head_keep, block_size=block
        ),
    )
    assert dense >= hq * nb * (nb + 1) // 2 * block * block  # every causal block of every head
    assert dense <= 1.3 * hq * nb * (nb + 1) // 2 * block * block
    assert kept <= sparse <= 1.6 * kept, (sparse, kept)  # unions within a KV head and padding
    assert sparse < 0.35 * dense


def test_decode_reads_only_the_kept_blocks_of_its_row():
    """Keys and values of blocks the last query row reads in no head of a KV head are NaN: decode
    must not touch them (the reference, which reads everything, would give NaN)."""
    s, block = 64, 8
    q, k, v, mass_log = attention_inputs(1, 4, 2, s, 8, seed=11)
    q, k, v = q.detach()[:, :, -1:], k.detach().clone(), v.detach().clone()
    bm = block_mask(4, s // block, seed=11, keep=0.3)
    ref, _ = gravity_attention_reference(q, k, v, mass_log, block_mask=bm, block_size=block)
    last = bm[:, -1]  # (Hq, NB): blocks of the last row
    poisoned = 0
    for g, heads in enumerate(([0, 1], [2, 3])):
        for kb in (~last[heads].any(0)).nonzero().flatten().tolist():
            k[:, g, kb * block : (kb + 1) * block] = float("nan")
            v[:, g, kb * block : (kb + 1) * block] = float("nan")
            poisoned += 1
    assert poisoned >= 4
    out = block_sparse_attention(q, k, v, mass_log, block_mask=bm, block_size=block)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_reference_without_weights_walks_queries_in_chunks(monkeypatch):
    """No (B, H, S, S) tensor when no weights are asked for; the same numbers as unchunked."""
    q, k, v, mass_log = attention_inputs(2, 4, 2, 96, 8, seed=3)
    bm = block_mask(4, 6, seed=3)
    args = dict(block_mask=bm, block_size=16)
    with torch.no_grad():
        whole, weights = gravity_attention_reference(q, k, v, mass_log, return_weights=True, **args)
        assert weights.shape == (2, 4, 96, 96)
        shapes = []
        scores = reference_module._centred_scores

        def recorded(qc, kc, *a):
            shapes.append(tuple(qc.shape))
            return scores(qc, kc, *a)

        monkeypatch.setattr(reference_module, "_centred_scores", recorded)
        monkeypatch.setattr(reference_module, "REFERENCE_CHUNK_ELEMENTS", 2 * 4 * 96 * 10)
        chunked, none = gravity_attention_reference(q, k, v, mass_log, **args)
    assert none is None and max(s[2] for s in shapes) == 10 and len(shapes) == 10
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_heads_of_a_kv_head_reading_different_blocks_are_computed_apart(monkeypatch):
    """Two heads of one KV head read disjoint off-diagonal blocks: as one unit per query block they would
    pay for the union (about twice their blocks), so the plan splits those units into one per head. Heads
    that read the same blocks stay one unit (their K/V gathered once), whatever the split threshold."""
    import gravity_sparse.model.gravity_blocks as blocks

    s, block, hq = 256, 16, 2
    nb = s // block
    q, k, v, mass_log = attention_inputs(1, hq, 1, s, 16, seed=5)
    rows, cols = torch.arange(nb).view(-1, 1), torch.arange(nb).view(1, -1)
    eye = rows == cols
    even, odd = eye | ((cols < rows) & (cols % 2 == 0)), eye | ((cols < rows) & (cols % 2 == 1))

    def computed(bm, gain):
        monkeypatch.setattr(blocks, "SPLIT_GAIN", gain)
        return _scores_computed(
            monkeypatch,
            lambda: block_sparse_attention(q, k, v, mass_log, block_mask=bm, block_size=block),
        )

    disjoint, same = torch.stack([even, odd]), torch.stack([even, even])
    split, union = computed(disjoint, 0.8), computed(disjoint, 0.0)
    assert split <= 0.75 * union, (split, union)
    assert computed(same, 0.8) == computed(same, 0.0)
    monkeypatch.setattr(blocks, "SPLIT_GAIN", 0.8)
    for bm in (disjoint, same):
        ref, _ = gravity_attention_reference(q, k, v, mass_log, block_mask=bm, block_size=block)
        with torch.no_grad():
            out = block_sparse_attention(q, k, v, mass_log, block_mask=bm, block_size=block)
        torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)


def test_inference_workspace_reused_across_shapes_keeps_results():
    """Inference reuses scratch buffers from call to call: a large call, then a small one, then the large
    one again give what each gives alone (the reference)."""
    big = attention_inputs(2, 4, 2, 96, 8, seed=3)
    small = attention_inputs(1, 4, 2, 33, 8, seed=4)
    bm_big, bm_small = block_mask(4, 12, seed=3), block_mask(4, 5, seed=4)
    with torch.no_grad():
        outs = [
            block_sparse_attention(*x[:3], x[3], block_mask=bm, block_size=8)
            for x, bm in ((big, bm_big), (small, bm_small), (big, bm_big))
        ]
    for x, bm, out in ((big, bm_big, outs[0]), (small, bm_small, outs[1]), (big, bm_big, outs[2])):
        ref, _ = gravity_attention_reference(*x[:3], x[3], block_mask=bm, block_size=8)
        torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)


def test_scratch_is_per_thread_and_can_be_released():
    """Each thread gets its own scratch buffers (two threads never share one), and release_scratch frees
    the calling thread's; results stay those of the reference either way."""
    import threading

    from gravity_sparse.model import gravity_block_stores as stores

    x = attention_inputs(1, 4, 2, 64, 8, seed=6)
    bm = block_mask(4, 8, seed=6)
    ref, _ = gravity_attention_reference(*x[:3], x[3], block_mask=bm, block_size=8)
    seen = {}

    def run(name):
        with torch.no_grad():
            out = block_sparse_attention(*x[:3], x[3], block_mask=bm, block_size=8)
        torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
        seen[name] = stores._workspace(torch.device("cpu"), torch.float32)["s"].data_ptr()

    run("main")
    other = threading.Thread(target=run, args=("other",))
    other.start()
    other.join()
    assert seen["main"] != seen["other"]
    stores.release_scratch()
    assert stores._workspace(torch.device("cpu"), torch.float32) == {}
    run("again")
