"""The training stage around the trainer: a bad pretrained file refused in one line, a run stopped by Ctrl-C
or SIGTERM before its first checkpoint putting the run it replaced back, and the logger choice."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from loguru import logger

from src.common.config import load_config
from src.common.errors import ConfigError, UserError
from src.dl.train.run import run, run_as_stage
from src.dl.train.settings import TrainSettings
from tests.helpers.train_data import make_detection_data, train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_detection_data(tmp_path_factory.mktemp("data"), {"train": 4, "val": 1})


@pytest.fixture
def warnings_logged():
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(message.record["message"]), level="WARNING")
    yield messages
    logger.remove(sink)


def test_a_missing_official_or_corrupt_pretrained_file_is_refused_in_one_line(tmp_path, data_dir):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    cut = tmp_path / "cut.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, cut)
    cut.write_bytes(cut.read_bytes()[:300])
    deim = tmp_path / "deim_dfine_hgnetv2_n_coco.pth"  # an official DEIM name, not downloaded
    cases = {
        tmp_path / "nowhere.pt": "does not exist; point it at an existing checkpoint",
        tmp_path / "pretrained" / "dfine_s_coco.pth": "official release file: download https://github.com/",
        deim: "official release file: download https://drive.google.com/",
        corrupt: "is not a usable checkpoint",
        cut: "is not a usable checkpoint",
    }
    for path, expected in cases.items():
        with pytest.raises(UserError) as refusal:
            run(train_config(tmp_path, data_dir, f"train.pretrained_model_path={path}"))
        message = str(refusal.value)
        assert expected in message and str(path) in message and "\n" not in message, message
    assert not (tmp_path / "output").exists()  # refused before anything was written
    # the stage entry turns a UserError into that line and exit 2 (test_experiment: the CLI refusals)


@pytest.mark.parametrize(("signum", "exit_code", "said"), [
    (signal.SIGINT, 130, "training interrupted (Ctrl-C)"),
    (signal.SIGTERM, 143, "training terminated (SIGTERM)"),
])  # fmt: skip
def test_a_run_stopped_before_its_first_checkpoint_puts_the_replaced_run_back(
    tmp_path, data_dir, warnings_logged, signum, exit_code, said
):
    old = tmp_path / "output" / "run"
    old.mkdir(parents=True)
    (old / "last.pt").write_bytes(b"the previous run's checkpoint")
    (old / "notes.txt").write_text("mine")
    cfg = train_config(tmp_path, data_dir, "train.overwrite=true")
    sigterm_handler = signal.getsignal(signal.SIGTERM)

    def stop(state) -> None:  # the signal arrives while the new run is set up, before any checkpoint
        assert not (old / "notes.txt").exists()  # the previous run is aside meanwhile
        os.kill(os.getpid(), signum)

    with pytest.raises(SystemExit) as stopped:
        run_as_stage(cfg, [{"on_train_start": stop}])
    assert stopped.value.code == exit_code
    assert (old / "last.pt").read_bytes() == b"the previous run's checkpoint"
    assert (old / "notes.txt").read_text() == "mine" and len(list(old.iterdir())) == 2
    assert not list(old.parent.glob("run.replaced-*"))  # nothing left aside
    assert warnings_logged[-1] == f"{said}; the previous run is back in {old}"
    assert signal.getsignal(signal.SIGTERM) == sigterm_handler  # the run's own handler is gone


def test_loggers_are_chosen_by_train_loggers_and_use_wandb_is_their_old_name():
    def loggers(*overrides: str) -> tuple[str, ...]:
        return TrainSettings.from_config(load_config(list(overrides))).loggers

    assert loggers() == ("csv", "tensorboard")  # config.yaml's
    assert loggers("train.loggers=[wandb]") == ("wandb",)
    assert loggers("train.loggers=[csv]", "train.use_wandb=true") == ("csv", "wandb")
    with pytest.raises(ConfigError, match=r"train.loggers: unknown logger\(s\) tb; choose from csv"):
        loggers("train.loggers=[csv,tb]")
