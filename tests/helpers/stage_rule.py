"""The rule every stage keeps, checked by running it twice: files a user put in its output folders survive,
and the second run's outputs equal the first's. A stage is a row of a table (`Stage`); the data stages and
the deployment stages each have one (tests/test_stage_rule_*.py).

    first = run_stages(stages, cfg)                    # returns nothing; then:
    before = snapshot(folder)
    planted = plant_user_files(folder)                 # one file in every folder the stages wrote
    run_stages(stages, cfg)
    assert_user_files_kept(planted)
    assert differences(before, snapshot(folder, planted), volatile, tables) == []
"""

from __future__ import annotations

import fnmatch
import importlib
import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

USER_FILE = "my_notes.txt"
# What differs between two runs of the same export and is masked in `masked` files: a date-time (an
# export's metadata says when it was made) and the numbered names OpenVINO gives nodes it generates
# (Constant_65957, Split_48.0: a process-wide counter).
RUN_DEPENDENT = [
    re.compile(rb"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}"),
    re.compile(rb'(?<=name=")([A-Za-z]+)_\d+(?=[".])'),
]


@dataclass(frozen=True)
class Stage:
    """One stage of the table: its module (run(cfg) is called), the config keys it runs with, and how its
    outputs are compared between two runs."""

    module: str  # e.g. "src.dl.infer"
    overrides: tuple[str, ...] = ()
    volatile: tuple[str, ...] = ()  # globs (relative paths) of files holding times or dates: names only
    masked: tuple[str, ...] = ()  # globs of files compared with RUN_DEPENDENT parts masked
    tables: dict[str, tuple[str, ...]] = field(
        default_factory=dict
    )  # CSV glob -> timing columns, not compared

    @property
    def name(self) -> str:
        return self.module.rsplit(".", 1)[-1]


def run_stages(stages: Iterable[Stage], config: Callable[..., object]) -> dict[str, object]:
    """Each stage's run(config(*its overrides)), in order -> stage name -> what run returned."""
    return {s.name: importlib.import_module(s.module).run(config(*s.overrides)) for s in stages}


def snapshot(folder: Path, leave_out: Iterable[Path] = ()) -> dict[str, bytes]:
    """Relative path -> content of every file under folder, but the ones left out."""
    skipped = {Path(p) for p in leave_out}
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p not in skipped
    }


def plant_user_files(folder: Path) -> dict[Path, str]:
    """A user's file in folder and in every folder below it -> its content."""
    planted = {}
    for place in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        path = place / USER_FILE
        planted[path] = f"notes of the user in {place.relative_to(folder).as_posix() or '.'}\n"
        path.write_text(planted[path], encoding="utf-8")
    return planted


def assert_user_files_kept(planted: dict[Path, str]) -> None:
    lost = [str(p) for p, text in planted.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    assert not lost, f"files of the user removed or changed: {lost}"


def differences(first: dict[str, bytes], second: dict[str, bytes], stages: Iterable[Stage]) -> list[str]:
    """What differs between two runs' files: missing or new names, then contents (volatile files by name
    only; masked ones without their run-dependent parts; tables without their timing columns)."""
    stages = list(stages)
    volatile = [pattern for s in stages for pattern in s.volatile]
    masked = [pattern for s in stages for pattern in s.masked]
    tables = {pattern: columns for s in stages for pattern, columns in s.tables.items()}
    found = [f"only after the first run: {n}" for n in sorted(set(first) - set(second))]
    found += [f"only after the second run: {n}" for n in sorted(set(second) - set(first))]
    for name in sorted(set(first) & set(second)):
        if any(fnmatch.fnmatch(name, pattern) for pattern in volatile):
            continue
        timing = next((cols for pattern, cols in tables.items() if fnmatch.fnmatch(name, pattern)), None)
        a, b = first[name], second[name]
        if any(fnmatch.fnmatch(name, pattern) for pattern in masked):
            a, b = mask_run_dependent(a), mask_run_dependent(b)
        if not (a == b if timing is None else same_table(a, b, timing)):
            found.append(f"differs: {name}")
    return found


def mask_run_dependent(data: bytes) -> bytes:
    for pattern in RUN_DEPENDENT:
        data = pattern.sub(b"<run>", data)
    return data


def same_table(first: bytes, second: bytes, left_out: tuple[str, ...]) -> bool:
    a, b = (pd.read_csv(io.BytesIO(data)) for data in (first, second))
    a, b = (frame.drop(columns=[c for c in left_out if c in frame.columns]) for frame in (a, b))
    return a.equals(b)
