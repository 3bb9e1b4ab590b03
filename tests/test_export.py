"""Export round trips: ONNX / OpenVINO artifacts reproduce the torch model (static and dynamic batch), carry
their metadata, onnxslim is only kept when it changes nothing, the parity report, int8 quick mode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from src.common.config import exp_dir
from src.common.images import read_image_rgb
from src.infer import available_backends, load_model
from tests.deploy_data import CLASS_NAMES, deploy_config, make_checkpoint, make_data


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny experiment exported with a dynamic batch (max 3): ONNX + OpenVINO fp32/fp16, parity checked."""
    from src.dl import export

    root = tmp_path_factory.mktemp("export")
    cfg = deploy_config(root, "export.dynamic_batch=true", "export.max_batch_size=3")
    make_data(cfg)
    make_checkpoint(cfg)
    return cfg, export.run(cfg)


def val_images(cfg, n: int = 5) -> list[np.ndarray]:
    paths = sorted((exp_dir(cfg).parents[1] / "data" / "images").glob("*.jpg"))
    return [read_image_rgb(p) for p in paths[:n]]


def assert_same_detections(reference, candidate, box_atol: float, score_atol: float) -> None:
    assert len(reference) == len(candidate)
    for ref, cand in zip(reference, candidate, strict=True):
        assert ref.labels.tolist() == cand.labels.tolist()
        np.testing.assert_allclose(cand.boxes, ref.boxes, atol=box_atol)
        np.testing.assert_allclose(cand.scores, ref.scores, atol=score_atol)


@pytest.mark.slow  # the module's export (+ parity check) runs in its setup: ~45 s on 2 cores
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


@pytest.mark.slow
def test_static_batch_export_pads_partial_batches(exported, tmp_path):
    from src.dl.export import artifact_meta, export_onnx, export_openvino
    from src.infer.torch_model import build_deploy_model

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
    assert slim_onnx(path, probe_batches(cfg, meta), meta) is False
    assert path.read_bytes() == before  # the unslimmed graph is kept


def test_tensorrt_engine_round_trip(exported, tmp_path):
    reason = available_backends()["tensorrt"]
    if reason is not None:
        pytest.skip(f"TensorRT: {reason}")
    from src.dl.export import export_tensorrt

    cfg, _ = exported
    onnx_path = exp_dir(cfg) / "model.onnx"
    meta = load_model(onnx_path).meta
    engine = export_tensorrt(onnx_path, meta, tmp_path / "model_fp32.engine", fp16=False, workspace_gb=1)
    images = val_images(cfg, 3)
    reference = load_model(exp_dir(cfg) / "best.pt", device="cuda")(images, conf=0.05)
    assert_same_detections(reference, load_model(engine)(images, conf=0.05), box_atol=0.1, score_atol=1e-3)


@pytest.mark.slow
def test_int8_quick_mode(exported):
    from src.dl import ov_int8

    cfg, _ = exported
    cfg = deploy_config(exp_dir(cfg).parents[1], "ov_int8.subset_size=4", "ov_int8.val_images=3")
    report = ov_int8.run(cfg)
    int8 = load_model(exp_dir(cfg) / "model_int8.xml")
    assert int8.meta.precision == "int8" and int8.meta.class_names == CLASS_NAMES
    assert int8.meta.extra["float_decoding"] is True
    assert [r["model"] for r in report["results"]] == ["fp32", "int8"]
    assert report["results"][1]["latency_ms_median"] > 0 and "box_drift_px" in report["results"][1]
    assert len(int8(val_images(cfg, 1)[0], conf=0.0)) > 0
