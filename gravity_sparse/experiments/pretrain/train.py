"""Pretraining a small gravity model from scratch on the bundled corpus (the tiny model's recipe).

`run_pretrain(cfg, out_dir)` trains a `GravityForCausalLM` (gravity attention, learned per-head masses) on
the train split of `model/data.py`, byte tokens, next-token cross entropy over random windows of seq_len + 1
tokens, AdamW with linear warmup then cosine decay. The masses `gravity_mass_log` (one per query head) get
their own learning rate and no weight decay (decay would pull them all to the same value).

Mass init matters: with M ≈ 1 (mass_log 0.5) the score M²/(d² + ε) is nearly flat at the initial
distances (d² ≈ 6 for head_dim 32), attention starts uniform, and training pushes q and k further apart
(d² ≈ 50 after 300 steps), where the score's gradient vanishes: the loss sits at the bigram plateau
(≈ 2.4 nats/byte). With M ≈ 3 (mass_log 3.0) the first layers focus within ~100 steps.

Seeded and resumable: the batch of step t is drawn from a generator seeded by (seed, t), and the model,
optimizer and step are saved to `out_dir/state.pt` every `checkpoint_interval` steps, so a rerun with the
same config and folder continues where the last one stopped and reaches the same weights.

out_dir holds:
    state.pt      resume state (model, optimizer, step, config)
    loss.jsonl    one line per logged step: step, loss (train, nats/token), lr, elapsed_s,
                  heldout_loss at evaluation steps
    loss.png      the curve
    model/        the final model (our format) + tokenizer
    result.json   held-out loss (nats/byte), unigram baseline, masses per layer, sample, wall time
    config.json   the resolved PretrainConfig
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from gravity_sparse.atomic import atomic_path
from gravity_sparse.errors import UserError
from gravity_sparse.experiments.pretrain import plots
from gravity_sparse.experiments.pretrain.config import PretrainConfig
from gravity_sparse.kernels import attach_kernel, detach_kernel
from gravity_sparse.model.configuration_gravity import GravityConfig
from gravity_sparse.model.data import (
    block_loss,
    encode_text,
    eval_loss,
    random_blocks,
    split_text,
    unigram_loss,
)
from gravity_sparse.model.io import save_model
from gravity_sparse.model.modeling_gravity import GravityForCausalLM
from gravity_sparse.model.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    build_tokenizer,
    decode_bytes,
)


def model_config(cfg: PretrainConfig) -> GravityConfig:
    """The GravityConfig of the model `cfg` trains."""
    return GravityConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False,
        gravity_eps=cfg.gravity_eps,
        gravity_mass_init=cfg.mass_init,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    """Multiplier of the peak lr at a step: linear warmup, then cosine down to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with three groups: decayed matrices, undecayed vectors/embeddings, masses (own lr)."""
    groups: dict[str, list[torch.nn.Parameter]] = {"decay": [], "no_decay": [], "mass": []}
    for name, param in model.named_parameters():
        if name.endswith("gravity_mass_log"):
            groups["mass"].append(param)
        elif param.ndim >= 2 and "embed" not in name:
            groups["decay"].append(param)
        else:
            groups["no_decay"].append(param)
    return torch.optim.AdamW(
        [
            {"params": groups["decay"], "weight_decay": cfg.weight_decay, "peak_lr": cfg.lr},
            {"params": groups["no_decay"], "weight_decay": 0.0, "peak_lr": cfg.lr},
            {"params": groups["mass"], "weight_decay": 0.0, "peak_lr": cfg.mass_lr},
        ],
        lr=cfg.lr,
        betas=(0.9, cfg.beta2),
    )


def layer_masses(model: GravityForCausalLM) -> list[list[float]]:
    """M_h = softplus(gravity_mass_log) of every head, per layer."""
    return [
        torch.nn.functional.softplus(attn.gravity_mass_log.detach().float()).tolist()
        for attn in model.gravity_layers()
    ]


@torch.no_grad()
def sample_text(model: GravityForCausalLM, prompt: str, new_tokens: int, seed: int) -> str:
    """A sampled continuation (temperature 0.8, top-k 20), decoded as UTF-8 with replacement."""
    torch.manual_seed(seed)
    ids = encode_text(build_tokenizer(), prompt)[None]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=True,
        temperature=0.8,
        top_k=20,
        pad_token_id=PAD_ID,
    )
    return decode_bytes(out[0].tolist()).decode("utf-8", errors="replace")


def _atomic_save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# settings a resumed run may change: they do not alter what is trained
_RESUME_FREE = ("time_budget_minutes", "num_threads", "out_dir", "log_interval")


def _resume(
    out_dir: Path, cfg: PretrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> int:
    """Load out_dir/state.pt if present; returns the first step still to run."""
    state_path = out_dir / "state.pt"
    if not state_path.exists():
        return 0
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    saved = {k: v for k, v in state["config"].items() if k not in _RESUME_FREE}
    wanted = {k: v for k, v in asdict(cfg).items() if k not in _RESUME_FREE}
    if saved != wanted:
        diff = sorted(k for k in wanted if saved.get(k) != wanted[k])
        raise UserError(
            f"{out_dir} holds a pretraining run with a different config ({', '.join(diff)}); "
            "use another output folder"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log lines past a resumed step (they were written after the last saved state)."""
    if not log_path.exists():
        return
    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
    log_path.write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= step))


def run_pretrain(cfg: PretrainConfig, out_dir: Path, stop_at: int | None = None) -> Path:
    """Train (or resume) into out_dir; returns the final model folder out_dir/model.

    With stop_at < cfg.steps the run saves its resume state after step stop_at and returns the state
    file instead (a later call continues it).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    model = GravityForCausalLM(model_config(cfg))
    optimizer = make_optimizer(model, cfg)
    start = _resume(out_dir, cfg, model, optimizer)
    attach_kernel(
        model, "cpu"
    )  # the block path (every causal block kept) with its hand-written backward
    log_path = out_dir / "loss.jsonl"
    _truncate_log(log_path, start)

    tok = build_tokenizer()
    train_ids = encode_text(tok, split_text("train"))
    heldout_ids = encode_text(tok, split_text("heldout"))
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    budget_s = cfg.time_budget_minutes * 60.0
    t0 = time.monotonic()
    model.train()
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="pretrain", file=sys.stderr)
    done, stopped_early = start, False
    with log_path.open("a") as log:
        for step in bar:
            factor = lr_factor(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            batch = random_blocks(train_ids, cfg.seq_len, cfg.batch_size, generator)
            loss = block_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()

            done = step + 1
            row = {"step": done, "loss": round(loss.item(), 5), "lr": cfg.lr * factor}
            if done % cfg.eval_interval == 0:
                row["heldout_loss"] = round(
                    eval_loss(
                        model, heldout_ids, cfg.seq_len, cfg.eval_batch_size, cfg.eval_tokens
                    )[0],
                    5,
                )
            if done % cfg.log_interval == 0 or "heldout_loss" in row or done == cfg.steps:
                row["elapsed_s"] = round(time.monotonic() - t0, 1)
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            over_budget = budget_s > 0 and time.monotonic() - t0 > budget_s
            if done % cfg.checkpoint_interval == 0 or done == end or over_budget:
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                _atomic_save({**state, "step": done, "config": asdict(cfg)}, out_dir / "state.pt")
            if over_budget and done < cfg.steps:
                tqdm.write(f"time budget reached at step {done}; finishing early", file=sys.stderr)
                stopped_early = True
                break
    bar.close()
    if done < cfg.steps and not stopped_early:
        return out_dir / "state.pt"

    plots.save_loss_plot(log_path, out_dir / "loss.png")
    return finish(model, cfg, out_dir, steps_done=done, wall_s=time.monotonic() - t0)


def finish(
    model: GravityForCausalLM, cfg: PretrainConfig, out_dir: Path, steps_done: int, wall_s: float
) -> Path:
    """Held-out evaluation, sample, result.json and the final model folder (reference attention)."""
    detach_kernel(model)
    model.eval()
    tok = build_tokenizer()
    train_ids = encode_text(tok, split_text("train"))
    heldout_ids = encode_text(tok, split_text("heldout"))
    heldout, num_tokens = eval_loss(model, heldout_ids, cfg.seq_len, cfg.eval_batch_size)
    result = {
        "steps": steps_done,
        "steps_planned": cfg.steps,
        "wall_s_this_run": round(wall_s, 1),
        "heldout_loss_nats_per_byte": heldout,
        "heldout_perplexity": math.exp(heldout),
        "heldout_tokens": num_tokens,
        "unigram_heldout_loss_nats_per_byte": unigram_loss(train_ids, heldout_ids),
        "masses_per_layer": layer_masses(model),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "sample_prompt": cfg.sample_prompt,
        "sample": sample_text(model, cfg.sample_prompt, cfg.sample_tokens, cfg.seed),
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    model_dir = out_dir / "model"
    save_model(model, build_tokenizer(), model_dir)
    print(
        f"pretrain: {steps_done} steps, held-out {heldout:.4f} nats/byte "
        f"(unigram {result['unigram_heldout_loss_nats_per_byte']:.4f}) -> {model_dir}"
    )
    return model_dir
