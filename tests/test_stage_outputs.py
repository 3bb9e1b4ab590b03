"""src/dl/stage_outputs.py: a run replaces the files its stage wrote before and nothing else; a file in the
way of an output is refused before anything moves; a run killed while moving leaves only listed files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from loguru import logger

from src.common.errors import UserError
from src.dl.stage_outputs import WRITTEN_LIST, StagedOutputs


@pytest.fixture()
def info_log():
    """Loguru's INFO (and above) messages as text."""
    lines: list[str] = []
    sink = logger.add(lines.append, level="INFO", format="{message}")
    yield lines
    logger.remove(sink)


def run_writing(final, files: dict[str, str], legacy_mark: str | None = None) -> list[str]:
    with StagedOutputs(final, "stage", legacy_mark) as staging:
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
        return staging.commit()


def tree(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rerun_replaces_own_files_and_keeps_the_rest(tmp_path, info_log):
    final = tmp_path / "out"
    run_writing(final, {"labels/a.txt": "1", "labels/b.txt": "1", "predictions.json": "{}"})
    (final / "my_notes.txt").write_text("mine")
    (final / "mine").mkdir()
    (final / "mine" / "keep.txt").write_text("mine too")
    (final / "labels" / "user.txt").write_text("beside the outputs")

    kept = run_writing(final, {"labels/a.txt": "2", "predictions.json": "{}"})
    assert tree(final) == {
        "labels/a.txt": "2", "labels/user.txt": "beside the outputs", "mine/keep.txt": "mine too",
        "my_notes.txt": "mine", "predictions.json": "{}", WRITTEN_LIST: "labels/a.txt\npredictions.json\n",
    }  # fmt: skip
    assert kept == ["labels/user.txt", "mine/keep.txt", "my_notes.txt"]
    assert any("kept 3 file(s)" in line and "my_notes.txt" in line for line in info_log)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left

    run_writing(final, {"predictions.json": "{}"})  # labels/ emptied of outputs: the user's file keeps it
    assert (final / "labels" / "user.txt").exists() and not (final / "labels" / "a.txt").exists()
    run_writing(final, {"masks/a.png": "x", "predictions.json": "{}"})
    run_writing(final, {"predictions.json": "{}"})
    assert not (final / "masks").exists()  # a folder only the stage's files were in goes with them


def test_a_file_in_the_way_is_refused_before_anything_moves(tmp_path):
    final = tmp_path / "out"
    run_writing(final, {"labels/a.txt": "1"})
    (final / "labels" / "b.txt").write_text("the user's")
    (final / "masks").write_text("a file where a folder goes")
    with pytest.raises(UserError, match=r"labels/b\.txt.*not written by stage"):
        run_writing(final, {"labels/a.txt": "2", "labels/b.txt": "2"})
    with pytest.raises(UserError, match="masks: in the way"):
        run_writing(final, {"labels/a.txt": "2", "masks/a.png": "2"})
    assert (final / "labels" / "a.txt").read_text() == "1" and (
        final / "labels" / "b.txt"
    ).read_text() == "the user's"


def test_a_folder_from_before_the_list_is_the_stages_at_its_own_names(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "predictions.json").write_text("old")
    (final / "labels").mkdir()
    (final / "labels" / "a.txt").write_text("old")
    (final / "labels" / "gone.txt").write_text("old run, unknown to the new one")
    run_writing(final, {"predictions.json": "new", "labels/a.txt": "new"}, legacy_mark="predictions.json")
    assert tree(final)["labels/a.txt"] == "new" and tree(final)["labels/gone.txt"].startswith("old run")
    other = tmp_path / "other"  # without the stage's mark, the same files are somebody else's
    (other / "labels").mkdir(parents=True)
    (other / "labels" / "a.txt").write_text("the user's")
    with pytest.raises(UserError, match="not written by stage"):
        run_writing(other, {"labels/a.txt": "new"}, legacy_mark="predictions.json")


def test_a_run_killed_while_moving_leaves_listed_files_only(tmp_path, monkeypatch):
    final = tmp_path / "out"
    run_writing(final, {"a.txt": "1", "b.txt": "1"})
    real_replace = os.replace

    def replace_until_d(src, dst):
        if Path(dst).name == "d.txt":
            raise KeyboardInterrupt  # killed after c.txt was moved in
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_until_d)
    with pytest.raises(KeyboardInterrupt):
        run_writing(final, {"c.txt": "2", "d.txt": "2"})
    monkeypatch.undo()
    assert (final / "c.txt").exists() and (final / "a.txt").exists()  # half done
    listed = set((final / WRITTEN_LIST).read_text().split())
    assert set(tree(final)) - {WRITTEN_LIST} <= listed  # every file there is one the stage knows it wrote
    run_writing(final, {"a.txt": "3"})  # the next run recognises them all
    assert tree(final) == {"a.txt": "3", WRITTEN_LIST: "a.txt\n"}
