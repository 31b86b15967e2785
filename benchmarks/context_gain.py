"""Long-range retrieval that gravity-smol can do: how much a repeated segment gains from its first copy.

    python benchmarks/context_gain.py --model checkpoints/gravity-smol --masks A.safetensors B.safetensors
    python benchmarks/context_gain.py --smoke --out /tmp/smoke     # seconds; the test suite runs it

Gravity-smol cannot copy (passkey 0 %, copy accuracy ≤ 3 %: `retrieval_check.py`), so accuracy cannot
tell sparse patterns apart. What it still does is use a distant copy a little. Each trial draws a segment A
of --segment tokens from the train split's own tokens (shuffled: unpredictable from language) and scores
the second copy of A in two prompts:

    prompt  [filler × pre][A][filler × gap][A]
    control [filler × pre][B][filler × gap][A]       B: another random segment

The gain is the control's loss on the second A minus the prompt's (nats/token, over A's tokens after its
first). Only what the second copy retrieves from the first counts. The first copy starts after --pre
tokens of filler, so a sink column (key block 0) does not hold it. The dense model, and each masks file's
pattern (attached like `gravity-sparse apply`), see the same prompts. Reports the mean gain ± its
standard error per gap. Writes <out>/<date>-context-gain-cpu.{json,md}.
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
from retrieval_check import FILLER  # noqa: E402


@torch.no_grad()
def gains(model, prompts: list[tuple[torch.Tensor, torch.Tensor]], segment: int) -> list[float]:
    """Per trial: loss of the control's last `segment` tokens minus the prompt's (after the first)."""
    out = []
    for prompt, control in prompts:
        nll = []
        for x in (control, prompt):
            logits = model(input_ids=x[None], logits_to_keep=segment).logits[0, :-1]
            nll.append(float(torch.nn.functional.cross_entropy(logits, x[-segment + 1 :])))
        out.append(nll[0] - nll[1])
    return out


def make_prompts(tok, segment: int, pre: int, gap: int, trials: int, seed: int):
    from gravity_sparse.model.data import encode_text, resolve_text

    pool = encode_text(tok, resolve_text("train"))
    filler = encode_text(tok, FILLER * (1 + (pre + gap) // 10))
    gen = torch.Generator().manual_seed(seed + gap)
    prompts = []
    for _ in range(trials):
        a, b = (pool[torch.randint(0, pool.numel(), (segment,), generator=gen)] for _ in range(2))
        head, mid = filler[:pre], filler[pre : pre + gap]
        prompts.append((torch.cat([head, a, mid, a]), torch.cat([head, b, mid, a])))
    return prompts


def summary(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    se = float(t.std() / len(values) ** 0.5) if len(values) > 1 else float("nan")
    return {"gain": float(t.mean()), "se": se, "trials": len(values)}


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        "# Context gain: what a repeated random segment gains from its first copy",
        "",
        f"Model `{c['model']}`; segments of {c['segment']} tokens after {c['pre']} tokens of filler, "
        f"{c['trials']} trials per gap; gain = control loss − prompt loss on the second copy "
        "(nats/token, ± standard error). Command: `" + r["provenance"]["command"] + "`",
        "",
        "| pattern | density | " + " | ".join(f"gap {g}" for g in c["gaps"]) + " |",
        "|---|---|" + "---|" * len(c["gaps"]),
    ]
    for row in r["rows"]:
        cells = " | ".join(f"{x['gain']:+.3f} ± {x['se']:.3f}" for x in row["gaps"])
        density = "1" if row["density"] is None else f"{row['density']:.4f}"
        lines.append(f"| {row['label']} | {density} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="checkpoints/gravity-smol")
    p.add_argument("--masks", nargs="*", default=[], help="masks.safetensors files to score")
    p.add_argument("--labels", nargs="*", default=None, help="one label per masks file")
    p.add_argument("--segment", type=int, default=32)
    p.add_argument("--pre", type=int, default=128, help="filler tokens before the first copy")
    p.add_argument("--gaps", default="400,1500")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="the bundled tiny model, short prompts")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.model, args.trials, args.segment, args.pre, args.gaps = (
            "checkpoints/gravity-tiny", 3, 8, 16, "0,40",
        )  # fmt: skip
    args.gaps = [int(g) for g in args.gaps.split(",")]
    labels = args.labels or [str(m) for m in args.masks]
    if len(labels) != len(args.masks):
        p.error("--labels needs one label per masks file")

    from gravity_sparse.model.io import load_model, require_tokenizer
    from gravity_sparse.model.masks import attach_masks, detach_masks, read_masks

    model, tok = load_model(args.model)
    tok = require_tokenizer(tok, Path(args.model))
    model.eval()
    longest = args.pre + max(args.gaps) + 2 * args.segment
    patterns = [("dense", None)]
    for label, path in zip(labels, args.masks, strict=True):
        masks = read_masks(path)
        if longest > masks.max_length:
            p.error(f"prompts of {longest} tokens are longer than the masks in {path}")
        patterns.append((label, masks))
    prompts = {
        g: make_prompts(tok, args.segment, args.pre, g, args.trials, args.seed) for g in args.gaps
    }
    rows = []
    start = time.perf_counter()
    for label, masks in patterns:
        if masks is not None:
            attach_masks(model, masks)
        row = {
            "label": label,
            "density": None if masks is None else masks.density(),
            "gaps": [
                {"gap": g, **summary(gains(model, prompts[g], args.segment))} for g in args.gaps
            ],
        }
        if masks is not None:
            detach_masks(model)
        rows.append(row)
        print(label, [f"{x['gain']:+.3f}±{x['se']:.3f}" for x in row["gaps"]], flush=True)
    config = dict(vars(args))
    result = {
        "config": config,
        "rows": rows,
        "wall_s": round(time.perf_counter() - start, 1),
        "provenance": provenance(config),
    }
    write_result(args.out, "context-gain-cpu", args.smoke, result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
