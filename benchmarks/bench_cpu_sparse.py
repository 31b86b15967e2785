"""CPU throughput of the block path: dense vs sparse, prefill and decode, and the KV bytes the cache holds.

Runs the bench stage's measurement (`gravity_sparse.stages.s6_bench.bench.run_bench`: dense keeps every
causal block of every head and goes through the same implementation as sparse; the export, the in-pipeline
model and the dense checkpoint) for each batch size, and checks the issue's targets against what it
measured. The model: `--model PATH` (default: the bundled tiny model) or `--synthetic smol|gravity2` (random
weights in that shape, `--layers` of them). The masks: `--masks FILE` (a masks.safetensors, e.g. from a
pipeline run's 02_solve) or the QUBO solve of a synthetic field at `--density` / `--head-drop`, blocks of
`--block` over `--mask-length` tokens; `--extend diagonal` lets lengths past the masks run.

    python benchmarks/bench_cpu_sparse.py --name tiny --masks runs/tiny/02_solve/masks.safetensors
    python benchmarks/bench_cpu_sparse.py --name smol --model checkpoints/gravity-smol \\
        --masks runs/smol/02_solve/masks.safetensors --extend diagonal \\
        --prefill 512 2048 4096 8192 --decode 2048 4096
    python benchmarks/bench_cpu_sparse.py --name smol-shape --synthetic smol --layers 4 \\
        --density 0.3 --head-drop 0.25 --block 64 --mask-length 4096 --prefill 512 2048 4096 --decode 2048 4096
    python benchmarks/bench_cpu_sparse.py --smoke --out /tmp/smoke      # seconds, CI

Writes `<out>/<date>-cpu-sparse-<name>.json` and `.md` (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, provenance  # noqa: E402

TARGETS = {  # the targets, as (phase, variant, length or None, field, bound, at most?)
    "tiny": [
        ("export at 512, batch 1, vs the dense model", "prefill", 512, 1, 1.15),
        ("export at 512, batch 4, vs the dense model", "prefill", 512, 4, 1.4),
    ],
    "smol": [("prefill 4k, whole model, vs dense", "prefill", 4096, 1, 1.4)],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="tiny", help="results are <date>-cpu-sparse-<name>")
    p.add_argument(
        "--model", default=None, help="model directory (default: the bundled tiny model)"
    )
    p.add_argument("--synthetic", choices=["smol", "gravity2"], default=None)
    p.add_argument("--layers", type=int, default=None, help="layers of the synthetic model")
    p.add_argument(
        "--masks", default=None, help="masks.safetensors (default: a synthetic QUBO solve)"
    )
    p.add_argument("--density", type=float, default=0.3)
    p.add_argument("--head-drop", type=float, default=0.25)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--mask-length", type=int, default=None, help="default: the model's positions")
    p.add_argument("--extend", choices=["none", "diagonal"], default="none")
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    p.add_argument("--decode", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=["export", "in-pipeline", "checkpoint"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="a tiny random model, seconds")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def model_and_masks(args: argparse.Namespace):
    import torch

    from gravity_sparse import load_model
    from gravity_sparse.model.masks import read_masks
    from gravity_sparse.stages.s2_solve.config import SolveConfig
    from gravity_sparse.stages.s6_bench.shapes import synthetic_model_and_masks

    if args.smoke:
        from gravity_sparse.model.configuration_gravity import GravityConfig
        from gravity_sparse.model.modeling_gravity import GravityForCausalLM
        from gravity_sparse.stages.s6_bench.shapes import SHAPES

        torch.manual_seed(0)
        cfg = GravityConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, vocab_size=259, max_position_embeddings=256, pad_token_id=258,
        )  # fmt: skip
        SHAPES["smoke"] = (lambda n: cfg, 2)
        solve = SolveConfig(density=0.4, head_drop=0.25, num_sweeps=20, bisection_rounds=1)
        masks = synthetic_model_and_masks("smoke", 2, solve, block_size=16, seq_len=128)[1]
        return GravityForCausalLM(cfg).eval(), None, masks, "random tiny model (smoke)"
    if args.synthetic:
        solve = SolveConfig(density=args.density, head_drop=args.head_drop)
        length = args.mask_length or {"smol": 8192, "gravity2": 32768}[args.synthetic]
        model, masks = synthetic_model_and_masks(
            args.synthetic, args.layers, solve, block_size=args.block, seq_len=length
        )
        return model, None, masks, f"random weights in {args.synthetic}'s shape"
    model, tok = load_model(args.model)
    if args.masks is None:
        raise SystemExit("--masks is needed with a model directory (or use --synthetic)")
    return model, tok, read_masks(args.masks), str(args.model or "checkpoints/gravity-tiny")


def check_targets(name: str, results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets against the rows measured (ratios within one run)."""
    out = []

    def rows(batch):
        return results.get(batch, {}).get("rows", [])

    def find(batch, phase, variant, model, n):
        return next(
            (
                r
                for r in rows(batch)
                if (r["phase"], r["variant"], r["model"], r["seq_len"])
                == (phase, variant, model, n)
            ),
            None,
        )

    def add(what, value, bound, at_most=False, ceiling=None):
        if value is None:
            return
        met = value <= bound if at_most else value >= bound
        out.append({"target": what, "measured": round(value, 3), "bound": bound,
                    "at_most": at_most, "met": met,
                    "ceiling": None if ceiling is None else round(ceiling, 3)})  # fmt: skip

    def ceiling(batch, variant, n, against="dense"):
        """The whole-model speedup if sparse attention took exactly density × the dense attention time
        and everything else stayed as measured (Amdahl): what block skipping could give at best."""
        r = find(batch, "prefill", variant, "sparse", n)
        d = find(batch, "prefill", variant if against == "dense" else "checkpoint", "dense", n)
        if (
            r is None
            or d is None
            or None in (r.get("attention_seconds"), d.get("attention_seconds"))
        ):
            return None
        dense_attention = find(batch, "prefill", variant, "dense", n)["attention_seconds"]
        best = r["seconds"] - r["attention_seconds"] + r["density"] * dense_attention
        return d["seconds"] / best if best > 0 else None

    if name.startswith("tiny"):
        for batch, bound in ((1, 1.15), (4, 1.4)):
            r = find(batch, "prefill", "export", "sparse", 512)
            if r is not None:
                add(
                    f"export prefill 512, batch {batch}, vs the dense checkpoint",
                    r.get("speedup_vs_checkpoint"),
                    bound,
                    ceiling=ceiling(batch, "export", 512, against="checkpoint"),
                )
                add(
                    f"export prefill 512, batch {batch}, vs dense (every block kept)",
                    r["speedup_vs_dense"],
                    bound,
                    ceiling=ceiling(batch, "export", 512),
                )
        for batch, res in results.items():
            for r in res["rows"]:
                if r["model"] == "sparse" and r["phase"] == "prefill":
                    add(
                        f"never slower: {r['variant']} prefill {r['seq_len']}, batch {batch}",
                        r["speedup_vs_dense"],
                        1.0,
                    )
    if name.startswith("smol"):
        r = find(1, "prefill", "export", "sparse", 4096)
        if r is not None:
            add("prefill 4k: whole model vs dense", r["speedup_vs_dense"], 1.4,
                ceiling=ceiling(1, "export", 4096))  # fmt: skip
            if r.get("attention_vs_dense") is not None:
                add("prefill 4k: attention time / (density × dense attention time)",
                    r["attention_vs_dense"] / r["density"], 1.3, at_most=True)  # fmt: skip
        r = find(1, "decode", "export", "sparse", 4096)
        if r is not None:
            add("decode at 4k context vs dense", r["speedup_vs_dense"], 1.2)
            add("KV cache at 4k vs dense", r["kv_bytes_vs_dense"], 0.5, at_most=True)
    return out


def markdown(payload: dict[str, Any]) -> str:
    from gravity_sparse.stages.s6_bench.report import bench_markdown

    prov = payload["provenance"]
    lines = [
        f"# CPU block-sparse throughput: {payload['name']}",
        "",
        f"model: {payload['model']}; masks: {payload['masks']}; threads {payload['threads']}; "
        f"load average at the start {prov['machine']['load_average']}; git {prov['git_revision']}",
        f"command: `{prov['command']}`",
        "",
    ]
    for batch, result in payload["results"].items():
        lines += [f"## batch {batch}", "", bench_markdown(result)]
    if payload["targets"]:
        lines += [
            "## Targets (issue 16)",
            "",
            "ceiling: the whole-model speedup if the sparse attention took exactly density × the dense "
            "attention time and the rest of the model stayed as measured (Amdahl's bound on block "
            "skipping at this attention share); a target above it needs a faster rest, not better "
            "skipping.",
            "",
            "| target | measured | bound | met | ceiling |",
            "|---|---|---|---|---|",
        ]
        for t in payload["targets"]:
            sign = "≤" if t["at_most"] else "≥"
            ceil = "–" if t.get("ceiling") is None else f"{t['ceiling']:.3f}"
            lines.append(
                f"| {t['target']} | {t['measured']:.3f} | {sign} {t['bound']} "
                f"| {'yes' if t['met'] else 'no'} | {ceil} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from gravity_sparse.model.masks import read_masks_method  # noqa: F401 (fail early on imports)
    from gravity_sparse.stages.s6_bench.bench import run_bench
    from gravity_sparse.stages.s6_bench.config import BenchConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.prefill, args.decode, args.decode_tokens = [64, 300], [48], 3
        args.repeats, args.warmup, args.batch, args.name = 2, 1, [1, 2], args.name + "-smoke"
    model, tok, masks, source = model_and_masks(args)
    prompt = None
    if tok is not None:
        from gravity_sparse.model.data import split_text

        prompt = torch.tensor(tok(split_text("heldout"))["input_ids"][:20000])
    results = {}
    for batch in args.batch:
        cfg = BenchConfig(
            prefill_lengths=args.prefill, batch_size=batch, decode_context=args.decode,
            decode_tokens=args.decode_tokens, repeats=args.repeats, warmup=args.warmup,
            extend=args.extend, variants=args.variants,
        )  # fmt: skip
        print(f"batch {batch} …", file=sys.stderr, flush=True)
        results[batch] = run_bench(model, masks, cfg, prompt_ids=prompt)
    masks_desc = (
        f"{args.masks or 'synthetic QUBO solve'} (method {masks.method}, density {masks.density():.3f}, "
        f"heads {masks.heads_kept()}/{masks.head_keep.numel()}, block {masks.block_size}, "
        f"length {masks.max_length}, extend {args.extend})"
    )
    payload = {
        "name": args.name,
        "model": source,
        "masks": masks_desc,
        "threads": torch.get_num_threads(),
        "results": {str(b): r for b, r in results.items()},
        "targets": check_targets(args.name, results),
        "provenance": provenance(vars(args)),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{dt.date.today().isoformat()}-cpu-sparse-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(payload))
    print(stem.with_suffix(".md").read_text())
    print(f"wrote {stem}.json / .md (load average now {os.getloadavg()[0]:.2f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
