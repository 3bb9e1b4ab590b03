"""File I/O shared by all stages: atomic writes (never leave a half-written checkpoint or CSV)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask. Linux shows it in /proc (reading it there changes nothing); elsewhere set and
    restore it (a moment where another thread could create a file with the wrong mode, hence the fallback)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write_fn: Callable[[Path], Any]) -> Path:
    """Call write_fn(tmp_path) on a temp file beside `path`, then rename it over `path` in one step.

    The file gets the mode a plain open() would give it (0666 minus the umask): mkstemp makes it 0600,
    which would hide every output from the user's group and from other services reading it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    try:
        write_fn(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_csv(path: str | Path, frame) -> Path:
    """Write a pandas DataFrame as CSV atomically."""
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
