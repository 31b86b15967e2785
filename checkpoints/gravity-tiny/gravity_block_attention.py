"""Block-skipping gravity attention in plain PyTorch: prefill, chunked prefill and decode, any device.

Self-contained (copied next to every checkpoint with modeling_gravity.py): imports only torch and the
siblings gravity_blocks.py and gravity_block_stores.py. This is the default attention of a
GravityAttention layer (and the "cpu" backend of gravity_sparse): only the kept blocks of a block mask are
computed (gravity_blocks.py says how they are grouped), dropped heads are not computed at all, and a model
without masks runs the same code with every causal block kept, so that dense and sparse differ only in
what is kept.

Math (the reference's, `gravity_attention_reference`): s = M_h² / (‖q − k‖² + ε) with ‖q − k‖² =
‖q − c‖² + ‖k − c‖² − 2 (q − c)·(k − c) clamped at 0, softmax over the allowed keys, fp32. The common shift
c is exact (distances do not change): for prefill each KV head's mean key, for decode (at most
DECODE_ROWS queries) the mean of the blocks a unit reads, so that a decode step reads nothing else and
gives the same numbers from a full cache and from an evicting one. Allowed = causal ∩ kept block ∩ key not
padding; a row with nothing allowed (left padding) gives zeros, as in the reference.

`BlockGravityAttention` has a hand-written backward (heal and pretrain train through it on CPU). With
s = M² r, r = 1/(d² + ε), p = softmax(s), δ_i = do_i · o_i:
    ds = p (dp − δ),  dM² = Σ ds r,  g = ∂L/∂d² = −M² ds r²,
    dq_i = 2 (q_i Σ_j g_ij − Σ_j g_ij k_j),  dk_j = 2 (k_j Σ_i g_ij − Σ_i g_ij q_i),  dv = pᵀ do
(the clamp's zero gradient is ignored: d² ≥ 0 exactly, only rounding makes it negative).
"""

from __future__ import annotations

import weakref

import torch
from torch.nn import functional as F

from .gravity_block_stores import Stores, _float, _norms, _scratch, _workspace
from .gravity_blocks import BlockTables, Bucket, make_plan

DENSE_BLOCK = 64  # block of the all-kept grid of a layer without a block mask
DECODE_ROWS = 16  # up to this many queries: decode (each unit shifted by the mean of what it reads)
_PLAN_CACHE = 16
_mask_memo: dict = {}


def _attend(st: Stores, mass_log, plan, eps: float, keyok, q_start: int, dims, saved):
    """The forward of `BlockGravityAttention`; with `saved` a list, keeps what the backward needs
    (without it, the per-bucket tensors live in a reused workspace). dims: (B, Hq, S, D). Prefill
    (`st.shared`) shifts by each KV head's mean key, computed once; decode by the mean of the blocks a
    unit reads, so that it depends on nothing else the store holds."""
    bsz, hq, s, d = dims
    s1 = s + 1
    bs = st.vs.shape[2]
    cdt = st.cdt
    m2 = F.softplus(_float(mass_log)).square().to(cdt)
    dev = m2.device
    out = torch.empty(bsz, hq, s1, d, dtype=cdt, device=dev)
    # every row of a head in the plan is written; the other heads (dropped) give zeros
    written = frozenset().union(*(b.head_ids for b in plan))
    if len(written) < hq:
        out[:, [h for h in range(hq) if h not in written]] = 0.0
    out = out.view(bsz, hq * s1, d)
    ws = _workspace(dev, cdt) if saved is None else None
    for b in plan:
        n, g = b.heads.shape
        r, k = b.rows.shape[1], b.slots.shape[1]
        flat = _flat(b, s1)
        slots = b.slots.flatten()
        if st.vs.dtype == cdt:
            vg = _scratch(ws, "v", (bsz, n * k, bs, d), cdt, dev)
            vg = torch.index_select(st.vs, 1, slots, out=vg).view(bsz * n, k * bs, d)
        else:
            vg = st.vs.index_select(1, slots).to(cdt).view(bsz * n, k * bs, d)
        if st.shared:
            da = st.qa.shape[-1]
            qa = _scratch(ws, "q", (bsz, n * g * r, da), cdt, dev)
            qa = torch.index_select(st.qa, 1, flat, out=qa).view(bsz * n, g * r, da)
            ka = _scratch(ws, "k", (bsz, n * k, bs, da), cdt, dev)
            ka = torch.index_select(st.ka, 1, slots, out=ka).view(bsz * n, k * bs, da)
            y = _scratch(ws, "s", (bsz * n, g * r, k * bs), cdt, dev)
            y = torch.bmm(qa, ka.transpose(1, 2), out=y)  # d² + ε
            y.clamp_min_(eps)  # max(d², 0) + ε
        else:
            kg = st.ks.index_select(1, slots).to(cdt).view(bsz, n, k * bs, d)
            center = kg.mean(dim=2, keepdim=True)  # (B, n, 1, D)
            qc = st.q.index_select(1, flat).view(bsz, n, g * r, d).sub_(center)
            qc = qc.view(bsz * n, g * r, d)
            kc = (kg - center).view(bsz * n, k * bs, d)
            kn = _norms(kc).unsqueeze(1)
            qn = _norms(qc).unsqueeze(-1)
            y = torch.baddbmm(kn, qc, kc.transpose(1, 2), alpha=-2.0)
            y.add_(qn.add(eps)).clamp_min_(eps)  # max(d², 0) + ε
        m2u = m2[b.heads].view(1, n, g, 1, 1)
        y5 = y.view(bsz, n, g, r, k * bs)
        if saved is not None:
            rec = y.reciprocal_()
            sc = rec.view(bsz, n, g, r, k * bs) * m2u
        else:
            sc = torch.div(m2u, y5, out=y5)
        bias = b.bias(sc.dtype)
        if keyok is not None:
            pad = torch.zeros(bsz, n, 1, 1, k * bs, dtype=sc.dtype, device=sc.device)
            pad.masked_fill_(~keyok.index_select(1, b.blocks.flatten()).view_as(pad), float("-inf"))
            bias = pad if bias is None else bias + pad
        if bias is not None:
            sc.add_(bias)
        sc[..., :bs].add_(b.causal(q_start, s, bs, sc.dtype))
        if ws is None:
            p = torch.softmax(sc, dim=-1)
        else:
            p = _scratch(ws, "p", sc.shape, cdt, dev)
            p = torch.ops.aten._softmax.out(sc, -1, False, out=p)
        if keyok is not None or b.empty_rows:
            p = p.nan_to_num_(0.0)  # rows with nothing allowed give zeros, as in the reference
        o = _scratch(ws, "o", (bsz * n, g * r, d), cdt, dev)
        o = torch.bmm(p.view(bsz * n, g * r, k * bs), vg, out=o)
        out.index_copy_(1, flat, o.view(bsz, n * g * r, d))
        if saved is not None:
            saved.append((qa, ka, vg, rec, p) if st.shared else (qc, kc, vg, rec, p))
    return out.view(bsz, hq, s1, d)[:, :, :s]


class BlockGravityAttention(torch.autograd.Function):
    """Prefill with a hand-written backward: q (B, Hq, S, D), k/v (B, Hkv, S, D), mass_log (Hq,).

    plan: buckets from `make_plan` over the stores of k/v (`_store`); keyok: (B, NB+1, block) bool (key
    is not padding) or None; q_start: position of query row 0 (Sk − S); groups: (kv_groups, Hkv).
    Rows of dropped heads are zero and get no gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, mass_log, plan, eps: float, keyok, q_start: int, groups, bs: int):
        st = Stores(q, k, v, bs, groups, q.shape[2] > DECODE_ROWS, False, eps)
        saved: list = []
        out = _attend(st, mass_log, plan, eps, keyok, q_start, q.shape, saved)
        ctx.save_for_backward(out, mass_log)
        ctx.saved, ctx.plan, ctx.st, ctx.sk = saved, plan, st, k.shape[2]
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        out, mass_log = ctx.saved_tensors
        st = ctx.st
        bsz, hq, s, d = out.shape
        s1, bs = s + 1, st.vs.shape[2]
        do = F.pad(dout.to(out.dtype), (0, 0, 0, 1))
        delta = (do * F.pad(out, (0, 0, 0, 1))).sum(-1).view(bsz, hq * s1, 1)
        do = do.reshape(bsz, hq * s1, d)
        mass = F.softplus(_float(mass_log))
        m2 = mass.square()
        dq = torch.zeros_like(do)
        dk = torch.zeros_like(st.vs)
        dv = torch.zeros_like(st.vs)
        dm2 = out.new_zeros(hq)
        for b, (qc, kc, vg, rec, p) in zip(ctx.plan, ctx.saved, strict=True):
            if st.shared:  # augmented: qa = [−2 qc, …], ka = [kc, …]
                qc, kc = qc[..., :d] * -0.5, kc[..., :d]
            n, g = b.heads.shape
            r, k = b.rows.shape[1], b.slots.shape[1]
            flat = _flat(b, s1)
            dog = do.index_select(1, flat).view(bsz * n, g * r, d)
            p = p.view(bsz * n, g * r, k * bs)
            dvg = torch.bmm(p.transpose(1, 2), dog)
            dv.index_add_(1, b.slots.flatten(), dvg.view(bsz, n * k, bs, d))
            gr = torch.bmm(dog, vg.transpose(1, 2))  # dp, then ds · r
            gr.sub_(delta.index_select(1, flat).view(bsz * n, g * r, 1)).mul_(p).mul_(
                rec.view_as(gr)
            )
            dm2.index_add_(0, b.heads.flatten(), gr.view(bsz, n, g, -1).sum((0, 3)).flatten())
            m2u = m2[b.heads].view(1, n, g, 1, 1)
            gr.mul_(rec.view_as(gr)).view(bsz, n, g, r, k * bs).mul_(-m2u)  # ∂L/∂d²
            dqg = torch.baddbmm(qc * gr.sum(-1, keepdim=True), gr, kc, alpha=-1.0)
            dq.index_add_(1, flat, dqg.view(bsz, n * g * r, d))
            dkg = torch.baddbmm(kc * gr.sum(1).unsqueeze(-1), gr.transpose(1, 2), qc, alpha=-1.0)
            dk.index_add_(1, b.slots.flatten(), dkg.view(bsz, n * k, bs, d))
        dmass = dm2 * 2.0 * mass * torch.sigmoid(_float(mass_log))
        dq = (dq * 2.0).view(bsz, hq, s1, d)[:, :, :s]
        dk, dv = st.key_grad(dk * 2.0, ctx.sk), st.key_grad(dv, ctx.sk)
        dq, dk, dv = (t.to(dt) for t, dt in zip((dq, dk, dv), ctx.dtypes, strict=True))
        return dq, dk, dv, dmass.to(mass_log.dtype), None, None, None, None, None, None


def _flat(b: Bucket, s1: int) -> torch.Tensor:
    """Index of every (head, row) of a bucket in a (B, Hq · (S+1), D) view (kept in the bucket's memo)."""
    flat = b.memo.get(("flat", s1))
    if flat is None:
        flat = b.memo[("flat", s1)] = (b.heads.unsqueeze(-1) * s1 + b.rows.unsqueeze(1)).flatten()
    return flat


def key_padding(attention_mask: torch.Tensor | None, seq_len_q: int, seq_len_k: int):
    """What a transformers mask (B, 1|H, S, ≥Sk) asks for: "causal" (nothing else), a (B, Sk) bool of
    keys that are not padding (the mask is causal ∩ those), or None (anything else: use the reference)."""
    if attention_mask is None:
        return "causal"
    memo = _mask_memo.get(
        "mask"
    )  # a weak reference: a new mask at the old address is not the referent
    if (
        memo is not None
        and memo[0]() is attention_mask
        and memo[1:] == (attention_mask._version, seq_len_k)
    ):
        return _mask_memo["value"]
    mask = attention_mask[..., -seq_len_k:]
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    value = None
    if allowed.shape[-2] == seq_len_q and allowed.shape[-1] == seq_len_k:
        q_pos = torch.arange(seq_len_k - seq_len_q, seq_len_k, device=mask.device)
        causal = torch.arange(seq_len_k, device=mask.device).view(1, -1) <= q_pos.view(-1, 1)
        keyok = allowed[:, :1, -1, :]  # the last query's row: every key it may see
        if bool((allowed == (causal & keyok.unsqueeze(-2))).all()):
            value = "causal" if bool(keyok.all()) else keyok[:, 0]
    _mask_memo.update(
        mask=(weakref.ref(attention_mask), attention_mask._version, seq_len_k), value=value
    )
    return value


def _unchanged(seen: list, now: tuple) -> bool:
    """Whether the tensors `now` hold what `seen` recorded: the same objects at the same version, or
    equal contents (which then become the recorded objects)."""
    if len(seen) != len(now):
        return False
    for i, (entry, t) in enumerate(zip(seen, now, strict=True)):
        if entry is None or t is None:
            if entry is not t:
                return False
            continue
        obj, version, copy = entry
        if obj is t and version == t._version:
            continue
        if copy.shape != t.shape or not torch.equal(copy, t.detach().cpu()):
            return False
        seen[i] = (t, t._version, copy)
    return True


def tables_for(
    memo: dict,
    block_mask: torch.Tensor | None,
    head_keep: torch.Tensor | None,
    kv_groups: torch.Tensor,
    num_kv_heads: int,
    block_size: int,
    seq_len_k: int,
) -> BlockTables:
    """`BlockTables` of a mask, kept in `memo` (a layer's) and rebuilt only when the mask changes
    (a new tensor with other contents, or the same tensor changed in place)."""
    nb = max(8, 1 << (-(-seq_len_k // block_size) - 1).bit_length()) if block_mask is None else 0
    meta = (nb, block_size, num_kv_heads)
    now = (block_mask, head_keep, kv_groups)
    if memo.get("meta") != meta or not _unchanged(memo.get("seen", []), now):
        memo.clear()
        memo.update(meta=meta, plans={})
        memo["seen"] = [
            None if t is None else (t, t._version, t.detach().cpu().clone()) for t in now
        ]
        memo["tables"] = BlockTables(block_mask, head_keep, kv_groups, num_kv_heads, block_size, nb)
    return memo["tables"]


def layer_tables(module, block_size: int, seq_len_k: int) -> BlockTables:
    """The `BlockTables` of a GravityAttention layer (memo kept on the module)."""
    memo = module.__dict__.setdefault("_gravity_blocks", {})
    return tables_for(
        memo, module.gravity_block_mask, module.gravity_head_keep, module.gravity_kv_groups,
        module.num_key_value_heads, block_size, seq_len_k,
    )  # fmt: skip


def block_size_of(module) -> int:
    return (
        int(module.config.gravity_block_size)
        if module.gravity_block_mask is not None
        else DENSE_BLOCK
    )


def block_attention(module, q, k, v, attention_mask, view=None) -> torch.Tensor | None:
    """A GravityAttention layer's attention through the block path (its masses, ε, groups, masks)."""
    bs = block_size_of(module)
    return block_sparse_attention(
        q, k, v, module.gravity_mass_log, eps=float(module.config.gravity_eps),
        block_mask=module.gravity_block_mask, head_keep=module.gravity_head_keep, block_size=bs,
        kv_groups=module.gravity_kv_groups, attention_mask=attention_mask, view=view,
        memo=module.__dict__.setdefault("_gravity_blocks", {}),
    )  # fmt: skip


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    mass_log: torch.Tensor,
    *,
    eps: float = 0.1,
    block_mask: torch.Tensor | None = None,
    head_keep: torch.Tensor | None = None,
    block_size: int | None = None,
    kv_groups: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    view=None,
    memo: dict | None = None,
) -> torch.Tensor | None:
    """Gravity attention computing only kept blocks: q (B, Hq, S, D), k/v (B, Hkv, Sk, D) (the queries are
    the last S of Sk positions) or, from an evicting cache, `view` (its block store; k/v unused).

    block_mask (Hq, NB, NB) bool at `block_size` (None: every causal block, at `DENSE_BLOCK`), head_keep
    (Hq,), kv_groups (Hq,) (default h // (Hq // Hkv)), attention_mask as transformers builds it (causal,
    or causal ∩ key padding). Returns (B, Hq, S, D) in q's dtype, with gradients (hand-written backward);
    None for any other mask (callers use the reference). `memo`: a dict kept between calls (tables, plans).
    """
    bsz, hq, s, d = q.shape
    sk = view.length if view is not None else k.shape[2]
    keyok = key_padding(attention_mask, s, sk)
    if keyok is None:
        return None
    hkv = view.num_kv_heads if view is not None else k.shape[1]
    if kv_groups is None:
        kv_groups = torch.arange(hq) // max(1, hq // max(1, hkv))
    bs = DENSE_BLOCK if block_mask is None else int(block_size)
    memo = {} if memo is None else memo
    tables = tables_for(memo, block_mask, head_keep, kv_groups, hkv, bs, sk)
    tables.check_length(sk)
    q_start = sk - s
    if view is None:
        nbk = -(-sk // bs)
        zero, store_key = hkv * nbk, ("full", nbk)

        def slot_map():
            kb = torch.arange(tables.num_blocks)
            base = torch.arange(hkv).view(-1, 1) * nbk + kb.view(1, -1)
            return torch.where(kb.view(1, -1) < nbk, base, -1)
    else:
        zero, store_key = view.zero_slot, ("view", view.version)

        def slot_map():
            return view.slot_of_block

    where = (q_start // bs, "decode") if s == 1 else (q_start, s)
    key = (*where, bsz, str(q.device), *store_key)
    plans = memo["plans"]
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= _PLAN_CACHE:
            plans.clear()
        plan = plans[key] = make_plan(tables, q_start, s, slot_map(), zero, bsz, d, q.device)
    if not plan:
        return q.new_zeros(q.shape)
    kp = None
    if not isinstance(keyok, str):
        nbp = tables.num_blocks + 1
        kp = F.pad(keyok, (0, nbp * bs - keyok.shape[1]), value=False).view(bsz, nbp, bs)
    groups = (kv_groups.to(q.device), hkv)  # KV head of each query head, number of KV heads
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, mass_log)
    )  # fmt: skip
    if grad and view is None:
        return BlockGravityAttention.apply(q, k, v, mass_log, plan, eps, kp, q_start, groups, bs)
    if grad:
        raise ValueError("gravity block attention has no backward through a GravityBlockCache")
    keys, values = (k, v) if view is None else (view.keys, view.values)
    st = Stores(q, keys, values, bs, groups, s > DECODE_ROWS, view is not None, eps)
    return _attend(st, mass_log, plan, eps, kp, q_start, q.shape, None).to(q.dtype)
