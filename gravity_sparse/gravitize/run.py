"""gravitize: a pretrained Llama/Qwen2 checkpoint (Hugging Face directory or GGUF file) in, a gravity model
in our format out — the Gravity-2 recipe (see `shared/seeds/gravity-2-model-card.txt`).

1. convert: every weight is copied, each head gets a mass (`mass_init`, raw) and ε; q/k are rescaled per
   layer so that the median causal ‖q − k‖² starts at `target_d2` (`convert.py`).
2. transfer: each layer's q/k projections and masses are fitted to reproduce the original layer's attention
   output on calibration text, from the original model's hidden states (`transfer.py`).

Resumable: each fitted layer is saved under `OUT.partial/layers/` as soon as it is done, and a rerun picks
up after the last finished layer; the distillation checkpoints under `OUT.partial/distill/` and a rerun
resumes it from its last checkpoint. The output directory appears only when everything is written (a
temporary folder renamed at the end), with `meta.json` (config, versions, wall time) and `gravitize.json`
(per-layer errors, masses, held-out losses of the original and the gravity model on the same tokens).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..errors import UserError
from .config import GravitizeConfig
from .evaluate import eval_text_names, greedy_samples, heldout_losses
from .source import load_source
from .transfer import LayerBatch, fit_layer, gravity_output, qk_scale_for, relative_mse


@torch.no_grad()
def capture(source: torch.nn.Module, ids: torch.Tensor, batch_size: int = 2) -> list[LayerBatch]:
    """Per layer of the ORIGINAL model: normalised attention inputs, RoPE cos/sin, output before o_proj."""
    layers = source.model.layers
    store: list[dict[str, list[torch.Tensor]]] = [
        {"hidden": [], "cos": [], "sin": [], "target": []} for _ in layers
    ]
    hooks = []
    for i, layer in enumerate(layers):

        def pre(module, args, kwargs, i=i):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            store[i]["hidden"].append(hidden.detach().float().cpu())
            store[i]["cos"].append(cos.detach().float().cpu().expand(hidden.shape[0], -1, -1))
            store[i]["sin"].append(sin.detach().float().cpu().expand(hidden.shape[0], -1, -1))

        def o_pre(module, args, i=i):
            store[i]["target"].append(args[0].detach().float().cpu())

        hooks.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(o_pre))
    try:
        for start in range(0, ids.shape[0], batch_size):
            source(input_ids=ids[start : start + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [
        LayerBatch(*(torch.cat(s[k]) for k in ("hidden", "cos", "sin", "target"))) for s in store
    ]


def _sequences(tokenizer, source: str, seq_len: int, count: int) -> torch.Tensor:
    from ..model.data import encode_text, resolve_text

    ids = encode_text(tokenizer, resolve_text(source))
    if ids.numel() < count * seq_len:
        raise UserError(
            f"calibration text has {ids.numel()} tokens, fewer than {count} sequences of {seq_len}"
        )
    return ids[: count * seq_len].view(count, seq_len)


# the settings that decide the fitted layers; distillation and evaluation settings may change on a rerun
_TRANSFER_KEYS = (
    "source",
    "tokenizer",
    "calibration_text",
    "seq_len",
    "num_sequences",
    "heldback_sequences",
    "steps",
    "lr",
    "batch_size",
    "target_d2",
    "mass_init",
    "eps",
    "seed",
    "start_from",
)


def _transfer_settings(cfg: GravitizeConfig | dict[str, Any]) -> dict[str, Any]:
    d = asdict(cfg) if isinstance(cfg, GravitizeConfig) else cfg
    return {k: d.get(k) for k in _TRANSFER_KEYS} | {"out": str(d.get("out"))}


DISTILL_VAL_WINDOWS = 64
FINGERPRINT_TOKENS = 128


def _layer_file(work: Path, i: int) -> Path:
    return work / "layers" / f"layer_{i:03d}.safetensors"


def _fitted_state(attn) -> dict[str, torch.Tensor]:
    names = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "gravity_mass_log")
    params = dict(attn.named_parameters())
    return {n: params[n].detach().cpu().contiguous() for n in names if n in params}


def run_gravitize(cfg: GravitizeConfig, progress: bool = True) -> Path:
    """Convert and transfer; returns the finished output directory."""
    from ..model.io import save_model
    from .convert import gravity_from_pretrained, scale_qk

    if not cfg.out:
        raise UserError("gravitize needs an output directory (out=...)")
    out = Path(cfg.out)
    if out.exists():
        raise UserError(f"output directory {out} already exists")
    work = out.with_name(out.name + ".partial")
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    source, tok = load_source(cfg.source, cfg.tokenizer)
    if cfg.start_from:
        model, prior = _start_model(cfg, source)
    else:
        model, prior = gravity_from_pretrained(source, eps=cfg.eps, mass_init=cfg.mass_init), None
    total = cfg.num_sequences + cfg.heldback_sequences
    seqs = _sequences(tok, cfg.calibration_text, cfg.seq_len, total)
    (work / "layers").mkdir(parents=True, exist_ok=True)
    saved_cfg = work / "config.json"
    fitted = _transfer_settings(cfg) | {"out": str(out)}
    if saved_cfg.exists() and _transfer_settings(json.loads(saved_cfg.read_text())) != fitted:
        raise UserError(
            f"{work} holds layers fitted with other transfer settings: remove it or use the same ones"
        )
    saved_cfg.write_text(json.dumps(asdict(cfg) | {"out": str(out)}, indent=2) + "\n")
    stats_path = work / "layers.json"
    stats: dict[str, Any] = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    layers = [] if prior else model.gravity_layers()  # a start model's layers are already fitted
    if prior:
        stats = prior["layers"]
    todo = [
        a.layer_idx
        for a in layers
        if not (_layer_file(work, a.layer_idx).exists() and str(a.layer_idx) in stats)
    ]
    batches = capture(source, seqs) if todo else []  # every layer's inputs, from the original model
    bar = tqdm(layers, desc="gravitize", file=sys.stderr, disable=not progress)
    for attn in bar:
        i = attn.layer_idx
        f = _layer_file(work, i)
        if i not in todo:
            attn.load_state_dict(load_file(f), strict=False)
            continue
        train = batches[i].rows(slice(0, cfg.num_sequences))
        held = batches[i].rows(slice(cfg.num_sequences, total))
        with torch.no_grad():
            naive = relative_mse(gravity_output(attn, held), held.target)
        scale = qk_scale_for(attn, train, cfg.target_d2)
        scale_qk(attn, scale)
        result = fit_layer(
            attn,
            train,
            held,
            steps=cfg.steps,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            seed=cfg.seed + i,
        )
        mass = torch.nn.functional.softplus(attn.gravity_mass_log.detach())
        stats[str(i)] = {
            "rel_mse_unscaled": naive,
            "qk_scale": scale,
            **result,
            "mass_min": float(mass.min()),
            "mass_max": float(mass.max()),
        }
        save_file(_fitted_state(attn), str(f))
        stats_path.write_text(json.dumps(stats, indent=2) + "\n")
        bar.set_postfix(layer=i, err=f"{result['rel_mse_after']:.3f}")
    texts = eval_text_names(cfg.eval_texts)
    losses = heldout_losses(
        {"source": source, "after_transfer": model}, tok, texts, cfg.seq_len, cfg.eval_max_tokens
    )
    record: dict[str, Any] = {
        "source": str(cfg.source),
        "source_architecture": source.config.model_type,
        "layers": stats,
    }
    if prior:  # the transfer was done by the start model's run: its record and wall time
        record["start_from"] = {"path": str(cfg.start_from), "wall_s": prior.get("wall_s")}
    final = "after_transfer"
    if cfg.distill_steps > 0:
        model, record["distill"] = _distill(model, source, tok, cfg, work)
        after = heldout_losses(
            {"after_distill": model}, tok, texts, cfg.seq_len, cfg.eval_max_tokens
        )
        for text in texts:
            losses[text]["after_distill"] = after[text]["after_distill"]
        final = "after_distill"
    for row in losses.values():
        row["gap_pct"] = 100.0 * (row[final] - row["source"]) / row["source"]
    record["losses"] = losses
    record["samples"] = greedy_samples({"source": source, "gravity": model}, tok)
    meta = {
        "stage": "gravitize",
        "status": "complete",
        "config": asdict(cfg),
        "wall_s": round(time.time() - t0, 1),
        "versions": _versions(),
    }
    with atomic_path(out) as tmp:
        if cfg.ship == "delta":
            record["delta"] = _ship_delta(model, source, tok, cfg, tmp)
        else:
            save_model(model, tok, tmp)
        (tmp / "gravitize.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(work)
    return out


@torch.no_grad()
def _ship_delta(model, source, tok, cfg: GravitizeConfig, tmp: Path) -> dict[str, Any]:
    """Write the delta layout into `tmp`, rebuild the model from it and check it against `model`."""
    from .convert import gravity_from_pretrained
    from .delta import BASE_KEY, apply_delta, base_spec, delta_files, pack_delta, save_delta

    tmp.mkdir(parents=True, exist_ok=True)
    base = gravity_from_pretrained(source, config=model.config)  # packed against, then rebuilt from
    over = Path(cfg.start_from) if cfg.start_from else None
    if over is not None and _is_delta_of(over, cfg.source):
        # a further layer over the start model's delta files, which are kept byte for byte
        from ..model.io import load_model

        earlier = delta_files(over)
        for f in earlier:
            shutil.copyfile(f, tmp / f.name)
        tensors = pack_delta(model, load_model(over)[0], whole=("gravity_mass_log",))
        save_delta(tmp, tensors, index=len(earlier))
    else:
        tensors = pack_delta(model, base)
        save_delta(tmp, tensors)
    config = model.config.to_dict() | {BASE_KEY: base_spec(cfg.source)}
    for key in ("auto_map", "architectures"):
        config.pop(key, None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save_pretrained(tmp)
    apply_delta(base, tmp)
    ids = _sequences(tok, "heldout", FINGERPRINT_TOKENS, 1)
    full, rebuilt = model(input_ids=ids, labels=ids), base(input_ids=ids, labels=ids)
    return {
        "bytes": sum(f.stat().st_size for f in tmp.iterdir()),
        "files": {f.name: f.stat().st_size for f in delta_files(tmp)},
        "tensors": len(tensors),
        "max_logit_diff_rebuilt_vs_full": float((rebuilt.logits - full.logits).abs().max()),
        # what a rebuilt copy must reproduce: loss of the full model on the first heldout tokens
        "fingerprint": {"text": "heldout", "tokens": FINGERPRINT_TOKENS, "loss": float(full.loss)},
    }


def _start_model(cfg: GravitizeConfig, source) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The finished gravitize output to continue from (its transfer is kept) and its record."""
    from ..model.io import load_model

    start = Path(cfg.start_from)
    record_file = start / "gravitize.json"
    if not record_file.is_file():
        raise UserError(
            f"start_from={start} is not a finished gravitize output (no gravitize.json)"
        )
    model, _ = load_model(start)
    theirs, ours = model.config, source.config
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        if getattr(theirs, key) != getattr(ours, key):
            raise UserError(
                f"start_from={start} does not match the source: {key} "
                f"{getattr(theirs, key)} vs {getattr(ours, key)}"
            )
    prior = json.loads(record_file.read_text())
    meta = start / "meta.json"
    prior["wall_s"] = json.loads(meta.read_text()).get("wall_s") if meta.is_file() else None
    return model, prior


def _is_delta_of(directory: Path, source: str) -> bool:
    """Whether `directory` is a delta output packed against this very source file."""
    from .delta import BASE_KEY, sha256

    config = json.loads((directory / "config.json").read_text())
    spec = config.get(BASE_KEY)
    return bool(spec) and spec.get("sha256") == sha256(Path(source).resolve())


def _distill(model, source, tok, cfg: GravitizeConfig, work: Path):
    """Distil once: the result is kept in `work/distilled` so that a rerun skips straight to the end."""
    from ..model.io import load_model, save_model
    from .distill import distill_model

    scratch = work / "distill"
    settings = {k: v for k, v in asdict(cfg).items() if k.startswith("distill_")}
    saved = scratch / "settings.json"
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        raise UserError(
            f"{scratch} holds a distillation with other settings: remove it or use the same ones"
        )
    scratch.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(settings, indent=2) + "\n")
    done = work / "distilled"
    if (done / "distill.json").is_file():
        return load_model(done)[0], json.loads((done / "distill.json").read_text())
    train_ids, val_ids = _distill_data(source, tok, cfg, scratch)
    merged, record = distill_model(
        model,
        source,
        train_ids,
        val_ids,
        seq_len=cfg.distill_seq_len,
        steps=cfg.distill_steps,
        batch_size=cfg.distill_batch_size,
        lr=cfg.distill_lr,
        lora_r=cfg.distill_lora_r,
        distill=cfg.distill_weight,
        scratch=scratch,
        seed=cfg.seed,
    )
    with atomic_path(done) as tmp:
        save_model(merged, tok, tmp, overwrite=True)
        (tmp / "distill.json").write_text(json.dumps(record, indent=2) + "\n")
    return merged, record


def _distill_data(
    source, tok, cfg: GravitizeConfig, scratch: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) token streams: each text of `distill_text` gives its first 90% to training and
    up to its share of DISTILL_VAL_WINDOWS windows from the last 10% to validation. "teacher" is text the
    original model samples (`teacher_text`, cached in `scratch` so that a rerun does not sample again);
    "repeats" or "repeats:SPLIT" are windows that repeat spans of a text (`repeat_windows`), to keep copying
    from context."""
    from ..model.data import encode_text, resolve_text
    from .distill import repeat_windows, teacher_text

    names = [n.strip() for n in cfg.distill_text.split(",") if n.strip()]
    if not names:
        raise UserError("distill_text names no text")
    seq = cfg.distill_seq_len
    windows = max(1, DISTILL_VAL_WINDOWS // len(names))
    train, val = [], []
    for name in names:
        if name == "teacher":
            cached = scratch / "teacher_text.pt"
            if cached.is_file():
                ids = torch.load(cached)
            else:
                ids = teacher_text(source, tok, cfg.distill_teacher_tokens, seed=cfg.seed)
                torch.save(ids, cached.with_suffix(".tmp"))
                cached.with_suffix(".tmp").replace(cached)
        elif name == "repeats" or name.startswith("repeats:"):
            # repeats[:SPLIT] — windows that repeat spans of a text (default the train split)
            base = encode_text(tok, resolve_text(name.partition(":")[2] or "train"))
            count = max(DISTILL_VAL_WINDOWS, base.numel() // seq)
            ids = repeat_windows(base, seq, count, seed=cfg.seed)
        else:
            ids = encode_text(tok, resolve_text(name))
        cut = int(ids.numel() * 0.9) // seq * seq  # whole windows, so texts do not share one
        k = min(windows, (ids.numel() - cut - 1) // seq)
        if cut < seq or k < 1:
            raise UserError(f"distill_text {name!r} is too short for windows of {seq} tokens")
        train.append(ids[:cut])
        val.append(ids[cut : cut + k * seq])
    val.append(ids[cut + k * seq : cut + k * seq + 1])  # the last window's last target
    return torch.cat(train), torch.cat(val)


def _versions() -> dict[str, str]:
    from ..run.artifacts import package_versions

    return package_versions()
