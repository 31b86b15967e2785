"""The bench stage's measurement: dense and sparse through one implementation, three variants, decode KV
bytes through the evicting cache, lengths the model does not allow skipped, the attention clock."""

import pytest
import torch
from tiny_models import local_masks, tiny_model
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from gravity_sparse.errors import UserError
from gravity_sparse.kernels.causal_cpu import cpu_gravity_kernel
from gravity_sparse.stages.s6_bench.bench import (
    AttentionClock,
    _models,
    density_at,
    run_bench,
)
from gravity_sparse.stages.s6_bench.config import BenchConfig
from gravity_sparse.stages.s6_bench.report import bench_markdown
from gravity_sparse.stages.s6_bench.stage import summary_line


@pytest.fixture(scope="module")
def result():
    model = tiny_model(seed=4, max_position_embeddings=256)
    masks = local_masks(2, 4, 8, 16, window=2, drop=((0, 1), (1, 3)), extra=0.0)
    cfg = BenchConfig(
        prefill_lengths=[64, 128, 200, 400], decode_context=[64, 200], decode_tokens=20, repeats=2,
        extend="diagonal",
    )  # fmt: skip
    return run_bench(model, masks, cfg, seed=0), masks


def test_rows_pair_dense_and_sparse_for_every_variant(result):
    res, masks = result
    rows = res["rows"]
    prefill = {(r["variant"], r["model"], r["seq_len"]) for r in rows if r["phase"] == "prefill"}
    for n in (64, 128, 200):
        assert {(v, m, n) for v, m in [("export", "dense"), ("export", "sparse"), ("in-pipeline", "dense"),
                                       ("in-pipeline", "sparse"), ("checkpoint", "dense")]} <= prefill  # fmt: skip
    assert res["skipped"] == [
        {"phase": "prefill", "seq_len": 400, "reason": "longer than the model"}
    ]
    for r in rows:
        assert r["seconds_min"] <= r["seconds"] <= r["seconds_max"] and r["runs"] == 2
        if r["model"] == "sparse":
            assert r["speedup_vs_dense"] > 0
            if r["phase"] == "prefill":
                assert 0 < r["attention_seconds"] and r["attention_vs_dense"] > 0
    # 200 tokens is past the masks' 128: extended by the diagonal rule, density counted there
    r200 = next(r for r in rows if r["seq_len"] == 200 and r["model"] == "sparse")
    assert r200["density"] < density_at(masks, 128) + 0.2


def test_decode_bytes_come_from_the_evicting_cache(result):
    res, _ = result
    decode = [r for r in res["rows"] if r["phase"] == "decode"]
    assert {r["cache"] for r in decode} == {"GravityBlockCache"}
    for r in decode:
        if r["model"] == "sparse" and r["variant"] == "export":
            # a window of 2 blocks and a sink: far less than every block
            assert r["kv_bytes_vs_dense"] < (0.8 if r["seq_len"] == 64 else 0.4), r
            assert r["kv_bytes_peak"] < r["kv_bytes_dynamic_cache"]
    md = bench_markdown(res)
    assert "| decode | 200 | export |" in md and "KV MiB dense" in md
    assert "export sparse/dense" in summary_line(res)


def test_variants_are_what_they_claim():
    model = tiny_model(seed=4)
    masks = local_masks(2, 4, 8, 16, drop=((0, 1),))
    cfg = BenchConfig(prefill_lengths=[64])
    variants, backend = _models(model, masks, cfg, 64)
    export, pipeline = variants["export"], variants["in-pipeline"]
    assert export["sparse"].gravity_layers()[0].num_heads == 3  # head 1 of layer 0 is gone
    assert pipeline["sparse"].gravity_layers()[0].num_heads == 4  # kept, masked
    for pair in (export, pipeline):
        for m in pair.values():
            assert all(a.gravity_kernel is cpu_gravity_kernel for a in m.gravity_layers())
        dense_mask = pair["dense"].gravity_layers()[0].gravity_block_mask
        assert torch.equal(dense_mask, torch.ones_like(dense_mask).tril())
    assert variants["checkpoint"]["dense"] is model
    assert all(a.gravity_block_mask is None for a in model.gravity_layers())


def test_attention_clock_counts_and_restores():
    model = tiny_model(seed=1)
    inner = ALL_ATTENTION_FUNCTIONS["gravity"]
    with AttentionClock() as clock, torch.no_grad():
        model(torch.zeros(1, 32, dtype=torch.long))
    assert clock.seconds > 0
    assert ALL_ATTENTION_FUNCTIONS["gravity"] is inner


def test_config_checks():
    assert BenchConfig(decode_context=[16, 32]).decode_contexts() == [16, 32]
    assert BenchConfig(decode_context=16).decode_contexts() == [16]
    for bad in (dict(decode_context=[]), dict(decode_context="x"), dict(variants=["gpu"])):
        with pytest.raises(UserError):
            BenchConfig(**bad)


def _model_alive_while_timing(monkeypatch, release: bool) -> list[bool]:
    """Run the export-only bench on a model only run_bench holds; whether it was alive at each timing."""
    import gc
    import weakref

    from gravity_sparse.stages.s6_bench import bench

    masks = local_masks(2, 4, 8, 16, drop=((0, 1),))
    cfg = BenchConfig(prefill_lengths=[64], decode_context=32, decode_tokens=2, repeats=1,
                      warmup=0, variants=["export"])  # fmt: skip
    real = bench._timed
    refs: list[weakref.ref] = []
    alive: list[bool] = []

    def spy(*args, **kwargs):
        gc.collect()
        alive.append(refs[0]() is not None)
        return real(*args, **kwargs)

    def make():
        model = tiny_model(seed=5, max_position_embeddings=256)
        refs.append(weakref.ref(model))
        return model

    monkeypatch.setattr(bench, "_timed", spy)
    res = run_bench(make(), masks, cfg, release=release)
    assert {r["variant"] for r in res["rows"]} == {"export"}
    return alive


def test_release_frees_the_callers_model_before_timing(monkeypatch):
    """run_bench(..., release=True) with the export variant alone: the model handed over is gone by the
    time anything is timed (one 6 GB model less at Gravity-2's size); without release it stays."""
    assert _model_alive_while_timing(monkeypatch, release=True) == [False]
    assert _model_alive_while_timing(monkeypatch, release=False) == [True]
