"""benchmarks.recipes' table: val mAP50 against wall and CPU minutes, time to the reference's final mAP50."""

from __future__ import annotations

import json

import pandas as pd

from benchmarks import recipes


def write_run(root, name: str, maps: list[float | None], epoch_s: float, cpu_s: float | None = None) -> None:
    folder = root / "output" / name
    folder.mkdir(parents=True)
    pd.DataFrame(
        {"epoch": range(1, len(maps) + 1), "mAP_50": maps, "epoch_time_s": [epoch_s] * len(maps)}
    ).to_csv(folder / "history.csv", index=False)
    if cpu_s is not None:
        (folder / "cpu.json").write_text(json.dumps({"cpu_s": cpu_s}))


def test_table_times_each_recipe_to_the_reference_final_map(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # data set 7. reference: validated every epoch, 120 s per epoch, ends at 0.6 (seed 1) and 0.4 (seed 2):
    # target 0.5; 480 CPU-s each (as many as wall seconds)
    write_run(tmp_path, "recipe_reference_d7_s1", [0.1, 0.3, 0.5, 0.6], 120, cpu_s=480)
    write_run(tmp_path, "recipe_reference_d7_s2", [0.1, 0.2, 0.3, 0.4], 120, cpu_s=480)
    # defaults: validated every other epoch, 60 s per epoch, passes 0.5 at epoch 4 (4 minutes); CPU 2x wall
    write_run(tmp_path, "recipe_defaults_d7_s1", [None, 0.3, None, 0.7], 60, cpu_s=480)
    write_run(tmp_path, "recipe_defaults_d7_s2", [None, 0.55, None, 0.8], 60, cpu_s=480)
    recipes.table(["defaults", "reference"], [7], [1, 2])
    out = capsys.readouterr().out
    assert "data seed 7: target = the reference's last val mAP50, mean over its seeds: 0.5" in out
    rows = {tuple(line.split(" | ")[:2]): line for line in out.splitlines() if line.startswith("| defaults")}
    assert rows[("| defaults", "1")].endswith("| 4.0 | 8.0 | 4.0 / 8.0 |")  # 0.7 at minute 4
    assert rows[("| defaults", "2")].endswith("| 4.0 | 8.0 | 2.0 / 4.0 |")
    # mean 3 wall minutes against the reference's 8 (0.38x); 6 CPU minutes against 8 (0.75x)
    assert "defaults: last val mAP50 0.750 (mean of 2); reaches 0.500 in 3.0 wall min = 0.38x" in out
    assert "reaches 0.500 in 6.0 CPU min = 0.75x the reference's" in out


def test_table_without_runs_says_how_to_make_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipes.table(["defaults", "reference"], [7], [42])
    assert "--run" in capsys.readouterr().out


def test_reference_pins_what_the_defaults_may_change():
    keys = {item.split("=")[0] for item in recipes.RECIPES["reference"]}
    for key in ("model.num_queries", "train.cls_loss", "train.mosaic.prob", "train.lrs.n.base_lr", "train.amp"):
        assert key in keys
