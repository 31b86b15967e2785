"""Solve benchmark: wall time and MILP gap of the QUBO solve on synthetic fields, QUBO vs baselines.

Cases: Gravity-2 scale (36 layers × 16 heads, 2 KV heads, 32×32 blocks, ≈ 286k variables; targets
≤ 20 s wall on 2 cores and gap ≤ 0.01 % on the layers checked) and the tiny model's size (4 × 8, 2 KV
heads, 8×8 blocks; target ≤ 2 s). The machine may be shared: the load average is recorded before and
after every case. Writes benchmarks/results/<date>-solve-cpu.json and .md.

    python benchmarks/bench_solve.py [--density 0.3] [--exact-layers 3] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

from gravity_sparse.qubo.synthetic import synthetic_field
from gravity_sparse.stages.s2_solve.config import SolveConfig
from gravity_sparse.stages.s2_solve.solve import solve_field

CASES = {
    "gravity2": {"shape": (36, 16, 2, 32), "target_s": 20.0},
    "tiny": {"shape": (4, 8, 2, 8), "target_s": 2.0},
}
MAX_GAP = 1e-4


def run_case(name: str, args: argparse.Namespace) -> dict:
    layers, heads, kv, nqb = CASES[name]["shape"]
    field, meta = synthetic_field(layers, heads, kv, nqb, seed=args.seed)
    cfg = SolveConfig(
        density=args.density,
        seed=args.seed,
        threads=args.threads,
        num_sweeps=args.num_sweeps,
        exact_layers=args.exact_layers,
    )
    load_before = os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = solve_field(field, meta, cfg)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    rep = result.report
    gaps = [c["milp"]["gap"] for c in rep["exact_checks"] if "milp" in c]
    budget_gaps = [c["milp_same_budget"]["gap"] for c in rep["exact_checks"] if "milp" in c]
    return {
        "case": name,
        "shape": {"layers": layers, "heads": heads, "kv_heads": kv, "nqb": nqb},
        "num_variables": rep["num_variables"],
        "num_subproblems": rep["num_subproblems"],
        "solve_seconds": rep["solve_seconds"],
        "solve_cpu_seconds": rep["solve_cpu_seconds"],
        "exact_check_seconds": rep["check_seconds"],
        "wall_seconds_total": wall,
        "cpu_seconds_total": cpu,  # all threads; solve + checks + baselines
        "target_seconds": CASES[name]["target_s"],
        "meets_time": rep["solve_seconds"] <= CASES[name]["target_s"],
        "layers_checked": sorted({c["layer"] for c in rep["exact_checks"] if "milp" in c}),
        "max_gap_qubo": max(gaps) if gaps else None,
        "max_gap_same_budget": max(budget_gaps) if budget_gaps else None,
        "meets_gap": bool(gaps) and max(gaps) <= MAX_GAP and max(budget_gaps) <= MAX_GAP,
        "density": rep["density"],
        "blocks": [rep["blocks_computed"], rep["blocks_target"]],
        "heads_kept": rep["heads_kept"],
        "constraint_violations": rep["constraint_violations"],
        "objective_qubo": rep["objective"],
        "objective_baselines": {k: v["objective"] for k, v in rep["baselines"].items()},
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
    }


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {
            p: version(p) for p in ("numpy", "scipy", "dimod", "dwave-samplers", "dwave-neal")
        },
    }


def markdown(payload: dict) -> str:
    lines = [
        f"# solve benchmark, {payload['date']}",
        "",
        f"`{payload['command']}` on {payload['machine']['processor']}, "
        f"{payload['machine']['cpu_count']} cores ({payload['machine']['platform']}). "
        "The machine is shared; load averages (1, 5, 15 min) are recorded per case.",
        "",
        "| case | variables | solve s (wall) | solve s (CPU, all threads) | target s | max gap (QUBO) | max gap (same budget) | layers checked "
        "| violations | load before → after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in payload["cases"]:
        lines.append(
            f"| {c['case']} | {c['num_variables']} | {c['solve_seconds']:.2f} "
            f"| {c['solve_cpu_seconds']:.2f} | {c['target_seconds']:.0f} "
            f"| {c['max_gap_qubo']:.2e} | {c['max_gap_same_budget']:.2e} | {c['layers_checked']} "
            f"| {c['constraint_violations']} | {c['load_average_before'][0]:.2f} → "
            f"{c['load_average_after'][0]:.2f} |"
        )
    lines += [
        "",
        "Objective (estimated loss increase, nats/token; lower is better) at the same density:",
        "",
    ]
    for c in payload["cases"]:
        objs = {"qubo": c["objective_qubo"], **c["objective_baselines"]}
        lines.append(
            f"- {c['case']} (density {c['density']:.4f}): "
            + ", ".join(f"{k} {v:.4f}" for k, v in objs.items())
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-sweeps", type=int, default=500)
    parser.add_argument("--exact-layers", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(min(args.threads, 2))
    payload = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "cases": [run_case(name, args) for name in args.cases],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{dt.date.today().isoformat()}-solve-cpu"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
