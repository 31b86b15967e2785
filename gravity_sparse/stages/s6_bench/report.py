"""bench.md: the throughput tables of a bench result (pure formatting, no torch)."""

from __future__ import annotations

from typing import Any


def _tps(r: dict[str, Any]) -> str:
    """tokens/s at the median run, with the range over the fastest and slowest run."""
    tokens = r["tokens_per_s"] * r["seconds"]
    lo, hi = tokens / r["seconds_max"], tokens / r["seconds_min"]
    return f"{r['tokens_per_s']:.1f} ({lo:.1f}–{hi:.1f})"


def _mib(x: int | None) -> str:
    return "–" if x is None else f"{x / 2**20:.2f}"


def bench_markdown(result: dict[str, Any]) -> str:
    dev = result["device"]
    load = result.get("load_average")
    lines = [
        f"### Whole-model throughput ({dev['name']}, {result['path']})",
        "",
        f"density {result['density']:.3f}, heads {result['heads_kept']}/{result['heads_total']}, "
        f"block {result.get('block_size')}, batch {result['batch_size']}, dtype {result['dtype']}; "
        f"median of {result['rows'][0]['runs'] if result['rows'] else 0} runs (fastest–slowest)"
        + (f"; load average {load[0]:.2f}" if load else ""),
        "",
        "Dense keeps every causal block of every head and runs through the same implementation as sparse. "
        "export: the pruned model export writes; in-pipeline: the model with the masks attached; "
        "checkpoint: the model as loaded (dense, no masks).",
        "",
        "| phase | tokens | variant | dense tok/s | sparse tok/s | sparse/dense | sparse/checkpoint | "
        "attention time sparse/dense (÷ density) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = result["rows"]
    for r in (r for r in rows if r["model"] == "sparse"):
        dense = next(
            d
            for d in rows
            if d["model"] == "dense"
            and (d["phase"], d["variant"], d["seq_len"]) == (r["phase"], r["variant"], r["seq_len"])
        )
        vs_ckpt = r.get("speedup_vs_checkpoint")
        attn = r.get("attention_vs_dense")
        attn = "–" if attn is None else f"{attn:.2f} ({attn / r['density']:.2f})"
        lines.append(
            f"| {r['phase']} | {r['seq_len']} | {r['variant']} | {_tps(dense)} | {_tps(r)} | "
            f"{r['speedup_vs_dense']:.2f}× | {'–' if vs_ckpt is None else f'{vs_ckpt:.2f}×'} | {attn} |"
        )
    for r in (r for r in rows if r["variant"] == "checkpoint"):
        lines.append(f"| {r['phase']} | {r['seq_len']} | checkpoint | {_tps(r)} | – | – | – | – |")
    decode = [r for r in rows if r["phase"] == "decode" and r["model"] == "sparse"]
    if decode:
        lines += [
            "",
            "| decode context | variant | KV MiB dense | KV MiB sparse | sparse/dense | DynamicCache MiB (sparse model) |",
            "|---|---|---|---|---|---|",
        ]
        for r in decode:
            dense = next(
                d
                for d in rows
                if d["model"] == "dense"
                and (d["phase"], d["variant"], d["seq_len"])
                == ("decode", r["variant"], r["seq_len"])
            )
            lines.append(
                f"| {r['seq_len']} + {r.get('decoded', '?')} | {r['variant']} | {_mib(dense['kv_bytes_peak'])} | "
                f"{_mib(r['kv_bytes_peak'])} | {r['kv_bytes_vs_dense']:.2f}× | "
                f"{_mib(r['kv_bytes_dynamic_cache'])} |"
            )
    for s in result.get("skipped", []):
        lines.append(f"\nskipped: {s['phase']} {s['seq_len']} ({s['reason']})")
    return "\n".join(lines) + "\n"
