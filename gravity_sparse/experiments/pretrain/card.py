"""Publishing a finished pretraining run: the model in our format, its training log and a model card."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from gravity_sparse.errors import UserError
from gravity_sparse.experiments.pretrain.config import PretrainConfig
from gravity_sparse.experiments.pretrain.train import layer_masses, sample_text
from gravity_sparse.model.data import (
    SPLITS,
    encode_text,
    eval_loss,
    split_sizes,
    split_text,
    split_topics,
    unigram_loss,
)
from gravity_sparse.model.io import load_model, save_model
from gravity_sparse.model.tokenizer import build_tokenizer
from gravity_sparse.run.config import build_config

HELDOUT_SLICE_TOKENS = (
    2048  # the fixed held-out slice whose loss the model card quotes (tests check it)
)
CARD_COMMAND = "gravity-sparse pretrain -c pipelines/pretrain-tiny.yaml"
CARD_PROMPTS = ('The "while" statement\n*********************\n\n', "A list is ")


def publish_checkpoint(run_dir: Path, dest: Path, command: str = CARD_COMMAND) -> Path:
    """Copy a finished run's model to dest (our format) with its training log and a model card.

    The numbers on the card are measured again on the model as loaded from the run, with the reference
    attention: held-out loss (all of it and the first HELDOUT_SLICE_TOKENS tokens), unigram baseline,
    per-layer masses and a sample.
    """
    import shutil

    run_dir, dest = Path(run_dir), Path(dest)
    if not (run_dir / "model" / "config.json").is_file():
        raise UserError(f"{run_dir} has no finished model (run the pretraining to the end first)")
    cfg = build_config(PretrainConfig, json.loads((run_dir / "config.json").read_text()))
    model, tok = load_model(run_dir / "model")
    heldout_ids = encode_text(tok, split_text("heldout"))
    heldout, num_tokens = eval_loss(model, heldout_ids, cfg.seq_len, cfg.eval_batch_size)
    slice_loss, slice_tokens = eval_loss(
        model, heldout_ids, cfg.seq_len, cfg.eval_batch_size, HELDOUT_SLICE_TOKENS
    )
    rows = [json.loads(ln) for ln in (run_dir / "loss.jsonl").read_text().splitlines() if ln]
    card = {
        "command": command,
        "steps": rows[-1]["step"],
        "train_minutes": round(rows[-1]["elapsed_s"] / 60.0, 1),
        "heldout_loss_nats_per_byte": round(heldout, 4),
        "heldout_perplexity": round(math.exp(heldout), 3),
        "heldout_tokens": num_tokens,
        "heldout_slice": {"tokens": slice_tokens, "seq_len": cfg.seq_len, "loss": slice_loss},
        "unigram_heldout_loss_nats_per_byte": round(
            unigram_loss(encode_text(tok, split_text("train")), heldout_ids), 4
        ),
        "masses_per_layer": layer_masses(model),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "split_sizes_bytes": split_sizes(),
        "heldout_curve": {r["step"]: r["heldout_loss"] for r in rows if "heldout_loss" in r},
        "samples": {p: sample_text(model, p, cfg.sample_tokens, cfg.seed) for p in CARD_PROMPTS},
    }
    if dest.exists():
        shutil.rmtree(dest)
    save_model(model, build_tokenizer(), dest)
    training = dest / "training"
    training.mkdir()
    for name in ("loss.jsonl", "loss.png", "config.json"):
        shutil.copy2(run_dir / name, training / name)
    (training / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    (dest / "README.md").write_text(model_card(cfg, card))
    return dest


def model_card(cfg: PretrainConfig, card: dict) -> str:
    """The README.md of the bundled model, from its config and measured numbers."""
    from pydoc_data.topics import topics

    sizes, names = card["split_sizes_bytes"], split_topics(topics)
    total = sum(sizes.values())
    split_rows = "\n".join(
        f"| {s} | {len(names[s])} | {sizes[s]:,} | {100 * sizes[s] / total:.1f}% |" for s in SPLITS
    )
    mass_rows = "\n".join(
        f"| {i} | {min(m):.3f} | {max(m):.3f} | {' '.join(f'{x:.2f}' for x in m)} |"
        for i, m in enumerate(card["masses_per_layer"])
    )
    sl = card["heldout_slice"]
    curve = ", ".join(f"{step}: {loss:.3f}" for step, loss in card["heldout_curve"].items())
    samples = "\n\n".join(f"```\n{text}\n```" for text in card["samples"].values())
    return f"""# gravity-tiny

A {card["num_parameters"] / 1e6:.2f} M-parameter gravity-attention decoder (Gravity-2 architecture, scaled
down) trained from scratch on the Python documentation that ships with CPython, byte-level. It is the
bundled default model of `gravity_sparse`: every command runs on it with no download.

Attention score: `M_h² / (‖q_i − k_j‖² + ε)`, `M_h = softplus(gravity_mass_log[h])`, ε = {cfg.gravity_eps},
softmax over the causal prefix; one learned mass per query head.

## How it was made

    {card["command"]}

(this folder was then written by `gravity-sparse pretrain -c pipelines/pretrain-tiny.yaml --publish
checkpoints/gravity-tiny`;
{card["steps"]} steps, {card["train_minutes"]} minutes on a shared 2-core CPU with
`num_threads: {cfg.num_threads}`; loss curve in `training/loss.png`, log in `training/loss.jsonl`, resolved
config in `training/config.json`, every number below in `training/card.json`.)

- Architecture: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} query heads /
  {cfg.num_kv_heads} KV heads (GQA, head_dim {cfg.hidden_size // cfg.num_heads}), MLP
  {cfg.intermediate_size} (SwiGLU), RoPE θ = {cfg.rope_theta:g}, context {cfg.seq_len}, untied
  embeddings, vocabulary 259 (bytes 0..255 + BOS/EOS/PAD).
- Training: AdamW (β = 0.9, {cfg.beta2}), peak lr {cfg.lr:g} ({cfg.warmup_steps} warmup steps, cosine
  to {cfg.min_lr_ratio:g}×), masses lr {cfg.mass_lr:g} without weight decay, weight decay
  {cfg.weight_decay:g}, {cfg.batch_size} random windows of {cfg.seq_len} bytes per step, seed {cfg.seed}.
  The training forward/backward uses the "cpu" attention backend, exact with a hand-written backward
  (`gravity_sparse.model.gravity_block_attention.BlockGravityAttention`; models trained before issue 16
  used its predecessor, a chunked causal kernel); evaluation uses the reference attention.
- Masses start at `mass_log = {cfg.mass_init:g}` (M ≈ {math.log1p(math.exp(cfg.mass_init)):.2f}). With
  the Qwen2 default of M ≈ 1 the attention stayed uniform (q and k drifted apart until the score's
  gradient vanished) and the loss sat at the bigram plateau, 2.41 nats/byte held-out after 300 steps.

## Data

`pydoc_data.topics` (Python {sys.version_info.major}.{sys.version_info.minor}), split by topic
(`gravity_sparse.model.data`: topics in sha256-of-name order fill held-out, calibration, heal up to their byte
targets; the rest is train). Held-out text was never used to train.

| split | topics | bytes | share |
|---|---|---|---|
{split_rows}

## Results

| | nats/byte |
|---|---|
| held-out loss ({card["heldout_tokens"]:,} bytes) | **{card["heldout_loss_nats_per_byte"]:.4f}** (perplexity {card["heldout_perplexity"]:.3f}) |
| unigram byte model (train frequencies) on held-out | {card["unigram_heldout_loss_nats_per_byte"]:.4f} |
| held-out slice: first {sl["tokens"]} tokens, windows of {sl["seq_len"]} | {sl["loss"]:.4f} |

Learned masses `M_h` per layer:

| layer | min | max | all heads |
|---|---|---|---|
{mass_rows}

Held-out loss during training (first {cfg.eval_tokens} held-out bytes only, so not comparable with the
full number above): {curve}.

Samples ({cfg.sample_tokens} bytes, temperature 0.8, top-k 20, seed {cfg.seed}; the prompt is part of
each):

{samples}

## Good for / not good for

Good for: exercising the whole `gravity_sparse` pipeline (measure, solve, apply, heal, export, bench) on a
laptop; its heads have learned, differing locality and masses, so pruning decisions have something real
to find. Not good for: anything that needs a language model: it knows only the style of Python's
reference documentation, has a {cfg.seq_len}-byte context, and makes up plausible-looking but wrong text.
"""
