"""Pretrained-weight loading: checkpoint formats, class-count adaptation, COCO row copying, finding files."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest
import torch

from src.models import build_model
from src.models import checkpoint as ckpt
from src.models.checkpoint import read_checkpoint
from src.models.dfine import weights as dfine_weights
from src.models.dfine.weights import find_pretrained, pretrained_filename
from src.models.pretrained import COCO_CLASSES, checkpoint_arch, checkpoint_arch_overrides, load_pretrained
from tests.detinit import deterministic_state_dict

IMG = (64, 64)
CLASS_KEYS = sorted(
    ["decoder.denoising_class_embed.weight", "decoder.enc_score_head.weight", "decoder.enc_score_head.bias"]
    + [f"decoder.dec_score_head.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
)


def _tiny(num_classes: int, img_size=IMG, **kwargs):
    return build_model("n", num_classes, img_size=img_size, num_queries=20, **kwargs)


@pytest.fixture(scope="module")
def coco_state() -> dict[str, torch.Tensor]:
    """An 80-class 'COCO' state dict with deterministic weights (every tensor distinct from a fresh init)."""
    state = _tiny(80).state_dict()
    skip = {k for k in state if k.endswith("anchors") or k.endswith("valid_mask")}
    return deterministic_state_dict(state, skip)


def _zeros_like(state):
    return {k: torch.zeros_like(v) for k, v in state.items()}


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(
            lambda sd: {"ema": {"module": sd, "updates": 7}, "model": _zeros_like(sd)}, id="official-ema"
        ),
        pytest.param(lambda sd: {"model": sd, "last_epoch": 3}, id="official-model"),
        pytest.param(lambda sd: sd, id="state-dict"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="ddp-state-dict"),
        pytest.param(lambda sd: {"model": _zeros_like(sd), "ema": sd, "meta": {"epoch": 2}}, id="ours-ema"),
        pytest.param(lambda sd: {"model": sd, "ema": None, "meta": {"epoch": 2}}, id="ours-no-ema"),
    ],
)
def test_coco_checkpoint_loads_into_a_three_class_model(tmp_path, coco_state, wrap):
    path = tmp_path / "weights.pth"
    torch.save(wrap(coco_state), path)
    model = _tiny(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    report = load_pretrained(model, path)

    assert sorted(report.reinitialised) == CLASS_KEYS
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(before) - len(CLASS_KEYS)
    after = model.state_dict()
    for key in report.loaded:
        assert torch.equal(after[key], coco_state[key].to(after[key].dtype)), key
    for key in CLASS_KEYS:
        assert torch.equal(after[key], before[key]), f"{key} must keep the model's own initialisation"
    assert "loaded" in str(report) and "score_head" in str(report)


def test_class_rows_come_from_coco_for_coco_named_classes(tmp_path, coco_state):
    torch.save({"model": coco_state}, tmp_path / "coco.pth")
    model = _tiny(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    names = ["Traffic_Light", "widget", "PERSON"]
    report = load_pretrained(model, tmp_path / "coco.pth", class_names=names)

    traffic_light, person = COCO_CLASSES.index("traffic light"), COCO_CLASSES.index("person")
    assert report.class_rows_from_coco == {"Traffic_Light": "traffic light", "PERSON": "person"}
    after = model.state_dict()
    for key in CLASS_KEYS:
        assert torch.equal(after[key][0], coco_state[key][traffic_light]), key
        assert torch.equal(after[key][2], coco_state[key][person]), key
        assert torch.equal(after[key][1], before[key][1]), f"{key}: 'widget' keeps its own row"
    padding = "decoder.denoising_class_embed.weight"
    assert torch.equal(after[padding][3], before[padding][3]), "the padding row stays the model's"

    # a {id: name} mapping (config.yaml's label_to_name) works the same
    other = _tiny(3)
    report = load_pretrained(other, tmp_path / "coco.pth", class_names={0: "car", 1: "x", 2: "y"})
    assert report.class_rows_from_coco == {"car": "car"}
    assert torch.equal(
        other.state_dict()["decoder.enc_score_head.bias"][0],
        coco_state["decoder.enc_score_head.bias"][COCO_CLASSES.index("car")],
    )


def test_image_size_buffers_and_equal_class_count(coco_state):
    model = _tiny(80, img_size=(96, 128))
    anchors = model.state_dict()["decoder.anchors"].clone()
    report = load_pretrained(model, coco_state)
    assert sorted(report.reinitialised) == ["decoder.anchors", "decoder.valid_mask"]
    assert torch.equal(model.state_dict()["decoder.anchors"], anchors)
    assert torch.equal(
        model.state_dict()["decoder.enc_score_head.weight"], coco_state["decoder.enc_score_head.weight"]
    )


def test_checkpoint_without_denoising_embedding_and_with_extras(coco_state):
    state = {k: v for k, v in coco_state.items() if "denoising" not in k}
    state["decoder.something_else"] = torch.zeros(2)
    report = load_pretrained(_tiny(80), state)
    assert report.missing == ["decoder.denoising_class_embed.weight"]
    assert report.unexpected == ["decoder.something_else"]


def test_other_architecture_is_an_error_with_a_hint(tmp_path, coco_state):
    path = tmp_path / "coco.pth"
    torch.save({"model": coco_state}, path)
    narrow = _tiny(3, arch_overrides={"decoder_ffn_dim": 256})
    with pytest.raises(ValueError, match="checkpoint_arch_overrides") as error:
        load_pretrained(narrow, path)
    assert "decoder.decoder.layers.0.linear1.weight" in str(error.value)
    overrides = checkpoint_arch_overrides(path)
    assert overrides["decoder_ffn_dim"] == 512
    load_pretrained(_tiny(3, arch_overrides=overrides), path)  # the fitting model loads


def test_unreadable_or_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_checkpoint(tmp_path / "nothing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        read_checkpoint(tmp_path / "junk.pth")
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "opt.pth")
    with pytest.raises(ValueError, match="no weights found"):
        read_checkpoint(tmp_path / "opt.pth")
    with pytest.raises(ValueError, match="is it a D-FINE checkpoint"):
        load_pretrained(_tiny(3), {"head.weight": torch.zeros(1)})


# --- find_pretrained -----------------------------------------------------------------------------------


def test_find_pretrained_uses_a_local_file(tmp_path):
    (tmp_path / "dfine_s_obj2coco.pth").write_bytes(b"x")
    (tmp_path / "deim_dfine_hgnetv2_m_coco.pth").write_bytes(b"x")
    assert find_pretrained("s", "obj2coco", pretrained_dir=tmp_path) == tmp_path / "dfine_s_obj2coco.pth"
    assert (
        find_pretrained("m", variant="deim", pretrained_dir=tmp_path)
        == tmp_path / "deim_dfine_hgnetv2_m_coco.pth"
    )
    assert pretrained_filename("x", "obj365") == "dfine_x_obj365.pth"


def test_find_pretrained_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(dfine_weights, "DFINE_RELEASE_URL", "http://127.0.0.1:9/")  # nothing listens: refused at once
    with pytest.raises(FileNotFoundError) as error:
        find_pretrained("s", pretrained_dir=tmp_path)
    message = str(error.value)
    assert str((tmp_path / "dfine_s_coco.pth").resolve()) in message
    assert "http://127.0.0.1:9/dfine_s_coco.pth" in message and "download" in message
    assert list(tmp_path.iterdir()) == [], "no partial file is left behind"

    with pytest.raises(FileNotFoundError, match="downloading is switched off"):
        find_pretrained("l", "obj2coco", pretrained_dir=tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="drive.google.com") as error:
        find_pretrained("n", variant="deim", pretrained_dir=tmp_path)
    assert "deim_dfine_hgnetv2_n_coco.pth" in str(error.value)
    with pytest.raises(ValueError, match="No released dfine weights"):
        find_pretrained("n", "obj365", pretrained_dir=tmp_path)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_find_pretrained_downloads_from_the_release(tmp_path, monkeypatch, coco_state):
    served = tmp_path / "release"
    served.mkdir()
    torch.save({"model": coco_state}, served / "dfine_n_coco.pth")
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(dfine_weights, "DFINE_RELEASE_URL", f"http://127.0.0.1:{server.server_address[1]}/")
        path = find_pretrained("n", pretrained_dir=tmp_path / "pretrained")
    finally:
        server.shutdown()
        thread.join()
    assert path == tmp_path / "pretrained" / "dfine_n_coco.pth"
    assert load_pretrained(_tiny(80), path).missing == []


# --- arch recognition -------------------------------------------------------------------------------


def _large_backbone_state(trained_norm: bool) -> dict[str, torch.Tensor]:
    """The backbone keys that tell L/X checkpoints apart: an HGNetv2-B4 last-stage conv (2048 outputs) and
    one BatchNorm, ordinary (DEIM: num_batches_tracked) or frozen (official D-FINE L/X)."""
    state = {
        "backbone.stages.3.blocks.0.aggregation.1.conv.weight": torch.zeros(2048, 1, 1, 1),
        "backbone.stem.stem1.bn.weight": torch.ones(32),
        "backbone.stem.stem1.bn.bias": torch.zeros(32),
        "backbone.stem.stem1.bn.running_mean": torch.zeros(32),
        "backbone.stem.stem1.bn.running_var": torch.ones(32),
        "decoder.decoder.layers.0.linear1.weight": torch.zeros(1024, 256),
    }
    if trained_norm:
        state["backbone.stem.stem1.bn.num_batches_tracked"] = torch.tensor(7)
    return state


def test_arch_from_our_metadata(coco_state):
    for meta, arch in (({"arch": "deim_dfine"}, "deim_dfine"), ({"variant": "deim"}, "deim_dfine")):
        found, reason = checkpoint_arch({"model": coco_state, "meta": meta})
        assert found == arch and "metadata" in reason


def test_arch_from_backbone_batchnorm_of_large_sizes():
    assert checkpoint_arch(_large_backbone_state(trained_norm=True))[0] == "deim_dfine"
    assert checkpoint_arch({"ema": {"module": _large_backbone_state(False)}})[0] == "dfine"


def test_arch_from_the_file_name(tmp_path, coco_state):
    deim = tmp_path / "deim_dfine_hgnetv2_n_coco_160e.pth"
    dfine = tmp_path / "dfine_l_obj2coco.pth"  # the name find_pretrained gives the release's _e25 file
    for path in (deim, dfine):
        torch.save({"model": coco_state}, path)
    assert checkpoint_arch(deim) == (
        "deim_dfine",
        "the file name 'deim_dfine_hgnetv2_n_coco_160e.pth' contains 'deim'",
    )
    assert checkpoint_arch(dfine)[0] == "dfine"


def test_small_sizes_cannot_be_told_apart_and_the_report_says_so(tmp_path, coco_state):
    """n/s/m of D-FINE and DEIM have the same tensors: a neutral name gives no verdict, and the load report
    carries the (missing) verdict."""
    path = tmp_path / "weights.pth"
    torch.save({"model": coco_state}, path)
    arch, reason = checkpoint_arch(path)
    assert arch is None and "cannot be told apart" in reason
    report = load_pretrained(_tiny(80), path)
    assert report.arch is None and "cannot be told apart" in str(report)
    named = tmp_path / "my_deim_run.pth"
    torch.save({"model": coco_state}, named)
    assert load_pretrained(_tiny(80), named).arch == "deim_dfine"


# --- our format and the model spec --------------------------------------------------------------------------


def _spec(**changes):
    from src.models import ModelSpec

    fields = dict(
        arch="dfine", size="n", img_size=("64", 96), data_class_names=("a", "b", "c"), num_queries=20
    )
    return ModelSpec(**(fields | changes))


def test_model_spec_casts_once_and_refuses_bad_values():
    from src.common.config import load_config
    from src.common.errors import ConfigError
    from src.models import ModelSpec

    spec = _spec()
    assert spec.img_size == (64, 96) and spec.class_names == ["a", "b", "c"] and spec.num_classes == 3
    one = _spec(use_one_class=True)
    assert one.class_names == ["object"] and one.num_classes == 1 and one.data_class_names == ("a", "b", "c")
    for bad in ({"img_size": (60, 64)}, {"img_size": (0, 64)}, {"num_queries": 0}, {"data_class_names": ()}):
        with pytest.raises(ConfigError):
            _spec(**bad)
    cfg = load_config(["model.img_size=[96,128]", "model.use_one_class=true"])
    spec = ModelSpec.from_config(cfg)
    assert spec.img_size == (96, 128) and spec.use_one_class and len(spec.data_class_names) == 4
    with pytest.raises(ConfigError, match="model.img_size"):
        ModelSpec.from_config(load_config(["model.img_size=[abc,64]"]))
    assert ModelSpec.from_meta(one.to_meta()) == one
    # a checkpoint written before use_one_class / data_class_names existed
    old = {k: v for k, v in _spec().to_meta().items() if k not in ("use_one_class", "data_class_names")}
    assert ModelSpec.from_meta(old) == _spec()


def test_build_returns_model_criterion_and_postprocessor_for_a_spec():
    from src.models import LossSettings, build

    spec = _spec(arch="deim_dfine", use_one_class=True)
    model, criterion, postprocessor = build(spec)
    assert criterion.cls_loss == "mal" and model.decoder.num_queries == 20  # auto: DEIM's own loss
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 64, 96))
    assert out["pred_logits"].shape == (1, 20, 1)
    assert build(spec, LossSettings(cls_loss="vfl", bg_loss_weight=2.0)).criterion.bg_loss_weight == 2.0
    with pytest.raises(ValueError, match="train.cls_loss"):
        build(spec, LossSettings(cls_loss="focal"))


def test_run_checkpoint_round_trip(tmp_path):
    from src.models import (
        RunCheckpoint,
        build,
        load_run_checkpoint,
        save_run_checkpoint,
        spec_from_checkpoint,
    )

    spec = _spec(use_one_class=True)
    model = build(spec).model
    best = RunCheckpoint(
        spec, model.state_dict(), {"exp_name": "x"}, {"conf_thresh": 0.4}, {"mAP_50": 0.5}, 3
    )
    path = save_run_checkpoint(tmp_path / "best.pt", best)
    raw = torch.load(path, weights_only=True)
    assert raw["ema"] is None and raw["meta"]["use_one_class"] is True and raw["meta"]["epoch"] == 3
    loaded = load_run_checkpoint(path)
    assert loaded.spec == spec and loaded.training is None and loaded.thresholds == {"conf_thresh": 0.4}
    build(loaded.spec).model.load_state_dict(loaded.model)
    # last.pt: the training part travels as top-level keys
    last = RunCheckpoint(
        spec, model.state_dict(), {}, training={"optimizer": {"s": 1}, "step": 5, "ema": None}
    )
    assert load_run_checkpoint(save_run_checkpoint(tmp_path / "last.pt", last)).training["step"] == 5
    with pytest.raises(ValueError, match="unknown training"):
        save_run_checkpoint(tmp_path / "x.pt", RunCheckpoint(spec, {}, {}, training={"oops": 1}))
    # a meta without arch_overrides (older files): the architecture is read off the weights
    wide = build(_spec(arch_overrides={"decoder_ffn_dim": 1024})).model.state_dict()
    old_meta = {k: v for k, v in _spec().to_meta().items() if k != "arch_overrides"}
    build(spec_from_checkpoint(old_meta, wide)).model.load_state_dict(wide)
    torch.save({"model": model.state_dict()}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        load_run_checkpoint(tmp_path / "foreign.pt")


def test_shared_checkpoint_reads_load_a_file_once(tmp_path, coco_state, monkeypatch):
    path = tmp_path / "pretrained.pth"
    torch.save({"model": coco_state}, path)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    with ckpt.shared_checkpoint_reads():
        arch = checkpoint_arch(str(path))
        overrides = checkpoint_arch_overrides(str(path))
        first = ckpt.read_checkpoint(path)
        assert ckpt.read_checkpoint(path) is first
    assert len(loads) == 1
    # outside the block every read loads the file again, and an edited file is never served from before
    assert ckpt.read_checkpoint(path) is not first and len(loads) == 2
    assert arch == checkpoint_arch(str(path)) and overrides == checkpoint_arch_overrides(path)
    with ckpt.shared_checkpoint_reads():
        ckpt.read_checkpoint(path)
        torch.save({"model": {k: v for k, v in list(coco_state.items())[:5]}}, path)
        assert len(ckpt.read_checkpoint(path).state) == 5
