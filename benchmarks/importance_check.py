"""Head importance: is the fast first-order estimate (grad) good enough where ablation is too slow?

    python benchmarks/importance_check.py [--model checkpoints/gravity-smol] [--layers 0,5,10,15,20,25]
        [--sequences 2] [--seq-len 2048]
    python benchmarks/importance_check.py --smoke --out /tmp/smoke     # seconds; the test suite runs it

Ablation (zero one head's output, the loss increase in nats/token) of all 270 heads of gravity-smol at
2,048 tokens is slow on the 2-core machine: every layer's heads rerun the layers above it, with attention
computed in chunks (the result file gives the measured time and the estimate for every head). This script
ablates the heads of a sample of layers only, computes the grad importance
(|Σ ∂loss/∂out_h · out_h|, one forward and backward a sequence) on the same sequences, and compares them:
Spearman rank correlation over the sampled heads (all together and within each layer), and the overlap
of the heads each would drop (the lowest quarter of the sample). Text: the first sequences of the pydoc
train split, as in `pipelines/smol.yaml`'s calibration. Writes
benchmarks/results/<date>-importance-check-cpu.{json,md}.
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


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def compare(abl: torch.Tensor, grad: torch.Tensor, layers: list[int]) -> dict:
    """Agreement of two [L, H] importances on the rows `layers`."""
    a, g = abl[layers].flatten(), grad[layers].flatten()
    k = max(1, len(a) // 4)
    low_a, low_g = set(a.argsort()[:k].tolist()), set(g.argsort()[:k].tolist())
    return {
        "heads": len(a),
        "spearman": round(spearman(a, g), 4),
        "spearman_per_layer": {
            str(i): round(spearman(abl[i], grad[i]), 4) for i in layers if abl.shape[1] > 2
        },
        "drop_quarter": k,
        "drop_overlap": len(low_a & low_g),
    }


def run(model_path: str | None, layers: list[int], sequences: int, seq_len: int, text: str) -> dict:
    from gravity_sparse.model.data import encode_text, resolve_text
    from gravity_sparse.model.io import load_model, require_tokenizer
    from gravity_sparse.stages.s1_measure.config import MeasureConfig
    from gravity_sparse.stages.s1_measure.measure import (
        _ablation_importance,
        _grad_importance,
        _Kernels,
        calibration_sequences,
    )

    model, tok = load_model(model_path)
    tok = require_tokenizer(tok, model_path)
    model.eval()
    ids = encode_text(tok, resolve_text(text))
    seqs = calibration_sequences(ids, seq_len, sequences, model.config.max_position_embeddings)
    cfg = MeasureConfig(
        seq_len=seq_len, batch_size=1, importance="both", ablation_sequences=sequences,
        progress=False,
    )  # fmt: skip
    times = {}
    with _Kernels(model) as kernels:
        start = time.perf_counter()
        grad, _, _ = _grad_importance(model, seqs, cfg, kernels)
        times["grad_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        abl = _ablation_importance(model, seqs, cfg, kernels, only=layers)
        times["ablation_sampled_s"] = round(time.perf_counter() - start, 1)
    num_layers = grad.shape[0]
    # ablating layer l reruns layers l..L-1: the cost of all layers from the sampled ones' cost
    per_layer_run = times["ablation_sampled_s"] / sum(num_layers - i for i in layers)
    times["ablation_all_estimate_s"] = round(per_layer_run * num_layers * (num_layers + 1) / 2, 1)
    return {
        "model": str(model_path or "checkpoints/gravity-tiny"),
        "text": text,
        "sequences": sequences,
        "seq_len": seq_len,
        "layers": layers,
        "times": times,
        "agreement": compare(abl, grad, layers),
        "ablation": {str(i): [round(float(x), 5) for x in abl[i]] for i in layers},
        "grad": {str(i): [round(float(x), 5) for x in grad[i]] for i in layers},
    }


def markdown(r: dict) -> str:
    a, t = r["agreement"], r["times"]
    per_layer = ", ".join(f"L{k} {v:+.2f}" for k, v in a["spearman_per_layer"].items())
    return "\n".join(
        [
            "# Head importance: grad against ablation on a sample of layers (CPU)",
            "",
            f"Model `{r['model']}`, {r['sequences']} sequences of {r['seq_len']} tokens of `{r['text']}`, "
            f"layers {r['layers']} ({a['heads']} heads).",
            "",
            f"- Spearman rank correlation over the sampled heads: **{a['spearman']:.3f}**",
            f"- within each layer: {per_layer}",
            f"- the lowest quarter ({a['drop_quarter']} heads), which a 25% head drop would target: "
            f"{a['drop_overlap']} in common",
            f"- time: grad {t['grad_s']} s for all heads; ablation {t['ablation_sampled_s']} s for the "
            f"sample, about {t['ablation_all_estimate_s']} s for every head",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="checkpoints/gravity-smol")
    p.add_argument("--layers", default="0,5,10,15,20,25")
    p.add_argument("--sequences", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--text", default="train")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="the bundled tiny model, 2 × 128 tokens")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.model, args.layers, args.sequences, args.seq_len = None, "0,2", 2, 128
    layers = [int(x) for x in args.layers.split(",")]
    result = run(args.model, layers, args.sequences, args.seq_len, args.text)
    result["provenance"] = provenance(vars(args))
    write_result(args.out, "importance-check-cpu", args.smoke, result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
