"""A stage's output folder that other files may share: a run replaces only what the stage itself wrote.

    with StagedOutputs(final_folder, stage="infer") as staging:   # a temp folder beside final_folder
        ...write every output under staging...
        staging.commit()                                           # into final_folder, file by file

The folder's `written.txt` lists every file the stage wrote there (relative paths, one a line). commit()
moves the new files in, removes the files of the previous run that this run did not write again, and
leaves everything else (a user's notes, another tool's files) where it is; the log names what it kept. A
file in the way of a new output that the list does not name is never overwritten: the run stops before
moving anything, naming it. While files move, the list names both runs' files, so a run killed midway
leaves nothing that the next run would not recognise as its own.
A folder written before the list existed (it holds the stage's `legacy_mark`, e.g. infer's
predictions.json) is taken to be the stage's at the names this run writes; its other files are kept.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from loguru import logger

from src.common.errors import UserError
from src.common.io import atomic_write_text

WRITTEN_LIST = "written.txt"
SHOWN = 5  # kept files named in the log line


class StagedOutputs:
    """A staging folder for one run's outputs of `final`; see the module doc."""

    def __init__(self, final: Path, stage: str, legacy_mark: str | None = None):
        self.final, self.stage, self.legacy_mark = Path(final), stage, legacy_mark
        self.path: Path | None = None

    def __enter__(self) -> StagedOutputs:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(
            tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".tmp", dir=self.final.parent)
        )
        return self

    def __exit__(self, *_exc) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    def __truediv__(self, name: str | Path) -> Path:
        return self.path / name

    def previous(self) -> tuple[set[str], bool]:
        """(the files the previous run listed, whether the folder predates the list)."""
        listed = self.final / WRITTEN_LIST
        if listed.is_file():
            return set(listed.read_text(encoding="utf-8").splitlines()) - {""}, False
        legacy = self.legacy_mark is not None and (self.final / self.legacy_mark).is_file()
        return set(), legacy

    def commit(self) -> list[str]:
        """Put the staged files in place of the previous run's; returns the files kept that the stage did not
        write (relative paths)."""
        new = sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())
        old, legacy = self.previous()
        self._refuse_collisions(new, old, legacy)
        self.final.mkdir(parents=True, exist_ok=True)
        self._write_list(old | set(new))
        for name in new:
            target = self.final / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path / name, target)
        for name in sorted(old - set(new)):
            remove_with_empty_parents(self.final / name, self.final)
        self._write_list(set(new))
        kept = sorted(
            p.relative_to(self.final).as_posix()
            for p in self.final.rglob("*")
            if p.is_file() and p.relative_to(self.final).as_posix() not in {*new, WRITTEN_LIST}
        )
        if kept:
            shown = ", ".join(kept[:SHOWN]) + (f" and {len(kept) - SHOWN} more" if len(kept) > SHOWN else "")
            logger.info(f"{self.stage}: kept {len(kept)} file(s) in {self.final} it did not write: {shown}")
        return kept

    def _refuse_collisions(self, new: list[str], old: set[str], legacy: bool) -> None:
        for name in new:
            target = self.final / name
            blocked = next((p for p in [*reversed(target.parents), target] if p.is_file()), None)
            if blocked is None or (blocked == target and (name in old or legacy)):
                continue
            raise UserError(
                f"{blocked}: in the way of {self.stage}'s output {name} and not written by {self.stage} "
                f"(not in {self.final / WRITTEN_LIST}): move it elsewhere and run again"
            )

    def _write_list(self, names: set[str]) -> None:
        atomic_write_text(self.final / WRITTEN_LIST, "".join(f"{name}\n" for name in sorted(names)))


def remove_with_empty_parents(path: Path, root: Path) -> None:
    """Remove a file, then its folders up to (not including) root while they are empty."""
    path.unlink(missing_ok=True)
    for parent in path.parents:
        if parent == root or not parent.is_relative_to(root):
            return
        try:
            parent.rmdir()
        except OSError:  # not empty (or already gone)
            return
