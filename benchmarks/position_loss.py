"""Held-out loss of dense models by token position: does a model use its long context or fall apart in it?

    python benchmarks/position_loss.py checkpoints/gravity-smol OTHER_MODEL_DIR [--seq-len 2048]
    python benchmarks/position_loss.py --smoke --out /tmp/smoke        # seconds; the test suite runs it

For each model: the mean next-token loss (nats/token) over the first --windows windows of --seq-len tokens of
the pydoc held-out split (`--text`), in total and per position band (edges --edges). A model fitted on short
windows shows it as loss rising with position; the bands of the same tokens compare models directly.
Writes benchmarks/results/<date>-position-loss-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import provenance, write_result  # noqa: E402


@torch.no_grad()
def position_losses(model, blocks: torch.Tensor, edges: list[int]) -> dict:
    """Mean loss over all targets and per band [edges[i], edges[i+1]) of target positions."""
    nll = []
    for block in blocks:
        logits = model(input_ids=block[None, :-1]).logits[0].float()
        nll.append(torch.nn.functional.cross_entropy(logits, block[1:], reduction="none"))
    per = torch.stack(nll)  # (windows, seq_len)
    bands = {f"{a}-{b}": float(per[:, a:b].mean()) for a, b in zip(edges, edges[1:], strict=False)}
    return {"loss": float(per.mean()), "bands": bands}


def markdown(result: dict) -> str:
    cfg = result["config"]
    bands = list(result["models"][0]["bands"])
    lines = [
        "# Held-out loss by position (nats/token)",
        "",
        f"{cfg['windows']} windows of {cfg['seq_len']} tokens of `{cfg['text']}`, the same tokens for every "
        f"model; a band a–b is the targets at positions a to b − 1.",
        "",
        "| model | all | " + " | ".join(bands) + " |",
        "|---|---|" + "---|" * len(bands),
    ]
    for m in result["models"]:
        lines.append(
            f"| {m['model']} | {m['loss']:.4f} | "
            + " | ".join(f"{v:.3f}" for v in m["bands"].values())
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="model directories (default: the bundled tiny model)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--edges", default="0,256,512,1024,1536,2048")
    p.add_argument("--text", default="heldout")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="the bundled tiny model, short windows")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.models, args.seq_len, args.windows, args.edges = [], 64, 2, "0,32,64"
    edges = [int(x) for x in args.edges.split(",")]
    if edges[0] != 0 or edges[-1] != args.seq_len or edges != sorted(set(edges)):
        print(f"error: --edges must rise from 0 to --seq-len {args.seq_len}", file=sys.stderr)
        return 2

    from gravity_sparse.errors import UserError
    from gravity_sparse.model.data import encode_text, resolve_text, token_blocks
    from gravity_sparse.model.io import load_model, require_tokenizer

    rows = []
    try:
        for path in args.models or [None]:
            start = time.perf_counter()
            model, tok = load_model(path)
            tok = require_tokenizer(tok, path)
            ids = encode_text(tok, resolve_text(args.text))
            blocks = token_blocks(ids, args.seq_len, max_blocks=args.windows)
            if blocks.shape[0] < args.windows:
                raise UserError(
                    f"{args.text} has {blocks.shape[0]} windows of {args.seq_len} tokens, "
                    f"fewer than --windows {args.windows}"
                )
            row = {"model": str(path or "checkpoints/gravity-tiny")}
            row |= position_losses(model.eval(), blocks, edges)
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            del model
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = {k: v for k, v in vars(args).items() if k != "out"}
    result = {"config": config, "models": rows, "provenance": provenance(config)}
    write_result(args.out, "position-loss-cpu", args.smoke, result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
