"""The one inference API (src.runtime.load_model): metadata, thresholds, input forms, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from src.common.images import read_image_rgb
from src.runtime import BackendUnavailable, Detections, available_backends, backend_for, load_model
from src.runtime.meta import ModelMeta, meta_from_checkpoint
from tests.helpers.deploy_data import CLASS_NAMES, experiment  # noqa: F401  (module fixture)


def test_meta_json_round_trip_keeps_unknown_keys():
    meta = ModelMeta(["a", "b"], (64, 96), keep_ratio=True, class_thresholds={"b": 0.7}, batch_size=None)
    data = json.loads(meta.to_json()) | {"future_key": 1}
    back = ModelMeta.from_dict(data)
    assert back.class_names == ["a", "b"] and back.img_size == (64, 96) and back.keep_ratio
    assert back.batch_size is None and back.class_thresholds == {"b": 0.7}
    assert back.extra["future_key"] == 1


def test_thresholds_global_per_class_and_overrides():
    meta = ModelMeta(["a", "b", "c"], (32, 32), conf_thresh=0.5, class_thresholds={"b": 0.7})
    assert meta.thresholds_array().tolist() == pytest.approx([0.5, 0.7, 0.5])
    assert meta.thresholds_array(0.2).tolist() == pytest.approx([0.2, 0.2, 0.2])
    assert meta.thresholds_array({"c": 0.1, 0: 0.9}).tolist() == pytest.approx([0.9, 0.7, 0.1])
    with pytest.raises(ValueError, match="unknown class"):
        meta.thresholds_array({"zebra": 0.1})
    with pytest.raises(ValueError, match="unknown classes"):
        ModelMeta(["a"], (32, 32), class_thresholds={"zebra": 0.1})


def test_meta_from_checkpoint_prefers_thresholds_json_and_accepts_class_ids():
    checkpoint_meta = {
        "class_names": ["a", "b"],
        "img_size": [64, 64],
        "num_queries": 10,
        "thresholds": {"conf_thresh": 0.4, "per_class": {"a": 0.45}},
        "metrics": {"mAP_50": 0.5},
    }
    meta = meta_from_checkpoint(checkpoint_meta, {"conf_thresh": 0.35, "per_class": {"1": 0.6}})
    assert meta.conf_thresh == pytest.approx(0.35)
    assert meta.class_thresholds == {"a": 0.45, "b": 0.6}
    assert meta.extra["metrics"] == {"mAP_50": 0.5}


def test_backend_is_chosen_by_suffix_and_errors_are_clear(tmp_path):
    assert [backend_for(f"m{s}") for s in (".pt", ".onnx", ".XML", ".engine")] == [
        "torch",
        "onnx",
        "openvino",
        "tensorrt",
    ]
    with pytest.raises(ValueError, match="unknown model file type"):
        backend_for("model.tflite")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "missing.onnx")
    status = available_backends()
    assert status["torch"] is None and status["onnx"] is None and status["openvino"] is None


def test_tensorrt_missing_is_reported_not_raised_elsewhere(tmp_path):
    reason = available_backends()["tensorrt"]
    if reason is None:
        pytest.skip("tensorrt and a CUDA GPU are present here")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0")
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        load_model(engine)


def test_onnx_without_our_metadata_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["labels"])],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("labels", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ValueError, match="dfine_meta"):
        load_model(path)


def test_torch_checkpoint_detector(experiment):  # noqa: F811
    cfg, checkpoint = experiment
    model = load_model(checkpoint, device="cpu")
    assert model.backend == "torch" and model.class_names == CLASS_NAMES
    assert model.meta.conf_thresh == pytest.approx(0.3) and model.meta.class_thresholds == {"square": 0.4}
    path = sorted((checkpoint.parents[2] / "data" / "images").glob("*.jpg"))[0]
    image = read_image_rgb(path)

    single = model(image)
    assert isinstance(single, Detections)
    height, width = image.shape[:2]
    assert single.image_size == (height, width)
    assert (single.boxes[:, [0, 2]] <= width).all() and (single.boxes[:, [1, 3]] <= height).all()
    assert (single.boxes >= 0).all() and (np.diff(single.scores) <= 0).all()
    # the stored thresholds: 0.4 for square, 0.3 for the rest
    limits = np.where(single.labels == CLASS_NAMES.index("square"), 0.4, 0.3)
    assert (single.scores >= limits - 1e-6).all()
    assert single.names == [CLASS_NAMES[i] for i in single.labels]

    # a path, a BGR frame with bgr=True, and a (B, H, W, 3) batch all give the same detections
    from_path = model(path)
    from_bgr = model(np.ascontiguousarray(image[..., ::-1]), bgr=True)
    batch = model(np.stack([image, image]))
    for other in (from_path, from_bgr, *batch):
        np.testing.assert_allclose(other.boxes, single.boxes, atol=1e-4)

    everything = model([image], conf=0.0)[0]
    assert len(everything) == model.meta.num_queries  # top-K kept when the threshold is 0
    only_star = model(image, conf={"circle": 1.1, "square": 1.1, "triangle": 1.1, "star": 0.0})
    assert set(only_star.names) <= {"star"}
    assert json.loads(json.dumps(single.to_dict()))["names"] == single.names


def test_to_dict_rounds_boxes_and_scores_without_float32_noise():
    dets = Detections(
        boxes=np.array([[12.345678, 0.1, 30.004999, 40.0]], np.float32),
        scores=np.array([0.3], np.float32),  # float32 0.3 is 0.30000001192092896 as a Python float
        labels=np.array([1]),
        names=["square"],
        image_size=(50, 60),
    )
    data = dets.to_dict()
    assert json.dumps(data["scores"]) == "[0.3]"
    assert data["boxes"] == [[12.35, 0.1, 30.0, 40.0]]
    assert data["labels"] == [1] and data["image_size"] == [50, 60]
    assert dets.scores.dtype == np.float32 and dets.boxes[0, 0] == np.float32(12.345678)  # arrays untouched
