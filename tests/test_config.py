"""The config is validated once: types from config.yaml's defaults, ranges and choices, unknown keys."""

from __future__ import annotations

import fnmatch
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from src.common.config import (
    ROOT,
    check_overrides,
    complete_with_defaults,
    default_config,
    load_config,
    validate_config,
)
from src.common.config_rules import RULES
from src.common.errors import ConfigError


def test_config_yaml_defaults_validate():
    cfg = load_config([])
    assert cfg.train.epochs == default_config().train.epochs
    assert list(cfg.label_to_name) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=0", "train.epochs must be an int >= 1, got 0"),
        ("train.batch_size=0", "train.batch_size must be an int >= 1, got 0"),
        ("model.num_queries=0", "model.num_queries must be an int >= 1 or null, got 0"),
        ("model.img_size=abc", "model.img_size must be [h, w] (or one int for a square) of"),
        ("model.img_size=abc", 'multiples of 32, got "abc"'),
        ("model.img_size=[250,256]", "positive multiples of 32, got [250, 256]"),
        ("train.mosaic.prob=1.5", "train.mosaic.prob must be a number in [0, 1], got 1.5"),
        ("train.augs.blur=-0.1", "train.augs.blur must be a number in [0, 1], got -0.1"),
        ("split.test=2", "split.test must be a number in [0, 1], got 2"),
        ("train.epochs=ten", 'train.epochs must be an int >= 1, got "ten"'),
        ("train.overwrite=1", "train.overwrite must be true or false, got 1"),
        ("model.variant=xl", 'model.variant must be a string dfine or deim (the old name of model.arch) or null, got "xl"'),
        ("train.amp=fp8", "train.amp must be one of auto | off | bf16 | fp16"),
        ("device=gpu0", 'device must be auto | cpu | cuda | cuda:N'),
        ("train.max_steps_per_epoch=0", "train.max_steps_per_epoch must be an int >= 1 or null, got 0"),
        ("infer.conf=1.5", "infer.conf must be a score in [0, 1] or {class_name: score} or null, got 1.5"),
        ("export.formats=[onnx,tflite]", 'export.formats must be a list from onnx | openvino | tensorrt'),
        ("train.num_workers=-1", "train.num_workers must be an int >= 0, got -1"),
        ("label_to_name={0: cat, 2: dog}", "label_to_name must be a map of ids 0..N-1 (no gaps)"),
    ],
)  # fmt: skip
def test_a_bad_value_is_named_with_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as error:
        load_config([override])
    assert message in str(error.value) and len(str(error.value).splitlines()) == 1


def test_every_problem_is_listed_at_once_one_per_line():
    with pytest.raises(ConfigError) as error:
        load_config(["train.epochs=0", "train.batch_size=0", "model.img_size=33", "+train.epoch=3"])
    lines = str(error.value).splitlines()
    assert len(lines) == 4
    assert [line.split()[0] for line in lines if "must be" in line] == [
        "model.img_size",
        "train.epochs",
        "train.batch_size",
    ]
    assert "unknown key train.epoch: did you mean train.epochs?" in lines


@pytest.mark.parametrize("override", ["train.epoch=3", "+train.epoch=3", "~train.epoch"])
def test_an_unknown_key_names_the_closest_known_key(override):
    with pytest.raises(ConfigError, match=r"^unknown key train\.epoch: did you mean train\.epochs\?$"):
        load_config([override])


def test_an_unknown_key_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    # data_path in tmp_path: the stage would not write into the repository even if it ran
    command = [sys.executable, "-m", "src.etl.split", "train.epoch=3", f"data_path={tmp_path}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, output
    assert "Traceback" not in output and len(output.splitlines()) == 1
    assert "unknown key train.epoch: did you mean train.epochs?" in output


def test_a_bad_value_on_the_command_line_stops_the_stage_before_it_runs(tmp_path):
    command = [sys.executable, "-m", "src.etl.split", "split.val=1.5", f"data_path={tmp_path}"]
    command += [f"splits_dir={tmp_path / 'splits'}", f"check.report_dir={tmp_path / 'report'}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2 and "Traceback" not in output, output
    assert "split.val must be a number in [0, 1], got 1.5" in output
    assert not (tmp_path / "splits").exists() and not (tmp_path / "report").exists()


def test_label_to_name_override_replaces_the_map_and_takes_new_entries():
    cfg = load_config(["label_to_name={0: cat, 1: dog}"])
    assert OmegaConf.to_container(cfg.label_to_name) == {0: "cat", 1: "dog"}  # not merged with config.yaml's
    cfg = load_config(["label_to_name={0: cat, 1: dog}", "label_to_name.2=bird"])
    assert OmegaConf.to_container(cfg.label_to_name) == {0: "cat", 1: "dog", 2: "bird"}  # int ids
    assert list(load_config(["label_to_name.4=fish"]).label_to_name) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="label_to_name must be"):
        load_config(["label_to_name.5=fish"])  # a gap


def test_open_maps_take_new_entries_shaped_like_the_known_ones():
    cfg = load_config(["train.lrs.xl={base_lr: 0.001, backbone_lr: 0.0001}", "infer.conf={circle: 0.3}"])
    assert cfg.train.lrs.xl.base_lr == 0.001 and cfg.infer.conf.circle == 0.3
    with pytest.raises(
        ConfigError, match="unknown key train.lrs.n.base_lrr: did you mean train.lrs.n.base_lr"
    ):
        load_config(["train.lrs.n.base_lrr=0.1"])
    with pytest.raises(ConfigError, match="train.lrs.xl.backbone_lr is missing"):
        load_config(["train.lrs.xl={base_lr: 0.001}"])


def test_null_or_number_keys_and_a_square_img_size():
    cfg = load_config(
        ["train.max_steps_per_epoch=null", "demo_ui.max_video_frames=null", "model.img_size=640"]
    )
    assert cfg.train.max_steps_per_epoch is None and cfg.demo_ui.max_video_frames is None
    assert list(cfg.model.img_size) == [640, 640]
    assert load_config(["train.fppi_tolerance=0.05", "train.weight_decay=0"]).train.fppi_tolerance == 0.05


def test_a_key_added_to_config_yaml_is_validated_by_its_default(tmp_path):
    text = (ROOT / "config.yaml").read_text() + "\nextra:\n  count: 3\n  ratio: 0.5\n  name: x\n"
    (tmp_path / "config.yaml").write_text(text)
    cfg = load_config(["extra.ratio=1", "extra.name=y"], config_dir=tmp_path)  # an int is a fine float
    assert cfg.extra.ratio == 1
    with pytest.raises(ConfigError) as error:
        load_config(["extra.count=abc", "extra.ratio=-1", "extra.cnt=2"], config_dir=tmp_path)
    assert str(error.value).splitlines() == [
        "unknown key extra.cnt: did you mean extra.count?",
        'extra.count must be an int >= 0, got "abc"',
        "extra.ratio must be a number >= 0, got -1",
    ]


def test_an_older_saved_config_is_completed_from_the_defaults():
    saved = OmegaConf.to_container(
        load_config(["label_to_name={0: cat, 1: dog}", "train.epochs=3"]), resolve=True
    )
    del saved["train"]["no_aug_epochs"], saved["train"]["mixup"], saved["model"]["arch"]
    saved["model"]["variant"] = "deim"  # written before model.arch existed
    cfg = complete_with_defaults(saved)
    assert cfg.train.epochs == 3 and cfg.train.no_aug_epochs == default_config().train.no_aug_epochs
    assert cfg.train.mixup.prob == default_config().train.mixup.prob
    assert OmegaConf.to_container(cfg.label_to_name) == {0: "cat", 1: "dog"}  # the saved map, not merged
    validate_config(cfg)
    assert cfg.model.arch == "deim_dfine" and cfg.model.variant is None


def test_the_old_variant_key_names_an_arch_and_a_contradiction_is_refused():
    assert load_config(["model.variant=deim"]).model.arch == "deim_dfine"
    with pytest.raises(ConfigError, match="contradicts model.arch"):
        load_config(["model.variant=deim", "model.arch=deim_rtdetrv2"])


def test_every_rule_names_a_key_of_config_yaml():
    """A rule for a renamed or removed key would silently check nothing."""
    default = OmegaConf.to_container(default_config(), resolve=False)

    def keys(node, prefix=""):
        for name, value in node.items():
            yield f"{prefix}{name}"
            if isinstance(value, dict):
                yield from keys(value, f"{prefix}{name}.")

    known = set(keys(default))
    missing = [key for key in RULES if not fnmatch.filter(known, key)]
    assert not missing


def test_the_key_check_leaves_hydra_flags_and_keys_alone():
    args = ["--cfg", "job", "-m", "hydra.job.name=x", "hydra/job_logging=none", "train.epochs=2"]
    assert check_overrides(args, default_config()) == (args, [])


def test_a_later_stage_takes_the_trained_values_without_a_word_when_nothing_was_passed(tmp_path):
    from loguru import logger

    from src.common.config import save_run_config
    from src.common.experiment import Experiment, stage_config

    where = [f"output_dir={tmp_path}", "exp_name=run"]
    trained = load_config([*where, "model.num_queries=30", "label_to_name={0: cat, 1: dog}"])
    save_run_config(trained, Experiment.of(trained).file("config"))
    messages: list[str] = []
    sink = logger.add(messages.append, level="DEBUG")
    try:
        cfg = stage_config(load_config(where))
    finally:
        logger.remove(sink)
    assert cfg.model.num_queries == 30 and list(cfg.label_to_name.values()) == ["cat", "dog"]
    assert messages == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("label_to_name={0: a, 1: square, 1: sq2}", "label_to_name={0: a, 1: square, 1: sq2}: key 1 given twice"),
        ("label_to_name={0: café, 1: b}", "must be quoted in an override, e.g. \"label_to_name={0: 'café', 1: b}\""),
        ("label_to_name.0=日本", "must be quoted in an override, e.g. \"label_to_name.0='日本'\""),
        ("label_to_name=[a,b]", "label_to_name must be a map of ids 0..N-1 (no gaps) to distinct non-empty names, got"),
        ("train.mosaic=0.5", "train.mosaic must be a map of prob, no_mosaic_epochs, scale"),
        ("foo", "'foo' is not an override: write key=value"),
    ],
)  # fmt: skip
def test_an_override_hydra_cannot_take_is_one_line_naming_the_fix(override, message):
    with pytest.raises(ConfigError) as error:
        load_config([override])
    assert message in str(error.value) and len(str(error.value).splitlines()) == 1


def test_quoted_non_ascii_names_are_taken():
    cfg = load_config(["label_to_name={0: 'café', 1: '日本'}"])
    assert list(cfg.label_to_name.values()) == ["café", "日本"]


def test_config_yaml_with_a_key_twice_is_refused_with_its_line(tmp_path):
    text = (ROOT / "config.yaml").read_text().replace("  3: star\n", "  3: star\n  1: star2\n")
    (tmp_path / "config.yaml").write_text(text)
    line = text.splitlines().index("  1: star2") + 1
    with pytest.raises(ConfigError, match=rf"config.yaml:{line}: label_to_name.1 is given twice \(first on line"):
        load_config([], config_dir=tmp_path)


def test_overrides_hydra_cannot_take_stop_the_stage_with_exit_2_and_no_traceback(tmp_path):
    bad = ["foo", "label_to_name={0: café}", "label_to_name=[a,b]", "label_to_name={0: a, 0: b}"]
    command = [sys.executable, "-m", "src.etl.split", *bad, f"data_path={tmp_path}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2 and "Traceback" not in output and "HYDRA_FULL_ERROR" not in output, output
    assert len(output.splitlines()) == len(bad)  # one line per problem
