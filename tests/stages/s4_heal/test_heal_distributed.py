"""heal in two processes (torchrun, gloo on CPU; Trainer's DDP) against one process, and a rank killed;
FSDP2 from the shipped accelerate config, on CPU through a shim (`fsdp_on_cpu.py`: accelerate only takes
its FSDP path on accelerator devices).

Same global batch (heal.batch_size 4: 2 sequences per rank), same seed, same data order: the ranks'
gradients are averaged by DDP (or reduce-scattered by FSDP2), which is the single-process mean up to
float32 summation order. Stated tolerance on the merged weights: max |Δ| ≤ 1e-6 (weights are O(1);
observed 2.7e-7 for DDP and FSDP2 at this lr 0.05, 3e-8 at lr 0.005), and the same steps, best step and
validation losses (≤ 1e-6): early stopping decides alike.
"""

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from launchers import (
    ACCELERATE,
    ROOT,
    child_env,
    copy_run,
    free_port,
    leftovers,
    run,
    single,
    small_pipeline,
    torchrun,
)
from safetensors.torch import load_file
from tiny_models import random_masks, tiny_model

from gravity_sparse import dist
from gravity_sparse.cli import main
from gravity_sparse.errors import UserError
from gravity_sparse.model.masks import attach_masks
from gravity_sparse.model.tokenizer import build_tokenizer
from gravity_sparse.run.artifacts import read_meta, require_stage
from gravity_sparse.stages.s4_heal.config import HealConfig
from gravity_sparse.stages.s4_heal.heal import heal_model
from gravity_sparse.stages.s4_heal.sharded import is_sharded

PREFIX = ("01_measure", "02_solve")


@pytest.fixture(scope="module")
def solved(tmp_path_factory):
    """A run with measure and solve done (in this process), to heal from."""
    root = tmp_path_factory.mktemp("heal2")
    # a high learning rate moves the masses enough in 4 steps that a teacher with the wrong masses
    # (the student's: what swapping a sharded parameter's .data gives under FSDP) shows (7.6e-5 > 1e-6)
    pipeline = small_pipeline(root, heal={"lr": 0.05})
    for stage in ("measure", "solve"):
        assert main([stage, "-c", str(pipeline)]) == 0
    return root, pipeline


def _merged(run_dir):
    return load_file(next((run_dir / "04_heal" / "merged").glob("*.safetensors")))


@pytest.fixture(scope="module")
def healed_alone(solved):
    """The single-process heal every multi-process heal is compared with."""
    root, pipeline = solved
    copy_run(root / "run", root / "one", PREFIX)
    run(single("heal", "-c", str(pipeline), f"run_dir={root / 'one'}"))
    return root / "one"


def _assert_same_heal(one, many):
    """Same merged weights (max |Δ| ≤ 1e-6), steps, best step, validation losses, trained masses."""
    a, b = _merged(one), _merged(many)
    assert set(a) == set(b)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-6
    start = tiny_model(seed=5).state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert (a["model.layers.0.self_attn.q_proj.weight"] - start).abs().max() > 1e-4  # it trained
    ma, mb = (
        load_file(r / "04_heal" / "adapter" / "gravity_mass_log.safetensors") for r in (one, many)
    )
    for key in ma:
        torch.testing.assert_close(mb[key], ma[key], rtol=0, atol=1e-6)
    ha, hb = (json.loads((r / "04_heal" / "heal.json").read_text()) for r in (one, many))
    assert ha["steps_run"] == hb["steps_run"] == 4 and ha["best_step"] == hb["best_step"]
    assert hb["tokens_seen"] == ha["tokens_seen"] == 4 * 4 * 64  # the token budget is global
    val = [[h["eval_loss"] for h in r["log_history"] if "eval_loss" in h] for r in (ha, hb)]
    assert len(val[0]) == len(val[1]) >= 3
    assert val[1] == pytest.approx(val[0], abs=1e-6)
    assert hb["heldout_after"] == pytest.approx(ha["heldout_after"], abs=1e-6)
    assert read_meta(one / "04_heal")["world_size"] == 1
    assert read_meta(many / "04_heal")["world_size"] == 2
    assert leftovers(many) == []
    return ha, hb


@pytest.mark.slow
def test_two_process_heal_gives_the_single_process_merged_weights(solved, healed_alone):
    root, pipeline = solved
    copy_run(root / "run", root / "two", PREFIX)
    two = run(torchrun(2, "heal", "-c", str(pipeline), f"run_dir={root / 'two'}"))
    ha, hb = _assert_same_heal(healed_alone, root / "two")
    assert (hb["world_size"], hb["per_device_batch_size"], ha["per_device_batch_size"]) == (2, 2, 4)
    assert hb["trained_as"] == "DistributedDataParallel" and not hb["fsdp"]
    assert [line.split()[0] for line in two.stdout.splitlines()] == ["heal"]  # rank 0 prints


@pytest.mark.slow
def test_fsdp2_heal_gives_the_single_process_merged_weights(solved, healed_alone):
    root, pipeline = solved
    copy_run(root / "run", root / "fsdp", PREFIX)
    config = ROOT / "pipelines" / "accelerate" / "fsdp.yaml"
    shim = Path(__file__).with_name("fsdp_on_cpu.py")
    cmd = [*ACCELERATE, "--config_file", str(config), "--num_processes", "2"]
    cmd += ["--main_process_port", str(free_port()), str(shim)]
    run([*cmd, "heal", "-c", str(pipeline), f"run_dir={root / 'fsdp'}"])
    _, hb = _assert_same_heal(healed_alone, root / "fsdp")
    assert hb["fsdp"] and hb["trained_as"].startswith("FSDP")  # fully_shard's module class


def test_fsdp1_is_refused_in_one_line():
    from types import SimpleNamespace

    trainer = SimpleNamespace(
        is_fsdp_enabled=True,
        accelerator=SimpleNamespace(
            state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1))
        ),
    )
    with pytest.raises(UserError, match="fsdp_version: 2"):
        is_sharded(trainer)


@pytest.mark.slow
def test_a_rank_killed_mid_heal_leaves_no_finished_folder(solved):
    root, pipeline = solved
    copy_run(root / "run", root / "killed", PREFIX)
    cmd = torchrun(
        2, "heal", "-c", str(pipeline), f"run_dir={root / 'killed'}", "heal.token_budget=500000"
    )
    log = root / "killed.log"
    with log.open("w") as err_file:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=err_file, text=True
        )
        try:
            deadline = time.time() + 120
            while "it/s, loss=" not in log.read_text():  # rank 0's bar: training steps are done
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            ranks = {}
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    ranks[int(child.environ()["RANK"])] = child
                except (KeyError, psutil.Error):
                    continue
            ranks[1].send_signal(signal.SIGKILL)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = log.read_text()
    assert proc.returncode != 0
    assert "SIGKILL" in err  # torchrun's report names the killed rank
    assert not (root / "killed" / "04_heal").exists()
    assert leftovers(root / "killed") == []  # rank 0 unwound and removed its temporary folder
    assert sorted(p.name for p in (root / "killed").iterdir()) == list(PREFIX)
    with pytest.raises(UserError, match="missing or unfinished"):
        require_stage(root / "killed", "heal")


def test_the_global_batch_must_split_evenly_over_the_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    model = tiny_model()
    attach_masks(model, random_masks())
    cfg = HealConfig(text="heal", seq_len=64, batch_size=4, token_budget=256, lora_r=2)
    with pytest.raises(UserError, match="batch_size 4 is the global batch.*3 processes"):
        heal_model(model, build_tokenizer(), cfg, tmp_path)


def test_keep_best_decides_on_rank_0s_validation_loss(monkeypatch):
    """Every rank takes rank 0's loss (broadcast) before deciding, so all stop at the same step."""
    from types import SimpleNamespace

    from gravity_sparse.stages.s4_heal.heal import KeepBest

    rank0_losses = iter([2.0, 2.5, 2.5])  # what rank 0 saw; this rank saw better numbers
    monkeypatch.setattr(dist, "broadcast", lambda value, src=0: next(rank0_losses))
    keep = KeepBest(torch.nn.Linear(2, 2), patience=2)
    control = SimpleNamespace(should_training_stop=False)
    for step, local in enumerate([2.0, 1.0, 0.5]):
        keep.on_evaluate(None, SimpleNamespace(global_step=step), control, {"eval_loss": local})
    assert keep.best == 2.0 and keep.best_step == 0 and control.should_training_stop
