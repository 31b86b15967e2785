"""What every benchmark result records: git revision, command line, config, versions, machine, and
peak-memory helpers. Imported by the scripts in this folder (run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gravity_sparse.run.artifacts import git_revision, package_versions  # noqa: E402


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def provenance(config: dict[str, Any]) -> dict[str, Any]:
    """git revision (with -dirty), command line, the config that produced the result, versions, machine."""
    return {
        "git_revision": git_revision(),
        "command": " ".join(["python", *sys.argv]),
        "config": jsonable(config),
        "versions": package_versions(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()),
        },
    }


def write_result(out: str | Path, name: str, smoke: bool, payload: Any, markdown: str) -> Path:
    """`out/<today>-<name>[-smoke].json` and `.md`; returns the stem (the folder is made if missing)."""
    from datetime import date

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"{date.today().isoformat()}-{name}" + ("-smoke" if smoke else ""))
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    return stem


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Current resident memory of this process, MiB (from /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def reset_peak() -> bool:
    """Reset this process's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs); False if not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_mib() -> float:
    """Peak resident memory since the last `reset_peak` (VmHWM), MiB; ru_maxrss where /proc lacks it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mib()
