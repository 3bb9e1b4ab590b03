"""benchmarks.recipes' table: val mAP50 against wall minutes, time to the reference's final mAP50."""

from __future__ import annotations

import pandas as pd

from benchmarks import recipes


def write_history(root, name: str, maps: list[float | None], epoch_s: float) -> None:
    folder = root / "output" / name
    folder.mkdir(parents=True)
    pd.DataFrame(
        {"epoch": range(1, len(maps) + 1), "mAP_50": maps, "epoch_time_s": [epoch_s] * len(maps)}
    ).to_csv(folder / "history.csv", index=False)


def test_table_times_each_recipe_to_the_reference_final_map(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # reference: validated every epoch, 120 s per epoch, ends at 0.6 (seed 1) and 0.4 (seed 2): target 0.5
    write_history(tmp_path, "recipe_reference_s1", [0.1, 0.3, 0.5, 0.6], 120)
    write_history(tmp_path, "recipe_reference_s2", [0.1, 0.2, 0.3, 0.4], 120)
    # ours: validated every other epoch, 60 s per epoch, passes 0.5 at epoch 4 (4 minutes)
    write_history(tmp_path, "recipe_ours_s1", [None, 0.3, None, 0.7], 60)
    write_history(tmp_path, "recipe_ours_s2", [None, 0.55, None, 0.8], 60)
    recipes.table(["ours", "reference"], [1, 2])
    out = capsys.readouterr().out
    assert "mean over seeds: 0.5" in out
    rows = {tuple(line.split(" | ")[:2]): line for line in out.splitlines() if line.startswith("| ours")}
    assert rows[("| ours", "1")].endswith("| 4.0 | 4.0 |")  # 4 epochs of 1 minute; 0.7 at minute 4
    assert rows[("| ours", "2")].endswith("| 4.0 | 2.0 |")
    # mean 3 minutes against the reference's 8: 0.38x
    assert "ours: last val mAP50 0.750 (mean of 2); reaches 0.500 in 3.0 min = 0.38x" in out


def test_table_without_runs_says_how_to_make_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipes.table(["ours", "reference"], [42])
    assert "--run" in capsys.readouterr().out
