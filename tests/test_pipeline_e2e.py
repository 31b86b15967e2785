"""End to end on CPU: measure → solve → apply → heal → export → bench → report, caching, bad input.

The whole pipeline runs once per module (`pipeline_run`, slow); a failure there fails every test that
needs it, loudly. Cache invalidation is proven on the cache key in tests/run/test_cache_key.py.
"""

import contextlib
import io
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import tiny_model

from gravity_sparse import save_model
from gravity_sparse.cli import main
from gravity_sparse.model.tokenizer import build_tokenizer

STAGES = ["measure", "solve", "apply", "heal", "export", "bench", "report"]


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model_dir = save_model(tiny_model(seed=5), build_tokenizer(), root / "model")
    cfg = {
        "run_dir": str(root / "run"),
        "model": {"path": str(model_dir), "device": "cpu"},
        "measure": {"seq_len": 128, "block_size": 32, "num_sequences": 4, "ablation_sequences": 2},
        "solve": {"density": 0.5, "head_drop": 0.25, "num_sweeps": 200},
        "apply": {"seq_len": 128, "max_tokens": 1024},
        "heal": {
            "seq_len": 128,
            "batch_size": 4,
            "token_budget": 4 * 128 * 4,
            "eval_every": 2,
            "eval_max_tokens": 1024,
            "lr": 0.005,
        },
        "export": {"dir": str(root / "exported"), "parity_len": 96},
        "bench": {"prefill_lengths": [64], "decode_context": 32, "decode_tokens": 4, "repeats": 1},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path


def _run(capsys, *argv):
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def pipeline_run(run_setup):
    """The whole pipeline, run once; it must succeed (an error here fails every test using it)."""
    root, pipeline = run_setup
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["run", str(pipeline)])
    assert rc == 0, f"the pipeline failed:\n{err.getvalue()[-3000:]}"
    return root, pipeline, out.getvalue()


@pytest.mark.slow
def test_full_pipeline_then_reload_in_plain_transformers(pipeline_run):
    root, pipeline, out = pipeline_run
    assert [line.split()[0] for line in out.strip().splitlines()] == STAGES
    run = root / "run"
    export = json.loads((run / "05_export" / "export.json").read_text())
    # the change is visible first: the pruned model is not the dense one
    assert export["pruned_differs_from_dense_max_abs"] > 1e-3
    assert export["parity_ok"] and export["parity_plain_transformers_max_abs_diff"] <= 1e-4
    masks = load_file(run / "02_solve" / "masks.safetensors")
    assert int(masks["head_keep"].sum()) == 6  # head_drop 0.25 of 8 heads, exactly
    config = json.loads((root / "exported" / "config.json").read_text())
    assert sum(config["num_attention_heads_per_layer"]) == 6
    assert config["gravity_sparsity"]["density"] == pytest.approx(0.5, abs=1e-6)

    heal = json.loads((run / "04_heal" / "heal.json").read_text())
    assert heal["heldout_after"] < heal["heldout_before"]
    trained = load_file(run / "04_heal" / "adapter" / "gravity_mass_log.safetensors")
    start = tiny_model(seed=5).gravity_layers()[0].gravity_mass_log.detach()
    assert not torch.allclose(trained["model.layers.0.self_attn.gravity_mass_log"], start)
    assert (run / "07_report" / "report.md").read_text().count("##") >= 6

    # the exported folder, in a Python that cannot import gravity_sparse
    code = textwrap.dedent(f"""
        import sys
        sys.modules["gravity_sparse"] = None
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        d = {str(root / "exported")!r}
        m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
        ids = tok("def f(x):", return_tensors="pt").input_ids
        g = m.generate(ids, max_new_tokens=20, do_sample=False)
        g2 = m.generate(ids, max_new_tokens=20, do_sample=False, use_cache=False)
        assert torch.equal(g, g2)
        print("OK", g.shape[1])
    """)
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(root / "modules"),
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK" in proc.stdout.split()


@pytest.mark.slow
def test_rerun_is_cached(pipeline_run, capsys):
    root, pipeline, _ = pipeline_run
    rc, out, _ = _run(capsys, "run", str(pipeline))
    assert rc == 0 and out.count("[cached]") == len(STAGES)


@pytest.mark.slow
def test_export_dir_exists_is_refused(pipeline_run, capsys):
    root, pipeline, _ = pipeline_run
    assert (root / "exported").exists()
    rc, _, err = _run(capsys, "export", "-c", str(pipeline))
    assert rc == 2 and "already exists" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize(
    "override,message",
    [
        ("heal.token_budget=0", "heal.token_budget must be positive"),
        ("solve.density=1.5", "solve.density must be in (0, 1]"),
        ("apply.seq_len=4096", "apply.seq_len 4096 is longer than measure.seq_len"),
        ("masks=best", "masks must be one of qubo, greedy"),
        ("heal.kernel=fast", "heal.kernel must be one of auto, reference, cpu"),
    ],
)
def test_bad_config_one_line(run_setup, capsys, override, message):
    _, pipeline = run_setup
    rc, _, err = _run(capsys, "validate", "-c", str(pipeline), override)
    assert rc == 2 and message in err and err.strip().count("\n") == 0


@pytest.mark.slow
def test_masks_from_another_model_shape(pipeline_run, capsys, tmp_path):
    root, pipeline, _ = pipeline_run
    other = save_model(tiny_model(num_hidden_layers=3), build_tokenizer(), tmp_path / "other")
    rc, _, err = _run(capsys, "apply", "-c", str(pipeline), f"model.path={other}")
    assert rc == 2 and "masks are for a model of 2 layers" in err


@pytest.mark.slow
def test_solve_refuses_an_eps_other_than_the_models(pipeline_run, capsys):
    root, pipeline, _ = pipeline_run
    rc, _, err = _run(capsys, "solve", "-c", str(pipeline), "solve.eps=0.5")
    assert rc == 2 and "differs from the model's gravity_eps" in err
    assert err.strip().count("\n") == 0


@pytest.mark.slow
def test_sweep_equal_budgets_and_outputs(pipeline_run, capsys):
    root, pipeline, _ = pipeline_run
    rc, out, err = _run(
        capsys,
        "sweep",
        "-c",
        str(pipeline),
        "sweep.densities=[0.5,0.9]",
        "sweep.head_drops=[0.25]",
        "sweep.methods=[qubo,greedy,window]",
        "sweep.heal_token_budget=2048",
        "sweep.eval_max_tokens=512",
    )
    assert rc == 0, err[-2000:]
    summary = json.loads((root / "run" / "sweep" / "sweep.json").read_text())
    rows = summary["rows"]
    assert [r["method"] for r in rows] == ["qubo", "greedy", "window"]
    assert {(r["density"], r["heads_kept"]) for r in rows} == {
        (0.5, 6)
    }  # same budget for every method
    # healing ran and moved at least one pattern (an unimproved heal keeps the unhealed state)
    assert any(r["loss_healed"] != r["loss_unhealed"] for r in rows)
    assert all(r["heal_steps"] == 4 for r in rows)
    assert summary["skipped"][0]["density"] == 0.9  # 6 of 8 heads cannot reach density 0.9
    assert (root / "run" / "sweep" / "pareto.png").stat().st_size > 10_000
    meta = json.loads((root / "run" / "sweep" / "meta.json").read_text())
    assert meta["status"] == "ok" and meta["summary"]["rows"] == 3
    assert set(meta["input_hashes"]) == {"model", "field", "eval", "heal"}
