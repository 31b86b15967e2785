"""measure: run calibration text through a gravity model and record the locality field of every head.

Writes `field.safetensors` (format in DESIGN §3 / the shared brief; tensors [L, H, ...]) and PNG plots
into a given folder, and returns a JSON-able summary. The numbers come from `gravity_sparse.field`; this
module only drives the model:

1. field pass (no grad): every layer's attention is replaced by a chunked call of the reference
   (`attn.gravity_kernel`), which also reduces each chunk of probabilities into that layer's
   `LayerFieldAccumulator` — one chunk of one layer's attention exists at a time.
2. first-order importance (optional): one backward per batch, attention under activation checkpointing so
   that no layer keeps its probabilities for the backward; |Σ_tokens ∂loss/∂out_h · out_h| per sequence.
3. exact importance (optional): for a few sequences, the inputs of every decoder layer are captured once;
   then for layer l the layers l.. are rerun on copies of that input, copy 0 clean and copy c with one
   head's output zeroed, so one forward ablates a whole group of heads and the prefix is never recomputed.

Exact ablation is what the QUBO uses as `importance`: dropping a head zeroes its output, which is exactly
what was measured, while the first-order estimate linearises a change that is not small and misses
interactions through the later layers. The gradient estimate is the fallback when ablation is too
expensive (`importance="grad"`), and the metadata says which one `importance` holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .chunked_loss import LOSS_CHUNK, final_hidden, nll_sums
from .errors import UserError
from .field import LayerFieldAccumulator, fit_power_law, gravity_scores, head_locality

IMPORTANCE_METHODS = ("ablation", "grad", "both")


@dataclass
class MeasureConfig:
    seq_len: int = field(default=512, metadata={"help": "tokens per calibration sequence"})
    block_size: int = field(default=64, metadata={"help": "block size of the field grid"})
    num_sequences: int = field(
        default=32,
        metadata={"help": "calibration sequences to use at most (0 = all the text gives)"},
    )
    batch_size: int = field(default=4, metadata={"help": "sequences per forward in the field pass"})
    importance: str = field(
        default="both", metadata={"help": "head importance: ablation (exact) | grad | both"}
    )
    ablation_sequences: int = field(
        default=4, metadata={"help": "sequences used for exact ablation importance"}
    )
    ablation_group: int = field(
        default=0, metadata={"help": "heads ablated per forward (0 = all heads of a layer)"}
    )
    chunk_elements: int = field(
        default=1 << 26,
        metadata={"help": "max elements of one attention-probability chunk (queries are chunked)"},
    )
    plots: bool = field(default=True, metadata={"help": "write PNG plots"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars on stderr"})

    def __post_init__(self) -> None:
        for name in ("seq_len", "block_size", "batch_size", "chunk_elements"):
            if getattr(self, name) < 1:
                raise UserError(f"measure.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("num_sequences", "ablation_sequences", "ablation_group"):
            if getattr(self, name) < 0:
                raise UserError(f"measure.{name} must be >= 0, got {getattr(self, name)}")
        if self.importance not in IMPORTANCE_METHODS:
            raise UserError(
                f"measure.importance must be one of {', '.join(IMPORTANCE_METHODS)}, "
                f"got {self.importance!r}"
            )
        if self.importance != "grad" and self.ablation_sequences == 0:
            raise UserError("measure.importance needs ablation but measure.ablation_sequences is 0")


def load_token_ids(path: Path, encode: Callable[[str], list[int]] | None = None) -> torch.Tensor:
    """Token ids of a UTF-8 text file: (N,) long. Default encoding: one id per UTF-8 byte."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration text {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"calibration text {path} is not UTF-8 ({err.reason})") from None
    if not text:
        raise UserError(f"calibration text {path} is empty")
    ids = encode(text) if encode is not None else list(text.encode("utf-8"))
    return torch.tensor(ids, dtype=torch.long)


def calibration_sequences(
    token_ids: torch.Tensor | Sequence[int], seq_len: int, max_sequences: int, max_positions: int
) -> torch.Tensor:
    """Cut token ids into non-overlapping sequences: (N, seq_len) long; bad input is a UserError."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise UserError("calibration text is empty")
    if seq_len > max_positions:
        raise UserError(
            f"measure.seq_len {seq_len} is above the model's max_position_embeddings {max_positions}"
        )
    count = ids.numel() // seq_len
    if count == 0:
        raise UserError(
            f"calibration text has {ids.numel()} tokens, fewer than one sequence of {seq_len}"
        )
    if max_sequences:
        count = min(count, max_sequences)
    return ids[: count * seq_len].view(count, seq_len)


def chunked_attention(
    module: torch.nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None,
    chunk_elements: int,
    on_chunk: Callable[..., None] | None = None,
) -> torch.Tensor:
    """The model's attention (the reference) over chunks of queries: (B, Hq, S, D).

    A chunk of C queries needs only the first q_start + C keys (causal), so each chunk's probabilities
    are (B, Hq, C, ≤Sk) with B·Hq·C·Sk ≤ chunk_elements. on_chunk(q, k, probs, q_start, out) sees each.
    """
    bsz, heads, s, _ = q.shape
    offset = k.shape[2] - s  # cached keys before the first query (0 in a calibration prefill)
    rows = max(1, chunk_elements // (bsz * heads * k.shape[2]))
    outs = []
    for start in range(0, s, rows):
        stop = min(s, start + rows)
        keys = offset + stop
        mask = None if attention_mask is None else attention_mask[..., start:stop, :keys]
        out, probs = module.reference_attention(
            q[:, :, start:stop],
            k[:, :, :keys],
            v[:, :, :keys],
            mask,
            return_weights=on_chunk is not None,
        )
        if on_chunk is not None:
            on_chunk(q[:, :, start:stop], k[:, :, :keys], probs, offset + start, out)
        outs.append(out)
    return torch.cat(outs, dim=2)


class _Kernels:
    """Temporarily replaces `gravity_kernel` on every attention layer, restoring the old one on exit."""

    def __init__(self, model: torch.nn.Module):
        self.layers = model.gravity_layers()
        self.saved = [getattr(a, "gravity_kernel", None) for a in self.layers]

    def set(self, layer: int, kernel: Callable | None) -> None:
        self.layers[layer].gravity_kernel = kernel

    def __enter__(self) -> _Kernels:
        return self

    def __exit__(self, *exc) -> None:
        for attn, kernel in zip(self.layers, self.saved, strict=True):
            if kernel is None:
                attn.__dict__.pop("gravity_kernel", None)
            else:
                attn.gravity_kernel = kernel


def _sequence_losses(
    model: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = LOSS_CHUNK
) -> torch.Tensor:
    """Mean next-token cross entropy of each sequence from final hidden states (B, S, E): (B,) fp32,
    without (B, S, V) logits (`chunked_loss`)."""
    targets = ids[:, 1:].expand(hidden.shape[0], -1)
    return nll_sums(model, hidden[:, :-1], targets, chunk) / (hidden.shape[1] - 1)


def _field_pass(model, sequences, cfg, kernels, accs) -> float:
    """Stream the calibration batches, filling the accumulators; returns the mean loss (nats/token)."""
    device = model.device
    loss_sum = 0.0
    for layer, attn in enumerate(kernels.layers):

        def kernel(module, q, k, v, mask, acc=accs[layer], attn=attn):
            def reduce(qc, kc, probs, q_start, out):
                scores = gravity_scores(
                    qc,
                    kc,
                    module.gravity_mass_log,
                    module.config.gravity_eps,
                    module.gravity_kv_groups,
                )
                acc.add(probs, scores, q_start, out, attn.o_proj.weight)

            return chunked_attention(module, q, k, v, mask, cfg.chunk_elements, reduce)

        kernels.set(layer, kernel)
    batches = sequences.split(cfg.batch_size)
    for batch in tqdm(batches, desc="measure: field", disable=not cfg.progress):
        ids = batch.to(device)
        with torch.no_grad():
            losses = _sequence_losses(model, final_hidden(model, ids), ids)
        loss_sum += float(losses.sum())
    return loss_sum / sequences.shape[0]


@contextmanager
def _checkpointed_layers(model: torch.nn.Module) -> Iterator[None]:
    """Run every decoder layer under activation checkpointing (non-reentrant) inside the block.

    The backward then keeps only each layer's input (S × hidden) and recomputes the layer, instead of
    every layer's MLP activations: at Gravity-2's shape and 4k tokens ≈ 0.6 GiB per layer otherwise,
    over 20 GiB for 36 layers.
    """
    layers = list(model.model.layers)
    own = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward, if any
    for layer in layers:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = forward


def _grad_importance(model, sequences, cfg, kernels) -> torch.Tensor:
    """First-order importance [L, H]: mean over sequences of |Σ_tokens ∂loss/∂out_h · out_h|."""
    num_layers, heads = len(kernels.layers), kernels.layers[0].num_heads
    total = torch.zeros(num_layers, heads, dtype=torch.float64)
    outs: list[torch.Tensor] = []

    def kernel(module, q, k, v, mask):
        def attend(q, k, v):
            return chunked_attention(module, q, k, v, mask, cfg.chunk_elements)

        if q.requires_grad:  # recompute in the backward: no layer keeps its probabilities
            out = checkpoint(attend, q, k, v, use_reentrant=False)
        else:  # nothing upstream needs a gradient (frozen embeddings): this is a leaf
            out = attend(q, k, v).detach().requires_grad_()
        outs.append(out)
        return out

    for layer in range(num_layers):
        kernels.set(layer, kernel)
    for batch in tqdm(
        sequences.split(cfg.batch_size), desc="measure: grad", disable=not cfg.progress
    ):
        ids = batch.to(model.device)
        outs.clear()
        with torch.enable_grad(), _checkpointed_layers(model):
            losses = _sequence_losses(model, final_hidden(model, ids), ids)
            targets = list(outs)  # the layers' recompute in the backward appends to outs again
            # per-sequence mean losses are independent, so one backward of their sum gives each one's
            grads = torch.autograd.grad(losses.sum(), targets)
        for layer, (out, grad) in enumerate(zip(targets, grads, strict=True)):
            per_seq = (grad.float() * out.detach().float()).sum(dim=(2, 3))  # (B, H)
            total[layer] += per_seq.abs().double().sum(0).cpu()
    return (total / sequences.shape[0]).float()


def _capture_layer_inputs(model, ids, kernels, cfg) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments every decoder layer receives for one batch `ids`."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {key: val for key, val in kwargs.items() if key != "hidden_states"}
        captured.append((hidden, rest))

    def kernel(module, q, k, v, mask):
        return chunked_attention(module, q, k, v, mask, cfg.chunk_elements)

    for layer in range(len(kernels.layers)):
        kernels.set(layer, kernel)
    hooks = [
        layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _ablation_importance(model, sequences, cfg, kernels) -> torch.Tensor:
    """Exact importance [L, H]: loss increase (nats/token) when one head's output is zeroed."""
    layers = list(model.model.layers)
    num_layers, heads = len(layers), kernels.layers[0].num_heads
    group = cfg.ablation_group or heads
    used = sequences[: cfg.ablation_sequences]
    total = torch.zeros(num_layers, heads, dtype=torch.float64)
    steps = len(used) * num_layers * (-(-heads // group))
    bar = tqdm(total=steps, desc="measure: ablation", disable=not cfg.progress)
    for seq in used:
        ids = seq.view(1, -1).to(model.device)
        inputs = _capture_layer_inputs(model, ids, kernels, cfg)
        for layer in range(num_layers):
            for first in range(0, heads, group):
                ablated = list(range(first, min(heads, first + group)))
                # copy 0 keeps every head: the baseline shares the batch and hence the arithmetic
                keep = torch.ones(len(ablated) + 1, heads, device=model.device)
                for copy, head in enumerate(ablated, start=1):
                    keep[copy, head] = 0.0

                def kernel(module, q, k, v, mask, keep=keep):
                    out = chunked_attention(module, q, k, v, mask, cfg.chunk_elements)
                    return out * keep.to(out.dtype).view(*keep.shape, 1, 1)

                kernels.set(layer, kernel)
                hidden, _ = inputs[layer]
                hidden = hidden.expand(keep.shape[0], -1, -1)
                with torch.no_grad():
                    for j in range(layer, num_layers):
                        hidden = layers[j](hidden, **inputs[j][1])
                    hidden = model.model.norm(hidden)
                    losses = _sequence_losses(model, hidden, ids).double().cpu()
                total[layer, ablated] += losses[1:] - losses[0]
                bar.update()
        del inputs
    bar.close()
    return (total / len(used)).float()


def _fits(profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Power-law fits of profiles [L, H, S] -> alpha, amp, r2, each [L, H]."""
    num_layers, heads = profile.shape[:2]
    out = torch.full((3, num_layers, heads), float("nan"))
    for layer in range(num_layers):
        for head in range(heads):
            fit = fit_power_law(profile[layer, head].numpy())
            out[:, layer, head] = torch.tensor([fit.alpha, fit.amp, fit.r2])
    return out[0], out[1], out[2]


def run_measure(
    model: torch.nn.Module,
    token_ids: torch.Tensor | Sequence[int],
    cfg: MeasureConfig,
    out_dir: Path,
) -> dict:
    """Measure the field of `model` on `token_ids` (1-D) and write field.safetensors + plots to out_dir."""
    config = model.config
    attns = model.gravity_layers()
    head_counts = {(a.num_heads, a.num_key_value_heads) for a in attns}
    if len(head_counts) != 1:
        raise UserError(
            "measure needs the same number of heads in every layer (not a pruned model)"
        )
    sequences = calibration_sequences(
        token_ids, cfg.seq_len, cfg.num_sequences, int(config.max_position_embeddings)
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_layers, (heads, kv_heads) = len(attns), head_counts.pop()
    device = model.device
    was_training = model.training
    model.eval()
    timings = {}
    try:
        with _Kernels(model) as kernels:
            accs = [
                LayerFieldAccumulator(heads, cfg.seq_len, cfg.block_size, device) for _ in attns
            ]
            start = time.perf_counter()
            loss = _field_pass(model, sequences, cfg, kernels, accs)
            timings["field_s"] = time.perf_counter() - start
            grad_imp = torch.full((num_layers, heads), float("nan"))
            if cfg.importance in ("grad", "both"):
                start = time.perf_counter()
                grad_imp = _grad_importance(model, sequences, cfg, kernels)
                timings["grad_s"] = time.perf_counter() - start
            if cfg.importance in ("ablation", "both"):
                start = time.perf_counter()
                importance = _ablation_importance(model, sequences, cfg, kernels)
                timings["ablation_s"] = time.perf_counter() - start
            else:
                importance = grad_imp.clone()
    finally:
        model.train(was_training)

    results = [acc.result() for acc in accs]
    tensors = {key: torch.stack([r[key] for r in results]).cpu() for key in results[0]}
    mass_log = torch.stack([a.gravity_mass_log.detach().float().cpu() for a in attns])
    alpha, alpha_amp, alpha_r2 = _fits(tensors["profile"])
    tensors.update(
        importance=importance,
        importance_grad=grad_imp,
        mass=F.softplus(mass_log),
        mass_log=mass_log,
        alpha=alpha,
        alpha_amp=alpha_amp,
        alpha_r2=alpha_r2,
        kv_groups=torch.stack([a.gravity_kv_groups.cpu() for a in attns]).long(),
    )
    importance_method = "grad" if cfg.importance == "grad" else "ablation"
    num_tokens = sequences.numel()
    metadata = {
        "block_size": str(cfg.block_size),
        "seq_len": str(cfg.seq_len),
        "num_layers": str(num_layers),
        "num_heads": str(heads),
        "num_kv_heads": str(kv_heads),
        "num_tokens": str(num_tokens),
        "importance_method": importance_method,
    }
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(out_dir / "field.safetensors"),
        metadata,
    )
    plots = []
    if cfg.plots:
        plots = plot_field(tensors, out_dir)
    return _summary(tensors, cfg, loss, num_tokens, timings, importance_method, plots)


def _summary(tensors, cfg, loss, num_tokens, timings, importance_method, plots) -> dict:
    """JSON-able summary: run numbers and one row per head."""
    locality = head_locality(tensors["block_field"])
    num_layers, heads = tensors["mass"].shape

    def num(x: torch.Tensor) -> float | None:
        value = float(x)
        return None if value != value else round(value, 6)  # NaN is not JSON

    rows = [
        {
            "layer": layer,
            "head": head,
            "kv_head": int(tensors["kv_groups"][layer, head]),
            **{
                key: num(tensors[key][layer, head])
                for key in ("mass", "alpha", "alpha_r2", "entropy", "importance", "importance_grad")
            },
            "locality": num(locality[layer, head]),
        }
        for layer in range(num_layers)
        for head in range(heads)
    ]
    order = sorted(rows, key=lambda r: r["locality"] or 0.0)
    return {
        "config": asdict(cfg),
        "num_sequences": num_tokens // cfg.seq_len,
        "num_tokens": num_tokens,
        "loss": round(loss, 6),
        "importance_method": importance_method,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "tokens_per_s": round(num_tokens / timings["field_s"], 1),
        "most_local": {"layer": order[-1]["layer"], "head": order[-1]["head"]},
        "least_local": {"layer": order[0]["layer"], "head": order[0]["head"]},
        "heads": rows,
        "plots": plots,
    }


def plot_field(tensors: dict[str, torch.Tensor], out_dir: Path) -> list[str]:
    """Write the measure plots into out_dir; returns their file names.

    heatmap_{mass,alpha,importance,entropy}.png: layer × head grids; block_field.png: the field of the
    most and least local heads (mass kept in the own block); profiles.png: every head's distance profile
    with its power-law fit, log-log, one panel per layer; score_profiles.png: the same for the raw score;
    redundancy.png: head-head cosine similarity per layer.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(Path(out_dir) / name, dpi=110)
        plt.close(fig)
        names.append(name)

    titles = {
        "mass": "mass M_h = softplus(mass_log)",
        "alpha": "power-law exponent α\n(profile ≈ a·Δ^-α, blank: no fit)",
        "importance": "importance\n(loss increase when ablated, nats/token)",
        "entropy": "mean attention entropy (nats)",
    }
    num_layers, heads = tensors["mass"].shape
    for key, title in titles.items():
        values = tensors[key].numpy()
        fig, ax = plt.subplots(
            figsize=(max(5.5, 1.5 + 0.5 * heads), max(3.0, 1.3 + 0.38 * num_layers))
        )
        image = ax.imshow(values, aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=ax)
        if num_layers * heads <= 256:
            for (layer, head), value in np.ndenumerate(values):
                ax.text(
                    head, layer, f"{value:.2g}", ha="center", va="center", fontsize=6, color="w"
                )
        ax.set(xlabel="query head", ylabel="layer", title=title)
        ax.set(xticks=range(heads), yticks=range(num_layers))
        save(fig, f"heatmap_{key}.png")

    locality = head_locality(tensors["block_field"])
    flat = torch.nan_to_num(locality, nan=0.0).flatten()
    chosen = {"most local": int(flat.argmax()), "least local": int(flat.argmin())}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, (label, index) in zip(axes, chosen.items(), strict=True):
        layer, head = divmod(index, heads)
        grid = tensors["block_field"][layer, head].numpy()
        masked = np.ma.masked_where(np.triu(np.ones_like(grid, dtype=bool), 1), grid)
        image = ax.imshow(masked, cmap="magma", norm=matplotlib.colors.LogNorm(vmin=1e-4, vmax=1))
        fig.colorbar(image, ax=ax)
        ax.set(
            title=f"{label}: layer {layer} head {head}\nown-block mass {float(locality[layer, head]):.2f}",
            xlabel="key block",
            ylabel="query block",
        )
    save(fig, "block_field.png")

    cols = min(num_layers, 4)
    rows = -(-num_layers // cols)
    for key, name in (("profile", "profiles.png"), ("score_profile", "score_profiles.png")):
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
        delta = np.arange(tensors[key].shape[-1], dtype=np.float64)
        for layer in range(num_layers):
            ax = axes.flat[layer]
            for head in range(heads):
                values = tensors[key][layer, head, 1:].numpy()
                (line,) = ax.loglog(delta[1:], values, lw=1, label=f"h{head}")
                alpha = float(tensors["alpha"][layer, head])
                if key == "profile" and np.isfinite(alpha):
                    fit = float(tensors["alpha_amp"][layer, head]) * delta[1:] ** -alpha
                    ax.loglog(delta[1:], fit, ls="--", lw=0.8, color=line.get_color())
            ax.set(title=f"layer {layer}", xlabel="distance Δ", ylabel=key.replace("_", " "))
            if heads <= 16:
                ax.legend(fontsize=6, ncol=2)
        for ax in list(axes.flat)[num_layers:]:
            ax.axis("off")
        save(fig, name)

    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for layer in range(num_layers):
        ax = axes.flat[layer]
        image = ax.imshow(tensors["redundancy"][layer].numpy(), cmap="coolwarm", vmin=-1, vmax=1)
        ax.set(title=f"layer {layer}: head cosine", xlabel="head", ylabel="head")
    fig.colorbar(image, ax=list(axes.flat))
    for ax in list(axes.flat)[num_layers:]:
        ax.axis("off")
    fig.savefig(Path(out_dir) / "redundancy.png", dpi=110)
    plt.close(fig)
    names.append("redundancy.png")
    return names
