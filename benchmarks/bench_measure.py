"""Benchmark of the measure stage on CPU: calibration tokens/s, and peak memory against calibration tokens.

    python benchmarks/bench_measure.py [--sequences 2,4,8,16,32] [--batch-size 4] [--threads 2]
    python benchmarks/bench_measure.py --smoke --out /tmp/smoke     # seconds; the test suite runs it

Model: `checkpoints/gravity-tiny` when it exists, else a random model of the same shape (4 layers,
hidden 256, 8 query / 2 KV heads, seq_len 512); the output says which. Text: the calibration split of the
bundled corpus (bytes as tokens).

Every point runs in a fresh subprocess so that its peak resident memory (ru_maxrss) belongs to that run
alone; memory is reported as peak RSS minus the RSS after the model is loaded. Streaming means this stays
flat as the number of calibration tokens grows. Throughput is that of the field pass (the part that
scales with the calibration text); the importance passes are timed apart (ablation uses a fixed number
of sequences). Writes benchmarks/results/<date>-measure-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import provenance  # noqa: E402

from gravity_sparse.model.configuration_gravity import GravityConfig  # noqa: E402
from gravity_sparse.model.modeling_gravity import GravityForCausalLM  # noqa: E402
from gravity_sparse.stages.s1_measure.config import MeasureConfig  # noqa: E402
from gravity_sparse.stages.s1_measure.measure import run_measure  # noqa: E402

CHECKPOINT = ROOT / "checkpoints" / "gravity-tiny"


def build_model(kind: str) -> tuple[GravityForCausalLM, str]:
    """(model, description): the tiny checkpoint, a random model of its shape, or one Gravity-2 layer."""
    if kind == "tiny" and (CHECKPOINT / "config.json").is_file():
        from gravity_sparse.model.io import load_model

        model, _ = load_model(CHECKPOINT)
        return model, f"trained checkpoint {CHECKPOINT.relative_to(ROOT)}"
    torch.manual_seed(0)
    if kind == "gravity2-layer":
        # one layer of Gravity-2's shape: the attention of one layer is what must stream at 4k context
        shape = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=2, head_dim=128)
        config = GravityConfig(
            **shape,
            num_hidden_layers=1,
            intermediate_size=2048,
            vocab_size=259,
            max_position_embeddings=4096,
        )
        return GravityForCausalLM(
            config
        ).eval(), "random model, 1 layer of Gravity-2 shape (16/2 heads, d 128)"
    config = GravityConfig(
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=4,
        intermediate_size=768,
        vocab_size=259,
        max_position_embeddings=512,
    )
    return GravityForCausalLM(
        config
    ).eval(), "random model of gravity-tiny's shape (checkpoint absent)"


def calibration_ids() -> torch.Tensor:
    from gravity_sparse.model.data import split_text

    return torch.tensor(list(split_text("calibration").encode("utf-8")), dtype=torch.long)


def rss() -> int:
    return psutil.Process().memory_info().rss


def child(args: argparse.Namespace) -> dict:
    """One measured run in this process: returns timings and memory."""
    torch.set_num_threads(args.threads)
    model, description = build_model(args.model)
    ids = calibration_ids()
    if args.model == "gravity2-layer":
        ids = ids.repeat(
            -(-args.sequences * args.seq_len // ids.numel())
        )  # enough text for 4k windows
    cfg = MeasureConfig(
        seq_len=args.seq_len,
        block_size=args.block_size,
        num_sequences=args.sequences,
        batch_size=args.batch_size,
        importance=args.importance,
        ablation_sequences=1,
        chunk_elements=args.chunk_elements,
        plots=False,
        progress=False,
    )
    base = rss()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = run_measure(model, ids, cfg, Path(out))
        wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "model": description,
        "sequences": summary["num_sequences"],
        "tokens": summary["num_tokens"],
        "field_tokens_per_s": summary["tokens_per_s"],
        "timings_s": summary["timings_s"],
        "wall_s": round(wall, 3),
        "rss_after_load_mib": round(base / 2**20, 1),
        "peak_rss_mib": round(peak / 2**20, 1),
        "peak_minus_load_mib": round((peak - base) / 2**20, 1),
        "loss": summary["loss"],
    }


def run_point(args: argparse.Namespace, sequences: int, model: str, seq_len: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--model",
        model,
        "--sequences",
        str(sequences),
        "--seq-len",
        str(seq_len),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--block-size",
        str(args.block_size),
        "--importance",
        args.importance,
        "--chunk-elements",
        str(args.chunk_elements),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"benchmark point failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    lines = [
        f"# measure benchmark ({result['date']}, CPU)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['cpu']} ({result['machine']['threads']} torch threads), "
        f"torch {result['machine']['torch']}, Python {result['machine']['python']}  ",
        f"Model: {result['points'][0]['model']}; seq_len {result['seq_len']}, batch {result['batch_size']}, "
        f"importance `{result['importance']}` (ablation on 1 sequence)",
        "",
        "| sequences | tokens | field tok/s | field s | grad s | ablation s | peak RSS MiB | peak − load MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        t = p["timings_s"]
        lines.append(
            f"| {p['sequences']} | {p['tokens']} | {p['field_tokens_per_s']} | {t['field_s']} | "
            f"{t.get('grad_s', '–')} | {t.get('ablation_s', '–')} | {p['peak_rss_mib']} | "
            f"{p['peak_minus_load_mib']} |"
        )
    if result.get("gravity2_layer"):
        lines += [
            "",
            f"Gravity-2-shaped layer at {result['gravity2_seq_len']} tokens "
            f"(chunk_elements {result['chunk_elements']}; one layer's dense fp32 probabilities would be "
            f"{16 * result['gravity2_seq_len'] ** 2 * 4 / 2**20:.0f} MiB per sequence):",
            "",
            "| sequences | tokens | field tok/s | peak RSS MiB | peak − load MiB |",
            "|---:|---:|---:|---:|---:|",
        ]
        for p in result["gravity2_layer"]:
            lines.append(
                f"| {p['sequences']} | {p['tokens']} | {p['field_tokens_per_s']} | {p['peak_rss_mib']} | "
                f"{p['peak_minus_load_mib']} |"
            )
    lines += ["", result["verdict"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", default="2,4,8,16,32")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--importance", default="both", choices=["ablation", "grad", "both"])
    parser.add_argument("--chunk-elements", type=int, default=1 << 24)
    parser.add_argument(
        "--gravity2-sequences", default="", help="e.g. 1,2: also a Gravity-2 layer at 4k"
    )
    parser.add_argument("--model", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--smoke", action="store_true", help="1 and 2 short sequences in-process, seconds (tests)"
    )
    args = parser.parse_args(argv)
    if args.child:
        args.sequences = int(args.sequences)
        print(json.dumps(child(args)))
        return
    if args.smoke:
        args.sequences, args.seq_len, args.block_size = "1,2", 64, 16
        args.batch_size, args.importance, args.gravity2_sequences = 1, "grad", ""

    points = []
    for n in map(int, args.sequences.split(",")):
        if args.smoke:  # in this process: memory numbers are not per point
            point_args = argparse.Namespace(**{**vars(args), "sequences": n})
            points.append(child(point_args))
        else:
            points.append(run_point(args, n, "tiny", args.seq_len))
        print(json.dumps(points[-1]), file=sys.stderr)
    g2 = []
    for n in filter(None, args.gravity2_sequences.split(",")):
        g2_args = argparse.Namespace(**{**vars(args), "importance": "grad"})
        g2.append(run_point(g2_args, int(n), "gravity2-layer", 4096))
        print(json.dumps(g2[-1]), file=sys.stderr)
    growth = points[-1]["peak_minus_load_mib"] - points[0]["peak_minus_load_mib"]
    ratio = points[-1]["tokens"] / points[0]["tokens"]
    verdict = (
        f"Peak memory above the loaded model changes by {growth:+.1f} MiB while the calibration tokens "
        f"grow {ratio:.0f}× ({points[0]['tokens']} → {points[-1]['tokens']})."
    )
    result = {
        "benchmark": "measure",
        "date": date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": psutil.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "importance": args.importance,
        "chunk_elements": args.chunk_elements,
        "points": points,
        "gravity2_layer": g2,
        "gravity2_seq_len": 4096,
        "verdict": verdict,
        "smoke": args.smoke,
        "provenance": provenance(vars(args)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{result['date']}-measure-cpu"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
