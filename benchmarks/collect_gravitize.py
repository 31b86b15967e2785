"""Results file of a finished `gravity-sparse gravitize` run: losses, per-layer transfer errors, masses,
distillation, samples and wall time, as `<out>.json` and `<out>.md`.

    python benchmarks/collect_gravitize.py /work/smol-exp/g1 \
        --out benchmarks/results/2026-12-06-gravitize-smol-cpu
    python benchmarks/collect_gravitize.py --smoke --out /tmp/x   # gravitizes a tiny random Llama first
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import provenance

from gravity_sparse.gravitize.report import markdown


def collect(run: Path, args: argparse.Namespace) -> tuple[dict, str]:
    record = json.loads((run / "gravitize.json").read_text())
    meta = json.loads((run / "meta.json").read_text())
    if meta.get("status") != "complete":
        raise SystemExit(f"{run} is not a finished gravitize run (meta.json status)")
    payload = {
        "provenance": provenance({"run": str(run), **vars(args)} | {"gravitize": meta["config"]}),
        "gravitize_meta": meta,
        **record,
    }
    return payload, f"# gravitize: {record['source']}\n\n{markdown(record, meta)}\n"


def _smoke_run(root: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gravity_sparse.gravitize import GravitizeConfig
    from gravity_sparse.gravitize.run import run_gravitize
    from gravity_sparse.model.tokenizer import build_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=258,
    )
    LlamaForCausalLM(cfg).save_pretrained(root / "llama")
    build_tokenizer().save_pretrained(root / "llama")
    gcfg = GravitizeConfig(
        source=str(root / "llama"),
        out=str(root / "g"),
        seq_len=32,
        num_sequences=2,
        heldback_sequences=1,
        steps=2,
        eval_max_tokens=64,
        distill_steps=2,
        distill_seq_len=16,
        distill_teacher_tokens=256,
    )
    return run_gravitize(gcfg, progress=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output path without extension")
    p.add_argument("--smoke", action="store_true", help="collect a tiny run made on the spot")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = _smoke_run(Path(tmp)) if args.smoke else args.run
        if run is None:
            p.error("give a gravitize output directory (or --smoke)")
        payload, md = collect(run, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
