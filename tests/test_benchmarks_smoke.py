"""Every script in benchmarks/ runs in its smoke mode, so a changed default cannot break one unseen.

The smoke modes run the scripts' own code paths at tiny sizes (seconds each); the collectors need a
finished pipeline run and are in the slow tier. A new script without a smoke test fails
`test_every_benchmark_has_a_smoke_test`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SMOKED = {
    "ablate_block_value",
    "bench_attention",
    "bench_cpu_sparse",
    "bench_measure",
    "bench_solve",
    "collect_gravitize",
    "collect_heal",
    "collect_run",
    "collect_sweep",
    "context_gain",
    "dry_run_gravity2",
    "importance_check",
    "position_loss",
    "retrieval_check",
}


def _script(name: str) -> ModuleType:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_smoke_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_has_a_smoke_test():
    scripts = {p.stem for p in BENCHMARKS.glob("*.py") if not p.stem.startswith("_")}
    assert scripts == SMOKED


def _provenance_ok(prov: dict) -> None:
    assert prov["git_revision"] is None or len(prov["git_revision"]) >= 40
    assert prov["config"] and prov["command"]


@pytest.mark.parametrize("structure", ["blocks", "window"])
def test_bench_solve_smoke(tmp_path, structure):
    argv = ["--smoke", "--out", str(tmp_path), "--structure", structure]
    assert _script("bench_solve").main(argv) == 0
    kind = "-window" if structure == "window" else ""
    (result,) = tmp_path.glob(f"*-solve{kind}-cpu.json")
    payload = json.loads(result.read_text())
    _provenance_ok(payload["provenance"])
    (case,) = payload["cases"]
    assert case["case"] == "tiny" and case["constraint_violations"] == 0 and case["meets_gap"]
    assert case["solve_config"]["structure"] == structure
    assert case["blocks"][0] == case["blocks"][1]
    assert "block_size=1024" in payload["long_context"][0]["refused"]


def test_bench_measure_smoke(tmp_path):
    _script("bench_measure").main(["--smoke", "--out", str(tmp_path)])
    payload = json.loads(next(tmp_path.glob("*-measure-cpu.json")).read_text())
    _provenance_ok(payload["provenance"])
    assert [p["sequences"] for p in payload["points"]] == [1, 2]


def test_bench_attention_smoke(tmp_path):
    out = tmp_path / "attention"
    assert _script("bench_attention").main(["--smoke", "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    _provenance_ok(payload["meta"]["provenance"])
    assert payload["rows"]


def test_bench_cpu_sparse_smoke(tmp_path):
    assert _script("bench_cpu_sparse").main(["--smoke", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("*-cpu-sparse-tiny-smoke.json")
    payload = json.loads(result.read_text())
    _provenance_ok(payload["provenance"])
    assert set(payload["results"]) == {"1", "2"}
    rows = payload["results"]["1"]["rows"]
    assert {(r["variant"], r["model"]) for r in rows} == {
        ("export", "dense"), ("export", "sparse"), ("in-pipeline", "dense"),
        ("in-pipeline", "sparse"), ("checkpoint", "dense"),
    }  # fmt: skip
    decode = [r for r in rows if r["phase"] == "decode" and r["model"] == "sparse"]
    assert decode and all(
        r["kv_bytes_peak"] > 0 and r["cache"] == "GravityBlockCache" for r in decode
    )
    assert payload["results"]["1"]["skipped"][0]["seq_len"] == 300  # past the model's positions
    assert (tmp_path / result.name.replace(".json", ".md")).read_text().startswith("# CPU")


def test_bench_cpu_sparse_ceiling_is_amdahls_bound():
    """ceiling = dense time / (sparse time − sparse attention + density × dense attention)."""

    def row(model, variant, seconds, attention=None, **extra):
        return {"phase": "prefill", "variant": variant, "model": model, "seq_len": 512,
                "seconds": seconds, "attention_seconds": attention, **extra}  # fmt: skip

    rows = [
        row("dense", "export", 1.0, 0.4),
        row(
            "sparse",
            "export",
            0.8,
            0.2,
            density=0.35,
            speedup_vs_dense=1.25,
            speedup_vs_checkpoint=1.125,
        ),  # fmt: skip
        row("dense", "checkpoint", 0.9, 0.38),
    ]
    targets = _script("bench_cpu_sparse").check_targets("tiny", {4: {"rows": rows}})
    got = {t["target"]: t["ceiling"] for t in targets if "batch 4" in t["target"]}
    best = 0.8 - 0.2 + 0.35 * 0.4
    assert got["export prefill 512, batch 4, vs dense (every block kept)"] == round(1.0 / best, 3)
    assert got["export prefill 512, batch 4, vs the dense checkpoint"] == round(0.9 / best, 3)
    assert got["never slower: export prefill 512, batch 4"] is None


def test_ablate_block_value_smoke(tmp_path):
    out = tmp_path / "ablate"
    argv = ["-c", str(ROOT / "pipelines" / "tiny.yaml"), "--smoke", "--out", str(out)]
    argv.append("--window-on-qubo-heads")
    assert _script("ablate_block_value").main(argv) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    _provenance_ok(payload["provenance"])
    assert payload["rows"][0]["pattern"] == "dense" and len(payload["rows"]) > 3
    assert any("block_value=grad" in r["pattern"] for r in payload["rows"])
    assert any("row_coupling=1" in r["pattern"] for r in payload["rows"])
    assert any(
        "structure=window cost=kl block_scale=flat sink=always" in r["pattern"]
        for r in payload["rows"]
    )
    rows = {r["pattern"]: r for r in payload["rows"]}
    mine = rows["baseline window on the QUBO's heads"]
    assert mine["heads_kept"] == rows["qubo block_value=profile block_scale=flat"]["heads_kept"]
    assert mine["density"] == pytest.approx(rows["baseline window"]["density"], abs=1e-9)


def test_ablate_block_value_refuses_an_override_among_the_variants(tmp_path, capsys):
    argv = ["-c", str(ROOT / "pipelines" / "tiny.yaml"), "--out", str(tmp_path / "a")]
    with pytest.raises(SystemExit) as e:
        _script("ablate_block_value").main([*argv, "--variants", "kl", "solve.seed=3"])
    assert e.value.code == 2 and "overrides go after `--`" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_dry_run_gravity2_smoke(tmp_path):
    argv = ["--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path)]
    assert _script("dry_run_gravity2").main(argv) == 0
    payload = json.loads(next(tmp_path.glob("*-gravity2-shape-cpu.json")).read_text())
    _provenance_ok(payload["provenance"])
    assert all(s["status"] == "ok" for s in payload["stages"].values())
    assert set(payload["stages"]) == {"measure", "solve", "apply", "export", "bench"}
    assert payload["stages"]["export"]["parity_max_abs_diff_cpu_kernel"] < 1e-2
    # resumable: a second run skips every finished stage
    assert _script("dry_run_gravity2").main(argv) == 0


@pytest.mark.slow
def test_collectors_on_a_pipeline_run(tmp_path, capsys):
    from tiny_models import tiny_model

    from gravity_sparse import save_model
    from gravity_sparse.cli import main
    from gravity_sparse.model.tokenizer import build_tokenizer

    model_dir = save_model(tiny_model(seed=5), build_tokenizer(), tmp_path / "model")
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "model": {"path": str(model_dir), "device": "cpu"},
        "measure": {"seq_len": 64, "block_size": 16, "num_sequences": 2, "ablation_sequences": 1},
        "solve": {"density": 0.5, "num_sweeps": 50},
        "apply": {"seq_len": 64, "max_tokens": 256},
        "heal": {
            "seq_len": 64,
            "batch_size": 2,
            "token_budget": 2 * 64 * 2,
            "eval_every": 1,
            "eval_max_tokens": 256,
        },
        "export": {"parity_len": 32},
        "bench": {"prefill_lengths": [32], "decode_context": 16, "decode_tokens": 2, "repeats": 1},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0, capsys.readouterr().err[-2000:]
    run = tmp_path / "run"
    assert _script("collect_run").main([str(run), str(tmp_path / "collected")]) == 0
    collected = json.loads((tmp_path / "collected.json").read_text())
    assert collected["git_revision"] and collected["far_blocks"]["heads_kept"] > 0
    assert "long-range blocks" in (tmp_path / "collected.md").read_text()
    assert _script("collect_heal").main([str(run), "--out", str(tmp_path / "heal")]) == 0
    assert json.loads((tmp_path / "heal.json").read_text())[0]


def test_collect_gravitize_smoke(tmp_path):
    out = tmp_path / "g"
    assert _script("collect_gravitize").main(["--smoke", "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    _provenance_ok(payload["provenance"])
    assert set(payload["losses"]) == {"heldout", "docstrings"} and payload["layers"]["0"]
    md = out.with_suffix(".md").read_text()
    assert "| heldout |" in md and "| 0 |" in md and "**Prompt:**" in md
    assert "Distillation: 2 steps of 4 × 16 tokens on 'teacher,train' (256 tokens of teacher" in md


def test_importance_check_smoke(tmp_path):
    script = _script("importance_check")
    assert script.main(["--smoke", "--out", str(tmp_path)]) == 0
    payload = json.loads(next(tmp_path.glob("*-importance-check-cpu-smoke.json")).read_text())
    _provenance_ok(payload["provenance"])
    assert payload["agreement"]["heads"] == 16 and -1 <= payload["agreement"]["spearman"] <= 1
    assert all(len(v) == 8 for v in payload["ablation"].values())
    # the comparison itself: identical importances agree fully, reversed ones not at all
    x = torch.rand(4, 8)
    same = script.compare(x, x, [0, 2])
    assert same["spearman"] == 1.0 and same["drop_overlap"] == same["drop_quarter"] == 4
    assert script.compare(x, -x, [0, 2])["spearman"] == -1.0


def test_context_gain_smoke_full_masks_match_dense_and_local_masks_see_nothing(tmp_path):
    from gravity_sparse.model.masks import Masks, write_masks

    nqb, files = 8, {}
    for name, keep in (("full", torch.ones(nqb, nqb)), ("diagonal", torch.eye(nqb))):
        block = torch.tril(keep.bool()).expand(4, 8, nqb, nqb).clone()
        masks = Masks(torch.ones(4, 8, dtype=torch.bool), block, 16, 16 * nqb, name)
        files[name] = str(write_masks(masks, tmp_path / f"{name}.safetensors"))
    argv = ["--smoke", "--out", str(tmp_path), "--masks", files["full"], files["diagonal"]]
    assert _script("context_gain").main([*argv, "--labels", "full", "diagonal"]) == 0
    payload = json.loads(next(tmp_path.glob("*-context-gain-cpu-smoke.json")).read_text())
    _provenance_ok(payload["provenance"])
    dense, full, diagonal = ({g["gap"]: g for g in row["gaps"]} for row in payload["rows"])
    assert [r["label"] for r in payload["rows"]] == ["dense", "full", "diagonal"]
    for gap in (0, 40):
        assert full[gap]["gain"] == pytest.approx(dense[gap]["gain"], abs=1e-3)
    # gap 40: the second copy (tokens 64-71, block 4) cannot reach the first (16-23) block by block
    assert diagonal[40]["gain"] == pytest.approx(0.0, abs=1e-5)
    assert abs(dense[40]["gain"]) > 1e-3  # ... which the dense model does
    assert dense[0]["gain"] > 0.5  # an adjacent copy helps the tiny model (seeded prompts: +1.2)
    assert diagonal[0]["gain"] != pytest.approx(0.0, abs=1e-5)  # gap 0: both copies in block 1


def test_retrieval_check_smoke(tmp_path):
    script = _script("retrieval_check")
    assert script.main(["--smoke", "--out", str(tmp_path)]) == 0
    payload = json.loads(next(tmp_path.glob("*-retrieval-check-cpu-smoke.json")).read_text())
    _provenance_ok(payload["provenance"])
    gravity, ref = payload["models"]
    assert [c["length"] for c in gravity["passkey"]] == [400]
    assert [c["gap"] for c in gravity["induction"]] == [0, 40]
    assert "no gravity_base" in ref["skipped"]  # the tiny model was not gravitized
    out = tmp_path / "noref"
    assert script.main(["--smoke", "--no-reference", "--out", str(out)]) == 0
    payload = json.loads(next(out.glob("*-retrieval-check-cpu-smoke.json")).read_text())
    assert payload["models"][1]["skipped"] == "skipped (--no-reference)"


def test_induction_score_is_one_for_a_copier_and_zero_for_a_model_that_never_copies():
    script = _script("retrieval_check")
    from gravity_sparse import load_model

    _, tok = load_model(None)

    class Copier(
        torch.nn.Module
    ):  # predicts what followed the last earlier occurrence of its 3-gram
        def __init__(self, copy: bool):
            super().__init__()
            self.copy = copy

        def forward(self, input_ids, logits_to_keep):
            ids = input_ids[0].tolist()
            nxt = []
            for i in range(len(ids)):
                gram = ids[max(0, i - 2) : i + 1]
                earlier = [
                    j for j in range(len(gram) - 1, i) if ids[j - len(gram) + 1 : j + 1] == gram
                ] if self.copy else []  # fmt: skip
                nxt.append(ids[earlier[-1] + 1] if earlier else 0)
            logits = torch.nn.functional.one_hot(torch.tensor(nxt), 300).float()[None]
            return type("Out", (), {"logits": logits[:, -logits_to_keep:]})()

    rows = script.induction(Copier(True), tok, segment=24, gaps=[0, 30], trials=3, seed=0)
    assert [r["gap"] for r in rows] == [0, 30] and all(r["accuracy"] > 0.8 for r in rows)
    rows = script.induction(Copier(False), tok, segment=6, gaps=[0], trials=3, seed=0)
    assert rows[0]["accuracy"] < 0.2


def test_far_blocks_counts_long_range_blocks_per_head_and_ranks_them(tmp_path):
    from safetensors.torch import save_file

    from gravity_sparse.model.masks import dense_masks, write_masks

    L, H, n = 2, 4, 8  # far: at least 2 blocks behind the query, key block 0 excluded
    masks = dense_masks(L, H, 16, 16 * n)
    masks.block_mask[:] = torch.eye(n, dtype=torch.bool)
    masks.block_mask[0, 1, 7, 1:6] = True  # 5 far blocks (offsets 6..2)
    masks.block_mask[1, 2, 5, 3] = True  # 1 far block (offset 2)
    masks.block_mask[1, 3, 5, 4] = True  # offset 1: not far
    masks.block_mask[1, 0, :, 0] = True  # the sink: not far
    masks.head_keep[0, 0] = False
    masks.block_mask[0, 0] = False
    (tmp_path / "02_solve").mkdir()
    (tmp_path / "01_measure").mkdir()
    write_masks(masks, tmp_path / "02_solve" / "masks.safetensors")
    mass = torch.tensor([[1.0, 3.0, 1.5, 1.2], [1.1, 1.3, 2.5, 0.9]])
    alpha = torch.tensor([[1.0, 0.2, 1.5, 1.2], [1.1, 1.3, 0.4, 0.9]])
    save_file({"mass": mass, "alpha": alpha}, str(tmp_path / "01_measure" / "field.safetensors"))
    f = _script("collect_run").far_blocks(tmp_path)
    assert f["far_offset_blocks"] == 2 and f["far_blocks_total"] == 6
    assert f["heads_with_far_blocks"] == 2 and f["heads_kept"] == 7
    assert [(t["layer"], t["head"], t["far_blocks"]) for t in f["top"][:2]] == [
        (0, 1, 5),
        (1, 2, 1),
    ]
    assert f["top"][0]["mass_rank"] == 1 and f["top"][0]["alpha_rank_low"] == 1
    assert f["spearman_far_vs_mass"] > 0.5 and f["spearman_far_vs_alpha"] < -0.5


def test_dry_run_names_a_stage_killed_by_a_signal(monkeypatch):
    """A stage the OOM killer ends leaves no stderr: the record must still say what happened."""
    import subprocess

    mod = _script("dry_run_gravity2")
    args = mod.parse_args(["--smoke"])
    args.passthrough = []
    killed = subprocess.CompletedProcess([], returncode=-9, stdout="", stderr="")
    monkeypatch.setattr(mod.subprocess, "run", lambda *a, **k: killed)
    got = mod.in_child(args, "bench")
    assert got["status"] == "failed" and got["error"].startswith("killed by SIGKILL (out of memory")


@pytest.mark.slow
def test_collect_sweep_smoke(tmp_path, capsys):
    """A finished (unhealed, two-pattern) sweep of a small pipeline is collected into table, rows and
    plot; a run without any sweep gives a one-line error and exit 2."""
    from launchers import small_pipeline

    from gravity_sparse.cli import main as cli

    pipeline = small_pipeline(tmp_path)
    sweep = ["sweep.densities=[0.5]", "sweep.head_drops=[0.0]", "sweep.methods=[qubo,window]"]
    sweep += ["sweep.heal=false", "sweep.eval_max_tokens=128"]
    assert cli(["measure", "-c", str(pipeline)]) == 0
    script = _script("collect_sweep")
    out = tmp_path / "collected"
    capsys.readouterr()
    assert script.main(["-c", str(pipeline), "--out", str(out), *sweep]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no finished pattern of this sweep") and err.count("\n") == 1
    assert cli(["sweep", "-c", str(pipeline), *sweep]) == 0
    assert script.main(["-c", str(pipeline), "--out", str(out), *sweep]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in payload["rows"]] == ["qubo", "window"] and payload["missing"] == []
    _provenance_ok(payload["provenance"])
    assert (
        "| qubo |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size
    )


def test_position_loss_smoke(tmp_path):
    script = _script("position_loss")
    assert script.main(["--smoke", "--out", str(tmp_path)]) == 0
    payload = json.loads(next(tmp_path.glob("*-position-loss-cpu-smoke.json")).read_text())
    _provenance_ok(payload["provenance"])
    (row,) = payload["models"]
    assert list(row["bands"]) == ["0-32", "32-64"]
    # the overall loss is the mean of equal-sized bands
    assert row["loss"] == pytest.approx(sum(row["bands"].values()) / 2, rel=1e-5)
    assert script.main(["--edges", "0,10", "--out", str(tmp_path)]) == 2  # not up to --seq-len


def test_position_loss_bands_are_the_losses_at_those_positions():
    """A model whose loss grows with position shows it band by band."""
    script = _script("position_loss")
    vocab = 5

    class Worse(torch.nn.Module):  # uniform at positions < 4, confident and wrong after
        def forward(self, input_ids):
            n = input_ids.shape[1]
            logits = torch.zeros(1, n, vocab)
            logits[0, 4:, 0] = 10.0
            return type("Out", (), {"logits": logits})()

    blocks = torch.ones(2, 9, dtype=torch.long)  # targets are token 1, never 0
    got = script.position_losses(Worse(), blocks, [0, 4, 8])
    assert got["bands"]["0-4"] == pytest.approx(torch.log(torch.tensor(5.0)).item(), rel=1e-5)
    assert got["bands"]["4-8"] > 9.0
