"""Atomic writes: the one helper behind every file or folder the package writes as a whole.

`with atomic_path(target) as tmp:` gives a temporary sibling `.NAME.tmp-PID` to write (a file, or a folder
the caller creates); on success it replaces `target` in one rename, on any error it is removed, so an
interrupted write never leaves something that looks finished.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `target`, renamed onto it when the block finishes without error."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if target.is_dir() and tmp.is_dir():
            shutil.rmtree(target)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, target)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
