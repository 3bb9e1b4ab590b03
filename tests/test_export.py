"""Export round trips: ONNX / OpenVINO artifacts reproduce the torch model (static and dynamic batch), carry
their metadata, onnxslim is only kept when it changes nothing, the parity report, int8 quick mode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from src.common.config import load_config
from src.common.experiment import exp_dir
from src.common.images import read_image_rgb
from src.runtime import Detections, available_backends, load_model
from tests.helpers.deploy_data import (
    CLASS_NAMES,
    deploy_config,
    exported_experiment,
)

NO_MAP_CHANGE = {"mAP_50_delta": 0.0, "mAP_50_delta_low": 0.0, "mAP_50_delta_high": 0.0}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny experiment exported with a dynamic batch (max 3): ONNX + OpenVINO fp32/fp16, parity checked."""

    root = tmp_path_factory.mktemp("export")
    return exported_experiment(root, "export.dynamic_batch=true", "export.max_batch_size=3")


def val_images(cfg, n: int = 5) -> list[np.ndarray]:
    paths = sorted((exp_dir(cfg).parents[1] / "data" / "images").glob("*.jpg"))
    return [read_image_rgb(p) for p in paths[:n]]


def assert_same_detections(reference, candidate, box_atol: float, score_atol: float) -> None:
    assert len(reference) == len(candidate)
    for ref, cand in zip(reference, candidate, strict=True):
        assert ref.labels.tolist() == cand.labels.tolist()
        np.testing.assert_allclose(cand.boxes, ref.boxes, atol=box_atol)
        np.testing.assert_allclose(cand.scores, ref.scores, atol=score_atol)


def test_export_writes_artifacts_report_and_slims(exported):
    cfg, report = exported
    out = exp_dir(cfg)
    for name in ("model.onnx", "model_fp32.xml", "model_fp32.bin", "model_fp16.xml", "export_report.json"):
        assert (out / name).exists(), name
    assert report["onnx_slimmed"] is True  # the slim graph matched the unslimmed one at batch 1, 2 and 3
    saved = json.loads((out / "export_report.json").read_text())
    parity = saved["parity"]
    assert parity["images"] == 4
    for name in ("onnx", "ov_fp32", "ov_fp16"):
        assert parity[name]["ok"], parity[name]
    assert parity["onnx"]["max_box_dev_px"] < 0.01 and parity["ov_fp32"]["max_score_dev"] < 1e-3
    if available_backends()["tensorrt"] is not None:
        assert "trt_fp16" not in saved["artifacts"]  # skipped with a message, nothing half-written


def test_metadata_is_read_back_from_every_artifact(exported):
    cfg, _ = exported
    out = exp_dir(cfg)
    for name, precision in (("model.onnx", "fp32"), ("model_fp32.xml", "fp32"), ("model_fp16.xml", "fp16")):
        meta = load_model(out / name).meta
        assert meta.class_names == CLASS_NAMES, name
        assert meta.img_size == tuple(cfg.model.img_size) and meta.keep_ratio is False
        assert meta.conf_thresh == pytest.approx(0.3) and meta.class_thresholds == {"square": 0.4}
        assert meta.batch_size is None and meta.max_batch_size == 3
        assert meta.precision == precision
        assert meta.extra["source_checkpoint"].endswith("best.pt")


def test_dynamic_batch_round_trip_matches_torch(exported):
    cfg, _ = exported
    out = exp_dir(cfg)
    images = val_images(cfg, 5)  # chunks of 3 + 2 through the dynamic graphs
    reference = load_model(out / "best.pt", device="cpu")(images, conf=0.05)
    for name in ("model.onnx", "model_fp32.xml"):
        model = load_model(out / name, device="cpu")
        assert model.runner.batch_size is None and model.max_batch == 3
        assert_same_detections(reference, model(images, conf=0.05), box_atol=1e-2, score_atol=1e-4)
    fp16 = load_model(out / "model_fp16.xml", device="cpu", precision="f32")(images, conf=0.3)
    assert sum(map(len, fp16)) > 0
    assert load_model(out / "model_fp32.xml", precision="f32").runner.precision == "f32"


def test_static_batch_export_pads_partial_batches(exported, tmp_path):
    from src.dl.export import artifact_meta, export_onnx, export_openvino
    from src.runtime.torch_model import build_deploy_model

    cfg, _ = exported
    model, meta = build_deploy_model(exp_dir(cfg) / "best.pt")
    meta = artifact_meta(meta, batch_size=2, max_batch_size=2)
    onnx_path = export_onnx(model, meta, tmp_path / "static.onnx", batch=2, dynamic_batch=False)
    xml_path = export_openvino(onnx_path, meta, tmp_path / "static.xml", fp16=False)
    images = val_images(cfg, 3)  # 2 + 1 (padded to 2)
    reference = load_model(exp_dir(cfg) / "best.pt")(images, conf=0.05)
    for path in (onnx_path, xml_path):
        static = load_model(path)
        assert static.runner.batch_size == 2
        assert_same_detections(reference, static(images, conf=0.05), box_atol=1e-2, score_atol=1e-4)


def test_slim_graph_that_changes_outputs_is_discarded(exported, tmp_path, monkeypatch):
    """onnxslim must never silently replace the graph with one that computes something else."""
    import shutil

    import onnx
    import onnxslim
    from onnx import helper

    from src.dl.export import probe_batches, slim_onnx

    cfg, _ = exported
    path = tmp_path / "model.onnx"
    shutil.copy(exp_dir(cfg) / "model.onnx", path)
    before = path.read_bytes()
    meta = load_model(path).meta

    def miscompiling_slim(proto):  # what a wrong constant fold looks like: the scores come out halved
        graph = proto.graph
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), "half"))
        graph.node.append(helper.make_node("Mul", ["scores_raw", "half"], ["scores"]))
        for node in graph.node[:-1]:
            node.output[:] = ["scores_raw" if o == "scores" else o for o in node.output]
        return proto

    monkeypatch.setattr(onnxslim, "slim", miscompiling_slim)
    batches, source = probe_batches(cfg, meta)
    assert "val image" in source
    assert slim_onnx(path, batches, meta) is False
    assert path.read_bytes() == before  # the unslimmed graph is kept


def test_tensorrt_engine_round_trip(exported, tmp_path):
    reason = available_backends()["tensorrt"]
    if reason is not None:
        pytest.skip(f"TensorRT: {reason}")
    from src.dl.export import export_tensorrt

    cfg, _ = exported
    onnx_path = exp_dir(cfg) / "model.onnx"
    meta = load_model(onnx_path).meta
    engine = export_tensorrt(onnx_path, meta, tmp_path / "model_fp32.engine", "fp32", workspace_gb=1)
    images = val_images(cfg, 3)
    reference = load_model(exp_dir(cfg) / "best.pt", device="cuda")(images, conf=0.05)
    assert_same_detections(reference, load_model(engine)(images, conf=0.05), box_atol=0.1, score_atol=1e-3)


def test_int8_settings_refuse_an_unknown_float_part():
    from src.common.errors import UserError
    from src.dl.quantize import Int8Settings

    with pytest.raises(UserError, match="ov_int8.float_parts: unknown \\['heads'\\]"):
        Int8Settings.from_options({"float_parts": ["decoding", "heads"]})


def test_int8_quick_mode(exported):
    from src.dl import ov_int8

    cfg, _ = exported
    parts = ("decoding", "box_heads", "score_heads")
    cfg = deploy_config(
        exp_dir(cfg).parents[1], "ov_int8.subset_size=4", "ov_int8.val_images=3",
        f"ov_int8.float_parts=[{','.join(parts)}]",
    )  # fmt: skip
    report = ov_int8.run(cfg)
    int8 = load_model(exp_dir(cfg) / "model_int8.xml")
    assert int8.meta.precision == "int8" and int8.meta.class_names == CLASS_NAMES
    assert int8.meta.extra["int8"]["float_parts"] == list(parts)
    assert [r["model"] for r in report["results"]] == ["fp32", "int8"]
    assert report["results"][1]["latency_ms_median"] > 0 and "box_drift_px" in report["results"][1]
    assert 0.0 <= report["results"][1]["mean_box_iou"] <= 1.0
    assert_quantized_except_float_parts(exp_dir(cfg) / "model_int8.xml", parts)


def assert_quantized_except_float_parts(path, parts) -> None:
    """The IR holds int8 quantizers (FakeQuantize), and none feeds an op of the parts kept in float."""
    import re

    import openvino as ov

    from src.dl.quantize import FLOAT_PARTS

    ops = ov.Core().read_model(str(path)).get_ops()
    assert sum(op.get_type_name() == "FakeQuantize" for op in ops) > 10
    kept_float = []
    for part in parts:
        of_part = [
            op for op in ops if any(re.fullmatch(p, op.get_friendly_name()) for p in FLOAT_PARTS[part])
        ]
        assert of_part, part  # the part's name patterns find the model's ops
        kept_float += of_part
    for op in kept_float:
        sources = [value.get_source_output().get_node().get_type_name() for value in op.inputs()]
        assert "FakeQuantize" not in sources, op.get_friendly_name()


# ---------------------------------------------------------------------------------------------------- parity


def scene_detections(rng, objects: int = 6, junk: int = 40, size: int = 320) -> Detections:
    """One image's top-K as D-FINE gives it: a few objects (scores 0.35-0.95) and a long low-score tail of
    boxes anywhere, near-duplicates included. Sorted by score like Detector output."""
    xy = rng.uniform(0, size - 80, (objects + junk, 2))
    wh = rng.uniform(20, 70, (objects + junk, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    boxes[objects : objects + 5] = boxes[:5] + rng.normal(0, 4, (5, 4))  # low-score duplicates of objects
    scores = np.concatenate([rng.uniform(0.35, 0.95, objects), rng.uniform(0.0, 0.12, junk)])
    labels = rng.integers(0, 4, objects + junk)
    labels[objects : objects + 5] = labels[:5]
    return make_detections(boxes, scores, labels, size)


def make_detections(boxes, scores, labels, size: int = 320) -> Detections:
    order = np.argsort(-np.asarray(scores), kind="stable")
    labels = np.asarray(labels, np.int64)[order]
    return Detections(
        np.asarray(boxes, np.float32)[order], np.asarray(scores, np.float32)[order], labels,
        [CLASS_NAMES[i] for i in labels], (size, size),
    )  # fmt: skip


def perturbed(reference: list[Detections], rng, change) -> list[Detections]:
    """change(boxes, scores, labels, rng) -> new arrays, applied to a copy of every image's detections."""
    return [
        make_detections(*change(d.boxes.copy(), d.scores.copy(), d.labels.copy(), rng), d.image_size[0])
        for d in reference
    ]


def fp16_like(boxes, scores, labels, rng):
    """A faithful low-precision artifact: sub-pixel box noise and ~1e-3 score noise on the objects, while the
    low-score tail is reshuffled entirely (its ranking is noise in any precision)."""
    objects = scores >= 0.2
    boxes[objects] += rng.normal(0, 0.3, (objects.sum(), 4))
    scores[objects] += rng.normal(0, 2e-3, objects.sum())
    tail = ~objects
    boxes[tail] = np.roll(boxes[tail], 7, axis=0) + rng.normal(0, 30, (tail.sum(), 4))
    scores[tail] = rng.permutation(scores[tail])
    return boxes, scores, labels


@pytest.fixture(scope="module")
def parity_scenes():
    """Reference detections of 8 images with a detection sitting on the threshold (0.3) in every image."""
    rng = np.random.default_rng(0)
    reference = [scene_detections(rng) for _ in range(8)]
    for d in reference:
        d.scores[4] = 0.305  # one of the 6 objects; the artifact will put it at 0.295
    reference = [make_detections(d.boxes, d.scores, d.labels) for d in reference]
    tolerance = load_config([]).export.tolerance.fp16
    return reference, tolerance, rng


def test_parity_ignores_threshold_flips_and_the_low_score_tail(parity_scenes):
    """The demo's false alarm: a faithful fp16 artifact whose near-threshold scores cross 0.3 and whose
    low-score tail is ordered differently must NOT be flagged, and its drift must be the real one."""
    from src.dl.parity import beyond_tolerance, compare_detections

    reference, tolerance, rng = parity_scenes

    def crossing(boxes, scores, labels, rng):
        boxes, scores, labels = fp16_like(boxes, scores, labels, rng)
        scores[np.isclose(scores, 0.305, atol=5e-3)] = 0.295
        return boxes, scores, labels

    candidate = perturbed(reference, rng, crossing)
    drift = compare_detections(reference, candidate, conf=0.3, margin=tolerance.score)
    assert beyond_tolerance(drift, NO_MAP_CHANGE, tolerance) == []
    assert drift["unmatched"] == 0 and drift["borderline"] >= 8  # the crossing detections, not errors
    assert drift["max_box_dev_px"] < 2.0 and drift["max_score_dev"] < 0.02  # the tail is never compared
    assert drift["compared"] == drift["reference_detections"] == 8 * 6  # the objects only
    per_class = compare_detections(reference, candidate, conf=np.full(4, 0.3), margin=tolerance.score)
    assert per_class == drift  # per-class thresholds (the model's) work the same way


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("boxes shifted 12 px", "p99 box dev"),
        ("scores scrambled", "p99 score dev"),
        ("half the objects lost", "unmatched fraction"),
    ],
)
def test_parity_flags_a_broken_artifact(parity_scenes, breakage, expected):
    from src.dl.parity import beyond_tolerance, compare_detections

    reference, tolerance, rng = parity_scenes

    def broken(boxes, scores, labels, rng):
        boxes, scores, labels = fp16_like(boxes, scores, labels, rng)
        objects = np.where(scores >= 0.2)[0]
        if breakage == "boxes shifted 12 px":
            boxes[objects] += 12.0
        elif breakage == "scores scrambled":
            scores[objects] = rng.permutation(scores[objects])
        else:
            scores[objects[::2]] = 0.01
        return boxes, scores, labels

    drift = compare_detections(reference, perturbed(reference, rng, broken), 0.3, tolerance.score)
    problems = beyond_tolerance(drift, NO_MAP_CHANGE, tolerance)
    assert any(p.startswith(expected) for p in problems), (problems, drift)


def edited_onnx(source, target, output: str, op: str, value: float):
    """A copy of an exported graph with `output` passed through `op` (Add / Mul) with a constant: what a
    wrong constant fold or a mis-folded grid offset does to a real export."""
    import onnx

    proto = onnx.load(str(source))
    graph = proto.graph
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.float32), "broken_constant"))
    for node in graph.node:
        node.output[:] = [f"{output}_raw" if o == output else o for o in node.output]
    graph.node.append(onnx.helper.make_node(op, [f"{output}_raw", "broken_constant"], [output]))
    onnx.save(proto, str(target))
    return target


def test_parity_report_flags_a_broken_export_and_passes_fp16(exported, tmp_path):
    """End to end on real artifacts: the fp16 IR passes; a graph with boxes shifted by 3 px or scores
    halved is flagged. The untrained tiny model scores every query about 0.73-0.77, so fp16 reorders the
    top-K cut: those detections must count as borderline, not as missing. (Its boxes are a few px wide, so
    a 3 px shift loses the pairs altogether: unmatched.)"""
    from src.dl.parity import parity_report

    cfg, _ = exported
    out = exp_dir(cfg)
    artifacts = {  # deployment name -> (file, runtime precision)
        "ov_fp16": (out / "model_fp16.xml", "f32"),
        "onnx_shifted": (
            edited_onnx(out / "model.onnx", tmp_path / "shifted.onnx", "boxes", "Add", 3.0),
            None,
        ),
        "onnx_halved": (
            edited_onnx(out / "model.onnx", tmp_path / "halved.onnx", "scores", "Mul", 0.5),
            None,
        ),
    }
    report = parity_report(cfg, artifacts, out / "best.pt", "cpu")
    assert report["torch"]["detections"] >= 10  # enough detections for the comparison to mean something
    assert report["ov_fp16"]["ok"] and report["ov_fp16"]["unmatched"] == 0, report["ov_fp16"]
    assert not report["onnx_shifted"]["ok"] and report["onnx_shifted"]["unmatched"] > 0
    assert not report["onnx_halved"]["ok"]
    assert any(p.startswith("p99 score dev") for p in report["onnx_halved"]["problems"])
