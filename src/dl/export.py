"""Export a trained experiment: ONNX, OpenVINO IR (fp32, fp16), TensorRT engine, plus a parity report.

    python -m src.dl.export exp_name=my_run [export.dynamic_batch=true export.max_batch_size=8]

Every artifact has the postprocessing fused (inputs images + orig_target_sizes -> labels, boxes, scores;
see src/infer/meta.py) and carries its metadata, so `src.infer.load_model(path)` needs no config.
Each one is then run on val images next to the torch model; output/<exp>/export_report.json says how far
it drifts (boxes, scores, mAP50) and a drift beyond tolerance is reported loudly.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger
from omegaconf import DictConfig

from src.common.config import exp_dir, stage_main, with_saved_model_keys
from src.common.io import atomic_write, atomic_write_json
from src.infer import ARTIFACT_NAMES, available_backends, load_model
from src.infer.meta import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    ModelMeta,
    write_onnx_meta,
    write_openvino_meta,
    write_sidecar,
)
from src.infer.torch_model import DeployModel, build_deploy_model

LOUD = "!" * 100


def loud_error(message: str) -> None:
    """An error nobody scrolls past: a result that must not be used silently."""
    logger.error(f"\n{LOUD}\n{message}\n{LOUD}")


# ---------------------------------------------------------------------------------------------------- ONNX


def dummy_inputs(meta: ModelMeta, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = meta.img_size
    images = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[w, h]], dtype=torch.float32).repeat(batch, 1)
    return images, sizes


def export_onnx(
    model: DeployModel, meta: ModelMeta, path: Path, batch: int, dynamic_batch: bool, opset: int = 17
) -> Path:
    """Trace the fused model to ONNX with the legacy (TorchScript) exporter: the dynamo exporter is known
    to break on D-FINE's decoder. Batch is fixed to `batch` unless dynamic_batch."""
    import onnx

    if opset < 17:
        raise ValueError(f"export.opset must be >= 17 (LayerNorm and friends as single ops), got {opset}")
    dynamic_axes = {name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES} if dynamic_batch else None
    # Trace with 2 images when dynamic: a batch of 1 lets the tracer bake size-1 broadcasts into the graph.
    images, sizes = dummy_inputs(meta, max(batch, 2) if dynamic_batch else batch)

    def write(tmp: Path) -> None:
        with torch.no_grad():
            torch.onnx.export(
                model,
                (images, sizes),
                str(tmp),
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
        write_onnx_meta(proto, meta)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))

    atomic_write(path, write)
    logger.info(f"ONNX ({'dynamic batch' if dynamic_batch else f'batch {batch}'}, opset {opset}): {path}")
    return path


def onnx_outputs(path_or_proto, images: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    source = path_or_proto if isinstance(path_or_proto, (str, Path)) else path_or_proto.SerializeToString()
    session = ort.InferenceSession(
        str(source) if isinstance(source, Path) else source, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {INPUT_NAMES[0]: images, INPUT_NAMES[1]: sizes})


def outputs_match(a: list[np.ndarray], b: list[np.ndarray], atol: float = 1e-3) -> tuple[bool, str]:
    """Same labels, boxes (pixels) and scores, allowing float noise (and swaps of equal-score entries)."""
    labels_a, boxes_a, scores_a = a
    labels_b, boxes_b, scores_b = b
    if labels_a.shape != labels_b.shape:
        return False, f"shapes differ: {labels_a.shape} vs {labels_b.shape}"
    score_dev = float(np.abs(scores_a - scores_b).max(initial=0.0))
    # Compare per (label, position among equals) after a stable sort by score, so near-ties may swap.
    order_a, order_b = (
        np.argsort(-scores_a, axis=1, kind="stable"),
        np.argsort(-scores_b, axis=1, kind="stable"),
    )
    same_labels = np.array_equal(
        np.take_along_axis(labels_a, order_a, 1), np.take_along_axis(labels_b, order_b, 1)
    )
    box_dev = float(np.abs(boxes_a - boxes_b).max(initial=0.0))
    ok = score_dev <= atol and (box_dev <= 1e-2 or not same_labels) and same_labels
    return ok, f"max score dev {score_dev:.2e}, max box dev {box_dev:.2e} px, labels identical: {same_labels}"


def slim_onnx(path: Path, probe_batches: list[np.ndarray], meta: ModelMeta) -> bool:
    """onnxslim the graph in place, but only if the slim graph gives the same outputs on every probe batch
    (real images; several batch sizes for a dynamic graph). onnxslim has mis-folded a D-FINE-like grid
    computation with a dynamic batch before; then the unslimmed graph is kept and this is said loudly."""
    import onnx
    import onnxslim

    original = onnx.load(str(path))
    try:
        slim = onnxslim.slim(copy.deepcopy(original))
    except Exception as err:  # onnxslim is optional polish: never lose the export over it
        loud_error(f"onnxslim failed ({err}); keeping the unslimmed ONNX {path}")
        return False
    h, w = meta.img_size
    for batch in probe_batches:
        sizes = np.tile(np.array([[w, h]], np.float32), (len(batch), 1))
        reference, candidate = onnx_outputs(path, batch, sizes), onnx_outputs(slim, batch, sizes)
        ok, detail = outputs_match(reference, candidate)
        if not ok:
            loud_error(
                f"onnxslim CHANGED the model's outputs (batch {len(batch)}: {detail}). "
                f"Keeping the UNSLIMMED graph {path}; the slimmed one is discarded."
            )
            return False
        logger.info(f"onnxslim parity at batch {len(batch)}: {detail}")
    write_onnx_meta(slim, meta)  # onnxslim keeps metadata_props today; make sure regardless
    atomic_write(path, lambda tmp: onnx.save(slim, str(tmp)))
    logger.info(f"onnxslim: {len(original.graph.node)} -> {len(slim.graph.node)} nodes, outputs unchanged")
    return True


# ---------------------------------------------------------------------------------------------------- OpenVINO


def export_openvino(onnx_path: Path, meta: ModelMeta, path: Path, fp16: bool) -> Path:
    """ONNX -> OpenVINO IR (xml + bin), weights in fp16 (compress_to_fp16) or fp32; metadata in rt_info."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    ir_meta = copy.deepcopy(meta)
    ir_meta.precision = "fp16" if fp16 else "fp32"
    write_openvino_meta(model, ir_meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ov.save_model writes two files (xml + bin); write under temp names, then rename both.
    tmp_xml = path.with_name(f".{path.stem}.tmp.xml")
    ov.save_model(model, str(tmp_xml), compress_to_fp16=fp16)
    tmp_xml.with_suffix(".bin").replace(path.with_suffix(".bin"))
    tmp_xml.replace(path)
    logger.info(f"OpenVINO IR ({ir_meta.precision} weights): {path}")
    return path


# ---------------------------------------------------------------------------------------------------- TensorRT


def export_tensorrt(onnx_path: Path, meta: ModelMeta, path: Path, fp16: bool, workspace_gb: float) -> Path:
    """ONNX -> serialized TensorRT engine (build it on the GPU that will run it) + `<engine>.json` metadata."""
    from src.infer.tensorrt_model import import_tensorrt

    trt = import_tensorrt()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if meta.batch_size is None:  # dynamic batch: one optimisation profile 1..max
        h, w = meta.img_size
        profile = builder.create_optimization_profile()
        top = meta.max_batch_size
        profile.set_shape(INPUT_NAMES[0], (1, 3, h, w), (max(1, top // 2), 3, h, w), (top, 3, h, w))
        profile.set_shape(INPUT_NAMES[1], (1, 2), (max(1, top // 2), 2), (top, 2))
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    atomic_write(path, lambda tmp: tmp.write_bytes(bytes(engine)))
    engine_meta = copy.deepcopy(meta)
    engine_meta.precision = "fp16" if fp16 else "fp32"
    write_sidecar(path, engine_meta)
    logger.info(f"TensorRT engine ({engine_meta.precision}): {path}")
    return path


# ---------------------------------------------------------------------------------------------------- parity


def compare_detections(reference, candidate, iou_match: float = 0.5) -> dict[str, float]:
    """Per-detection drift of `candidate` from `reference` (lists of Detections, same images).

    Each reference detection is matched to the same-class candidate box with the highest IoU:
    box deviation = largest coordinate difference in pixels, score deviation = |score difference|.
    Reference detections without a same-class match at IoU >= iou_match count as unmatched.
    """
    from src.common.boxes import box_iou

    box_devs, score_devs, unmatched, total = [np.zeros(0)], [np.zeros(0)], 0, 0
    for ref, cand in zip(reference, candidate, strict=True):
        total += len(ref)
        if len(ref) == 0:
            continue
        if len(cand) == 0:
            unmatched += len(ref)
            continue
        iou, _ = box_iou(torch.from_numpy(ref.boxes).double(), torch.from_numpy(cand.boxes).double())
        iou = iou.numpy() * (ref.labels[:, None] == cand.labels[None, :])
        best = iou.argmax(1)
        matched = iou[np.arange(len(ref)), best] >= iou_match
        unmatched += int((~matched).sum())
        box_devs.append(np.abs(ref.boxes[matched] - cand.boxes[best[matched]]).max(1, initial=0.0))
        score_devs.append(np.abs(ref.scores[matched] - cand.scores[best[matched]]))
    box_devs, score_devs = np.concatenate(box_devs), np.concatenate(score_devs)
    return {
        "max_box_dev_px": float(box_devs.max(initial=0.0)),
        "mean_box_dev_px": float(box_devs.mean()) if box_devs.size else 0.0,
        "max_score_dev": float(score_devs.max(initial=0.0)),
        "mean_score_dev": float(score_devs.mean()) if score_devs.size else 0.0,
        "unmatched": unmatched,
        "reference_detections": total,
    }


def parity_report(
    cfg: DictConfig, artifacts: dict[str, Path], torch_path: Path, device: str
) -> dict[str, Any]:
    """Run every artifact and the torch model on val images; drift + mAP50 per artifact."""
    from src.infer.evaluate import evaluate_detector, load_split_samples

    samples = load_split_samples(cfg, "val", limit=int(cfg.export.parity_images))
    if not samples:
        logger.warning("no val images: export parity is not checked (run src.etl.split first)")
        return {}
    parity_conf = float(cfg.export.parity_conf)
    reference_model = load_model(torch_path, device=device, conf=parity_conf)
    reference = evaluate_detector(reference_model, samples, conf=parity_conf)
    report: dict[str, Any] = {"images": len(samples), "conf": parity_conf, "torch": reference.summary()}
    for name, path in artifacts.items():
        precision = cfg.export.ov_precision if name.startswith("ov") else None
        try:
            model = load_model(path, device=device, precision=precision, conf=parity_conf)
        except Exception as err:
            loud_error(f"{name}: exported {path} but cannot load it: {err}")
            report[name] = {"path": str(path), "error": str(err), "ok": False}
            continue
        result = evaluate_detector(model, samples, conf=parity_conf)
        drift = compare_detections(reference.detections, result.detections)
        tolerance = cfg.export.tolerance[tolerance_group(name)]
        delta_map = result.metrics.get("mAP_50", 0.0) - reference.metrics.get("mAP_50", 0.0)
        ok = (
            drift["max_box_dev_px"] <= tolerance.box_px
            and drift["max_score_dev"] <= tolerance.score
            and abs(delta_map) <= tolerance.map50
            and drift["unmatched"] <= tolerance.unmatched_frac * max(1, drift["reference_detections"])
        )
        report[name] = {
            "path": str(path),
            "weights": model.meta.precision,
            "precision": model.runner.precision,
            **drift,
            "mAP_50": result.metrics.get("mAP_50"),
            "mAP_50_delta": delta_map,
            "tolerance": dict(tolerance),
            "ok": bool(ok),
        }
        if not ok:
            loud_error(
                f"EXPORT PARITY FAILED for {name} ({path}): box dev {drift['max_box_dev_px']:.3f} px, "
                f"score dev {drift['max_score_dev']:.4f}, mAP50 delta {delta_map:+.4f}, "
                f"unmatched {drift['unmatched']}/{drift['reference_detections']} (tolerance {dict(tolerance)}). "
                "Do not deploy this artifact without checking it."
            )
    return report


def tolerance_group(artifact: str) -> str:
    if "int8" in artifact:
        return "int8"
    return "fp16" if "fp16" in artifact else "fp32"


def print_report(report: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in report.items() if isinstance(v, dict) and "ok" in v]
    if not rows:
        return
    lines = [
        f"{'artifact':<10} {'weights':<8} {'runs in':<8} {'box dev px':>10} {'score dev':>10} {'mAP50':>7} {'delta':>8}  status"
    ]
    for name, r in rows:
        if "error" in r:
            lines.append(f"{name:<10} {'-':<8} {'-':<8} {'-':>10} {'-':>10} {'-':>7} {'-':>8}  LOAD ERROR")
            continue
        lines.append(
            f"{name:<10} {r['weights']:<8} {r['precision']:<8} {r['max_box_dev_px']:>10.3f} {r['max_score_dev']:>10.4f} "
            f"{r['mAP_50']:>7.3f} {r['mAP_50_delta']:>+8.4f}  {'ok' if r['ok'] else 'BEYOND TOLERANCE'}"
        )
    print(
        "\n".join(
            [
                "",
                f"Export parity vs torch ({report['images']} val images, conf {report['conf']}):",
                *lines,
                "",
            ]
        )
    )


# ---------------------------------------------------------------------------------------------------- stage


def artifact_meta(
    meta: ModelMeta, batch_size: int | None, max_batch_size: int, source: Path | None = None
) -> ModelMeta:
    """The checkpoint's metadata + the export's batch contract (batch_size None = dynamic)."""
    out = copy.deepcopy(meta)
    out.batch_size = batch_size
    out.max_batch_size = int(max_batch_size)
    out.extra = {**out.extra, "exported_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if source is not None:
        out.extra["source_checkpoint"] = str(source)
    return out


def probe_batches(cfg: DictConfig, meta: ModelMeta) -> list[np.ndarray]:
    """Real val images (random noise if there are none) at every batch size the graph must serve."""
    from src.common.preprocess import preprocess_images
    from src.infer.evaluate import load_split_samples

    sizes = (
        [1, 2, int(cfg.export.max_batch_size)]
        if cfg.export.dynamic_batch
        else [int(cfg.export.max_batch_size)]
    )
    sizes = sorted(set(sizes))
    samples = load_split_samples(cfg, "val", limit=max(sizes))
    if samples:
        images = [s.read_image() for s in samples]
        images = (images * max(sizes))[: max(sizes)]
        batch, _ = preprocess_images(images, meta.img_size, meta.keep_ratio)
    else:
        batch = dummy_inputs(meta, max(sizes))[0].numpy()
    return [batch[:n] for n in sizes]


def run(cfg: DictConfig) -> dict[str, Any]:
    cfg = with_saved_model_keys(cfg)
    out_dir = exp_dir(cfg)
    checkpoint = out_dir / ARTIFACT_NAMES["torch"]
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint} not found: train exp_name={cfg.exp_name} first")
    formats = [str(f) for f in cfg.export.formats]
    unknown = sorted(set(formats) - {"onnx", "openvino", "tensorrt"})
    if unknown:
        raise ValueError(f"export.formats: unknown {unknown}; use onnx, openvino, tensorrt")
    model, torch_meta = build_deploy_model(checkpoint)
    max_batch = int(cfg.export.max_batch_size)
    meta = artifact_meta(torch_meta, None if cfg.export.dynamic_batch else max_batch, max_batch, checkpoint)
    artifacts: dict[str, Path] = {}

    onnx_path = export_onnx(
        model,
        meta,
        out_dir / ARTIFACT_NAMES["onnx"],
        meta.max_batch_size,
        bool(cfg.export.dynamic_batch),
        int(cfg.export.opset),
    )
    artifacts["onnx"] = onnx_path
    slimmed = None
    if cfg.export.simplify:
        slimmed = slim_onnx(onnx_path, probe_batches(cfg, meta), meta)

    status = available_backends()
    if "openvino" in formats:
        if status["openvino"] is None:
            artifacts["ov_fp32"] = export_openvino(
                onnx_path, meta, out_dir / ARTIFACT_NAMES["ov_fp32"], fp16=False
            )
            if cfg.export.ov_fp16:
                artifacts["ov_fp16"] = export_openvino(
                    onnx_path, meta, out_dir / ARTIFACT_NAMES["ov_fp16"], fp16=True
                )
        else:
            logger.warning(f"OpenVINO export skipped: {status['openvino']}")
    if "tensorrt" in formats:
        if status["tensorrt"] is None:
            key = "trt_fp16" if cfg.export.trt_fp16 else "trt_fp32"
            artifacts[key] = export_tensorrt(
                onnx_path,
                meta,
                out_dir / ARTIFACT_NAMES[key],
                bool(cfg.export.trt_fp16),
                float(cfg.export.trt_workspace_gb),
            )
        else:
            logger.warning(f"TensorRT export skipped: {status['tensorrt']}")
    if "onnx" not in formats:  # ONNX is the intermediate for the others; drop it if not wanted
        onnx_path.unlink()
        artifacts.pop("onnx")

    report = {"artifacts": {k: str(v) for k, v in artifacts.items()}, "onnx_slimmed": slimmed}
    report["parity"] = (
        parity_report(cfg, artifacts, checkpoint, str(cfg.device)) if cfg.export.check_parity else {}
    )
    atomic_write_json(out_dir / "export_report.json", report)
    print_report(report["parity"])
    logger.info(f"export report: {out_dir / 'export_report.json'}")
    return report


main = stage_main(run)

if __name__ == "__main__":
    main()
