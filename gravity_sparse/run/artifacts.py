"""Stage folders: `RUN/NN_stage/` written atomically, with a `meta.json` that makes a run auditable.

A stage writes into a temporary sibling folder and renames it at the end, so an interrupted stage never looks
finished. Under a launcher (several ranks) only rank 0 writes: the other ranks get a scratch folder that is
thrown away, every rank meets at a barrier before rank 0 renames (a rank that died makes that barrier fail,
so nothing is renamed), and again after it (so that every rank can read the finished folder). meta.json records the resolved config, package versions, the git revision, hashes of the inputs,
wall time and status. `is_current` tells whether a finished folder matches a config and inputs (the `run`
command uses it to skip work already done).
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from gravity_sparse import dist
from gravity_sparse.atomic import atomic_path
from gravity_sparse.errors import UserError
from gravity_sparse.stages import STAGES

_PACKAGES = (
    "gravity-sparse",
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "dimod",
    "dwave-neal",
    "dwave-samplers",
    "scipy",
    "networkx",
    "triton",
)


def stage_dirname(stage: str) -> str:
    """'solve' -> '02_solve' (the number is the stage's place in the pipeline)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage}")
    return f"{STAGES.index(stage) + 1:02d}_{stage}"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_revision() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hash_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, sorted); a stage folder hashes its
    meta.json content hash, which already covers what it wrote."""
    if isinstance(path, str) and path.startswith("sha256:"):
        return path  # already a digest (e.g. of a corpus split's text)
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if not p.is_dir():
        raise UserError(f"input {p} does not exist")
    meta = p / "meta.json"
    if meta.is_file():
        content = json.loads(meta.read_text()).get("content_hash")
        if content:
            return content
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(str(f.relative_to(p)).encode())
        h.update(hash_path(f).encode())
    return h.hexdigest()


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_current(folder: Path, config: dict[str, Any], inputs: dict[str, str | Path]) -> bool:
    """True if `folder` is a finished stage made from this config and these inputs."""
    meta = read_meta(folder)
    if meta is None or meta.get("status") != "ok":
        return False
    want = {k: hash_path(v) for k, v in inputs.items()}
    return meta.get("config_hash") == config_hash(config) and meta.get("input_hashes") == want


def require_stage(run_dir: Path, stage: str) -> Path:
    """The finished folder of an earlier stage, or a one-line error saying which command makes it."""
    folder = Path(run_dir) / stage_dirname(stage)
    meta = read_meta(folder)
    if meta is None or meta.get("status") != "ok":
        raise UserError(f"{folder} is missing or unfinished: run `gravity-sparse {stage}` first")
    return folder


class StageFolder:
    """Handle given to a stage body: the temporary folder to write in, and a summary to fill.

    `writer` is False on the ranks other than 0: their `path` is a scratch folder that is thrown away, so a
    stage may skip writing there (what rank 0 writes is the stage's result).
    """

    def __init__(self, tmp: Path, final: Path, writer: bool = True):
        self.path = tmp
        self.final = final
        self.writer = writer
        self.summary: dict[str, Any] = {}


@contextmanager
def stage_folder(
    run_dir: str | Path,
    stage: str,
    *,
    config: dict[str, Any],
    inputs: dict[str, str | Path] | None = None,
    started: float | None = None,
    dirname: str | None = None,
) -> Iterator[StageFolder]:
    """Write a stage atomically. Usage:

    with stage_folder(run, "solve", config=cfg_dict, inputs={"field": path}) as sf:
        ... write files under sf.path ...; sf.summary["density"] = 0.3
    # now RUN/02_solve exists with meta.json (status ok)

    `dirname` names a folder outside the numbered stages (the sweep's `RUN/sweep/`).
    """
    run_dir = Path(run_dir)
    final = run_dir / (dirname or stage_dirname(stage))
    if not dist.is_main():
        with tempfile.TemporaryDirectory(prefix=f"gravity-{final.name}-rank{dist.rank()}-") as tmp:
            yield StageFolder(Path(tmp), final, writer=False)
        dist.barrier()  # rank 0 has all it needs and may rename
        dist.barrier()  # rank 0 renamed: the folder can be read
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    inputs = dict(inputs or {})
    input_hashes = {k: hash_path(v) for k, v in inputs.items()}
    start = time.time() if started is None else started
    with atomic_path(final) as tmp:
        tmp.mkdir()
        handle = StageFolder(tmp, final)
        yield handle
        dist.barrier()  # every rank finished its part (one that died fails this: nothing is renamed)
        content = hashlib.sha256()
        for f in sorted(q for q in tmp.rglob("*") if q.is_file()):
            content.update(str(f.relative_to(tmp)).encode())
            content.update(hash_path(f).encode())
        layout = dist.describe()
        meta = {
            "stage": stage,
            "status": "ok",
            "config": config,
            "config_hash": config_hash(config),
            "inputs": {k: str(v) for k, v in inputs.items()},
            "input_hashes": input_hashes,
            "content_hash": content.hexdigest(),
            "versions": package_versions(),
            "git_revision": git_revision(),
            "command": " ".join(sys.argv),
            "world_size": layout["world_size"],
            "distributed": layout,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start)),
            "wall_time_s": round(time.time() - start, 3),
            "summary": handle.summary,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    dist.barrier()
