"""What the block path (gravity_block_attention.py) attends over: keys and values as block stores, the
augmented queries and keys of prefill, and the scratch buffers of inference.

Self-contained (copied next to every checkpoint with modeling_gravity.py): imports only torch.
"""

from __future__ import annotations

import threading

import torch
from torch.nn import functional as F


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(x, x)


def _store(x: torch.Tensor, bs: int, dtype, center=None, extra: int = 0) -> torch.Tensor:
    """(B, Hkv, Sk, D) → block store (B, Hkv · nbk + 1, bs, D + extra) in `dtype` (minus `center`
    (B, Hkv, 1, D)): the blocks of each KV head in order, zeros past Sk, then one all-zero block (padding
    slots). The `extra` trailing columns are left for the caller."""
    bsz, hkv, sk, d = x.shape
    nbk = -(-sk // bs)
    out = torch.empty(bsz, hkv * nbk + 1, bs, d + extra, dtype=dtype, device=x.device)
    body = out[:, :-1].view(bsz, hkv, nbk * bs, d + extra)[..., :d]
    if center is None:
        body[:, :, :sk].copy_(x)
    else:
        torch.sub(x, center, out=body[:, :, :sk])
    body[:, :, sk:].zero_()
    out[:, -1].zero_()
    return out


def _augment_keys(ka: torch.Tensor, d: int) -> torch.Tensor:
    """Fill a key store's two extra columns: [k − c | 1 | ‖k − c‖²]."""
    ka[..., d].fill_(1.0)
    torch.linalg.vecdot(ka[..., :d], ka[..., :d], out=ka[..., d + 1])
    return ka


class Stores:
    """Keys and values as block stores, plus, for prefill, everything shifted by a per-KV-head center.

    From a full sequence (k/v (B, Hkv, Sk, D)) or an evicting cache's stores (`view`). Prefill keeps
    queries and keys *augmented* so that one matmul gives d² + ε: qa = [−2 (q − c), ‖q − c‖² + ε, 1],
    ka = [k − c, 1, ‖k − c‖²] (the factor −2 is exact, and undone exactly for the backward)."""

    def __init__(self, q, k, v, bs: int, groups, shared: bool, from_view: bool, eps: float):
        self.from_view, self.shape = from_view, (k.shape, v.shape)
        kv_groups, hkv = groups
        qf = _float(q)
        self.shared, self.cdt = shared, qf.dtype  # computed in fp32 (fp64 for gradcheck)
        if from_view:  # stores already (their dtype: blocks are converted once gathered)
            self.ks, self.vs = k, v
            if shared:  # the center is the mean over the store's body
                bsz, nf, _, d = self.ks.shape
                body = _float(self.ks[:, :-1]).reshape(bsz, hkv, -1, d)
                center = body.mean(2, keepdim=True)
                self.ka = _store(body, bs, qf.dtype, center, extra=2)
        else:
            # the mean accumulates in the compute dtype without a converted copy of k
            center = k.mean(2, keepdim=True, dtype=qf.dtype) if shared else None
            self.vs = _store(v, bs, qf.dtype)
            if shared:
                self.ka = _store(k, bs, qf.dtype, center, extra=2)
            else:
                self.ks = _store(k, bs, qf.dtype)
        if shared:
            _augment_keys(self.ka, self.ka.shape[-1] - 2)
            bsz, hq, s, d = q.shape
            qa = torch.empty(bsz, hq, s + 1, d + 2, dtype=qf.dtype, device=q.device)
            body = qa[:, :, :s, :d]
            torch.add(center.index_select(1, kv_groups) * 2.0, qf, alpha=-2.0, out=body)
            qa[:, :, s].zero_()
            norms = qa[..., d]
            torch.linalg.vecdot(qa[..., :d], qa[..., :d], out=norms)
            norms.mul_(0.25).add_(eps)  # ‖−2 (q − c)‖² / 4: exact
            qa[..., d + 1].fill_(1.0)
            self.qa = qa.view(bsz, hq * (s + 1), d + 2)
        else:
            self.q = F.pad(qf, (0, 0, 0, 1)).flatten(1, 2)

    def key_grad(self, dks: torch.Tensor, sk: int) -> torch.Tensor:
        """The gradient of a full-sequence k or v from the gradient of its store."""
        bsz, hkv, _, d = self.shape[0]
        return dks[:, :-1].reshape(bsz, hkv, -1, d)[:, :, :sk]


_local = threading.local()  # a thread's scratch buffers go with the thread


def _workspace(device, dtype) -> dict:
    """Scratch buffers of inference (no backward keeps them), reused from bucket to bucket and call to
    call: a fresh multi-MiB tensor per op costs page faults that, at short key rows, outweigh the op.
    One set per thread, device and dtype; each grows to the largest bucket seen (`release_scratch`
    frees the calling thread's)."""
    spaces = _local.__dict__.setdefault("spaces", {})
    return spaces.setdefault((str(device), dtype), {})


def release_scratch() -> None:
    """Free the calling thread's scratch buffers (they are rebuilt on the next inference call)."""
    _local.__dict__.pop("spaces", None)


def _scratch(ws: dict | None, name: str, shape, dtype, device) -> torch.Tensor | None:
    if ws is None:
        return None
    n = 1
    for x in shape:
        n *= x
    buf = ws.get(name)
    if buf is None or buf.numel() < n:
        buf = ws[name] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)
