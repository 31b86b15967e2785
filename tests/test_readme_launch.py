"""The README's two-process CPU launch lines ("Scaling out"), run as written.

Each line of that block is run with this interpreter's launcher modules (`torchrun` is
`python -m torch.distributed.run`, `accelerate launch` is `python -m accelerate.commands.launch`), with
`pipelines/tiny.yaml` swapped for a pipeline sized for seconds, and (accelerate only) a free port added so
that the test does not depend on port 29500 being free. Everything else is the README's text.
"""

import re
import shlex

import pytest
from launchers import ACCELERATE, ROOT, TORCHRUN, free_port, leftovers, run, small_pipeline

from gravity_sparse.run.artifacts import read_meta

HEADING = "**Two processes on one CPU machine**"


def readme_cpu_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(re.escape(HEADING) + r".*?```bash\n(.*?)```", text, re.S)
    assert block, f"README has no {HEADING} block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def as_command(line: str, pipeline: str) -> tuple[list[str], dict[str, str]]:
    words = shlex.split(line)
    env = {}
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[0] == "torchrun":
        cmd = [*TORCHRUN, *words[1:]]
    elif words[:2] == ["accelerate", "launch"]:
        cmd = [*ACCELERATE, "--main_process_port", str(free_port()), *words[2:]]
    else:
        raise AssertionError(f"not a launch line: {line}")
    return [pipeline if w == "pipelines/tiny.yaml" else w for w in cmd], env


def test_the_block_has_a_torchrun_and_an_accelerate_line():
    lines = readme_cpu_lines()
    assert [line.split()[1] for line in lines] == ["torchrun", "accelerate"]
    assert all("--nproc_per_node 2" in line or "--num_processes 2" in line for line in lines)


@pytest.mark.slow
def test_readme_cpu_launch_lines_run(tmp_path):
    pipeline = str(small_pipeline(tmp_path))
    run_dir = tmp_path / "run"
    started = {}
    for line in readme_cpu_lines():
        cmd, env = as_command(line, pipeline)
        proc = run(cmd, timeout=300, **env)
        assert proc.stdout.strip(), line  # rank 0 printed its summary lines
        started[line.split()[1]] = read_meta(run_dir / "04_heal")["started"]
    for stage in ("01_measure", "03_apply", "04_heal"):  # data-parallel
        assert read_meta(run_dir / stage)["world_size"] == 2, stage
    assert read_meta(run_dir / "02_solve")["world_size"] == 1  # rank 0 alone
    assert started["accelerate"] >= started["torchrun"]  # the accelerate line healed again
    assert leftovers(run_dir) == []
