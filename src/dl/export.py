"""Export a trained experiment: ONNX, OpenVINO IR (fp32, fp16), TensorRT engine, plus a parity report.

    python -m src.dl.export exp_name=my_run [export.dynamic_batch=true export.max_batch_size=8]

Every artifact has the postprocessing fused (inputs images + orig_target_sizes -> labels, boxes, scores;
see src/runtime/meta.py) and carries its metadata, so `src.runtime.load_model(path)` needs no config.
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

from src.common.config import stage_main
from src.common.errors import UserError
from src.common.experiment import Experiment, file_sha256, stage_config
from src.common.io import atomic_write, atomic_write_json
from src.runtime import available_backends, load_model
from src.runtime.meta import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    ModelMeta,
    write_onnx_meta,
    write_openvino_meta,
    write_sidecar,
)
from src.runtime.torch_model import DeployModel, build_deploy_model

LOUD = "!" * 100
MIN_PARITY_DETECTIONS = 10  # fewer compared detections than this: the box/score check says little
# compared: detections >= conf in either model (a pair counts once); *_detections: >= conf in each model;
# unmatched / borderline: see compare_detections
PARITY_COUNTS = ("compared", "unmatched", "borderline", "reference_detections", "artifact_detections")


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

    from src.runtime.openvino_model import save_ir

    model = ov.convert_model(str(onnx_path))
    ir_meta = copy.deepcopy(meta)
    ir_meta.precision = "fp16" if fp16 else "fp32"
    write_openvino_meta(model, ir_meta)
    save_ir(model, path, compress_to_fp16=fp16)  # the .xml/.bin pair replaced as a pair
    logger.info(f"OpenVINO IR ({ir_meta.precision} weights): {path}")
    return path


# ---------------------------------------------------------------------------------------------------- TensorRT


def export_tensorrt(onnx_path: Path, meta: ModelMeta, path: Path, fp16: bool, workspace_gb: float) -> Path:
    """ONNX -> serialized TensorRT engine (build it on the GPU that will run it) + `<engine>.json` metadata."""
    from src.runtime.tensorrt_model import import_tensorrt

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


def pair_detections(reference, candidate, iou_thresh: float) -> np.ndarray:
    """Index of the `candidate` detection paired with each `reference` detection of one image (-1: none).

    One-to-one, same class, IoU >= iou_thresh: the validator's matching (src/metrics/validator.py), reference
    detections visited from the highest score down, each taking the free candidate box it overlaps most.
    """
    from src.metrics.validator import greedy_match, iou_matrix, score_order

    iou = iou_matrix(reference.boxes, candidate.boxes)
    same_class = reference.labels[:, None] == candidate.labels[None, :]
    paired, _ = greedy_match(iou, score_order(reference.scores), same_class, iou_thresh)
    return paired


def deviation_stats(values: list[np.ndarray], name: str) -> dict[str, float]:
    """max / p99 / mean of a deviation over every compared pair (0 when nothing was compared)."""
    flat = np.concatenate([np.zeros(0), *values])
    if not flat.size:
        return {f"max_{name}": 0.0, f"p99_{name}": 0.0, f"mean_{name}": 0.0}
    return {
        f"max_{name}": float(flat.max()),
        f"p99_{name}": float(np.percentile(flat, 99)),
        f"mean_{name}": float(flat.mean()),
    }


def compare_detections(
    reference, candidate, conf: float | np.ndarray = 0.0, margin: float = 0.0, iou_thresh: float = 0.5
) -> dict[str, float]:
    """How far `candidate` drifts from `reference`: lists of Detections of the same images, best given
    UNthresholded (every top-K detection, so that a detection whose score crosses `conf` between the two
    models still finds its counterpart instead of being counted missing or paired with another box).

    conf: one threshold or per-class thresholds (C,). Detections are paired one-to-one per image by class
    and IoU (pair_detections). Compared: the pairs where either side scores >= conf. Box deviation: largest
    coordinate difference of a pair in original pixels; score deviation: |score difference|.
    Unmatched: a detection CLEARLY present in one model whose counterpart is absent in the other (no pair,
    or scoring < conf): an object that appears or disappears. Clearly = score >= conf + margin, and >= the
    other model's top-K cut (its lowest score) + margin: a detection at the cut may simply have been ranked
    out of the other's top-K. Borderline: the same within the margin, e.g. a score of 0.31 in torch and
    0.29 in fp16 at conf 0.3: counted, never an error.
    """
    from src.runtime.evaluate import detection_thresholds

    box_devs, score_devs, counts = [], [], dict.fromkeys(PARITY_COUNTS, 0)
    for ref, cand in zip(reference, candidate, strict=True):
        ref_partner = pair_detections(ref, cand, iou_thresh)  # (R,) index into cand, -1: none
        cand_partner = np.full(len(cand), -1)  # (C,) the inverse pairing
        cand_partner[ref_partner[ref_partner >= 0]] = np.where(ref_partner >= 0)[0]
        ref_conf, cand_conf = detection_thresholds(ref, conf), detection_thresholds(cand, conf)
        ref_kept, cand_kept = ref.scores >= ref_conf, cand.scores >= cand_conf
        # Is each detection's counterpart kept? (a pair has one class, hence one threshold)
        ref_other_kept = counterpart_scores(ref_partner, cand.scores) >= ref_conf
        cand_other_kept = counterpart_scores(cand_partner, ref.scores) >= cand_conf
        pairs = np.where((ref_partner >= 0) & (ref_kept | ref_other_kept))[0]
        box_devs.append(np.abs(ref.boxes[pairs] - cand.boxes[ref_partner[pairs]]).max(1, initial=0.0))
        score_devs.append(np.abs(ref.scores[pairs] - cand.scores[ref_partner[pairs]]))
        gone, new = ref_kept & ~ref_other_kept, cand_kept & ~cand_other_kept
        ref_bar = np.maximum(ref_conf, top_k_cut(cand)) + margin
        cand_bar = np.maximum(cand_conf, top_k_cut(ref)) + margin
        clearly = int((ref.scores >= ref_bar)[gone].sum() + (cand.scores >= cand_bar)[new].sum())
        counts["unmatched"] += clearly
        counts["borderline"] += int(gone.sum() + new.sum()) - clearly
        unpaired = int((ref_kept & (ref_partner < 0)).sum() + (cand_kept & (cand_partner < 0)).sum())
        counts["compared"] += len(pairs) + unpaired
        counts["reference_detections"] += int(ref_kept.sum())
        counts["artifact_detections"] += int(cand_kept.sum())
    return {**deviation_stats(box_devs, "box_dev_px"), **deviation_stats(score_devs, "score_dev"), **counts}


def top_k_cut(dets) -> float:
    """Lowest score an unthresholded top-K list kept (0 when empty): below it, a detection is not output."""
    return float(dets.scores.min()) if len(dets) else 0.0


def counterpart_scores(partner: np.ndarray, other_scores: np.ndarray) -> np.ndarray:
    """Score of each detection's counterpart in the other model (-1 where it has none)."""
    scores = np.full(len(partner), -1.0)
    scores[partner >= 0] = other_scores[partner[partner >= 0]]
    return scores


def beyond_tolerance(drift: dict[str, float], delta_map: float, tolerance) -> list[str]:
    """What makes an artifact broken (empty: it is faithful). Box and score drift are judged on their 99th
    percentile over the compared pairs (the max is reported too): one odd pair among hundreds is noise, a
    broken artifact moves them all."""
    checks = [
        ("p99 box dev", drift["p99_box_dev_px"], tolerance.box_px, "px"),
        ("p99 score dev", drift["p99_score_dev"], tolerance.score, ""),
        ("|mAP50 delta|", abs(delta_map), tolerance.map50, ""),
        ("unmatched fraction", drift["unmatched"] / max(1, drift["compared"]), tolerance.unmatched_frac, ""),
    ]
    return [
        f"{name} {value:.4g}{unit} > {limit}{unit}" for name, value, limit, unit in checks if value > limit
    ]


def parity_report(
    cfg: DictConfig, artifacts: dict[str, Path], torch_path: Path, device: str
) -> dict[str, Any]:
    """Run every artifact and the torch model on val images; drift + mAP50 per artifact."""
    from src.runtime.evaluate import evaluate_detector, load_split_samples

    samples = load_split_samples(cfg, "val", limit=int(cfg.export.parity_images))
    if not samples:
        reason = f"no val images in {cfg.splits_dir} (data_path={cfg.data_path}): export parity NOT checked"
        loud_error(f"{reason}; run `make split` on the experiment's data, then export again")
        return {"skipped": reason}
    parity_conf = float(cfg.export.parity_conf)
    images = [s.read_image() for s in samples]  # decoded once for every model
    # Unthresholded (min_conf 0): mAP needs the top-K, and the pairing needs the detections below conf.
    reference_model = load_model(torch_path, device=device, conf=parity_conf)
    reference = evaluate_detector(reference_model, samples, conf=parity_conf, images=images)
    confident = sum(int((d.scores >= parity_conf).sum()) for d in reference.detections)
    if confident < MIN_PARITY_DETECTIONS:
        logger.warning(
            f"export parity: the torch model has only {confident} detections >= export.parity_conf="
            f"{parity_conf} on {len(samples)} val images, so boxes and scores are barely compared (mAP50 "
            "still is). Lower export.parity_conf or raise export.parity_images for a stronger check."
        )
    report: dict[str, Any] = {
        "images": len(samples),
        "conf": parity_conf,
        "rule": "detections paired one-to-one (same class, IoU >= 0.5) over the unthresholded top-K; "
        "deviations over pairs with a score >= conf on either side; broken if the p99 box or score "
        "deviation, |mAP50 delta| or unmatched / compared exceeds the tolerance; unmatched = score >= "
        "conf + score tolerance in one model and < conf or absent in the other",
        "torch": reference.summary() | {"detections": confident},
    }
    for name, path in artifacts.items():
        precision = cfg.export.ov_precision if name.startswith("ov") else None
        try:
            model = load_model(path, device=device, precision=precision, conf=parity_conf)
        except Exception as err:
            loud_error(f"{name}: exported {path} but cannot load it: {err}")
            report[name] = {"path": str(path), "error": str(err), "ok": False}
            continue
        result = evaluate_detector(model, samples, conf=parity_conf, images=images)
        tolerance = cfg.export.tolerance[tolerance_group(name)]
        drift = compare_detections(reference.detections, result.detections, parity_conf, tolerance.score)
        delta_map = result.metrics.get("mAP_50", 0.0) - reference.metrics.get("mAP_50", 0.0)
        problems = beyond_tolerance(drift, delta_map, tolerance)
        report[name] = {
            "path": str(path),
            "weights": model.meta.precision,
            "precision": model.runner.precision,
            **drift,
            "mAP_50": result.metrics.get("mAP_50"),
            "mAP_50_delta": delta_map,
            "tolerance": dict(tolerance),
            "problems": problems,
            "ok": not problems,
        }
        if problems:
            loud_error(
                f"EXPORT PARITY FAILED for {name} ({path}): {'; '.join(problems)} "
                f"(max box dev {drift['max_box_dev_px']:.3f} px, max score dev {drift['max_score_dev']:.4f}, "
                f"unmatched {drift['unmatched']}/{drift['compared']} compared detections). "
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
    header = (
        f"{'artifact':<9} {'weights':<7} {'runs in':<7} {'compared':>8} {'box dev p99/max px':>19} "
        f"{'score dev p99/max':>18} {'unmatched':>9} {'border':>6} {'mAP50':>6} {'delta':>8}  status"
    )
    lines = [header]
    for name, r in rows:
        if "error" in r:
            lines.append(f"{name:<9} LOAD ERROR: {r['error']}")
            continue
        lines.append(
            f"{name:<9} {r['weights']:<7} {r['precision']:<7} {r['compared']:>8} "
            f"{r['p99_box_dev_px']:>9.3f}/{r['max_box_dev_px']:<9.3f} "
            f"{r['p99_score_dev']:>8.4f}/{r['max_score_dev']:<9.4f} {r['unmatched']:>9} "
            f"{r['borderline']:>6} {r['mAP_50']:>6.3f} {r['mAP_50_delta']:>+8.4f}  "
            f"{'ok' if r['ok'] else 'BEYOND TOLERANCE'}"
        )
    title = (
        f"Export parity vs torch ({report['images']} val images, detections >= {report['conf']} compared):"
    )
    print("\n".join(["", title, *lines, ""]))


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


def probe_batches(cfg: DictConfig, meta: ModelMeta) -> tuple[list[np.ndarray], str]:
    """Real images of the experiment's splits (val, else test, else train) at every batch size the graph
    must serve, and where they came from; ([], reason) when the data set has none."""
    from src.common.network_input import preprocess_images
    from src.runtime.evaluate import load_split_samples

    sizes = (
        [1, 2, int(cfg.export.max_batch_size)]
        if cfg.export.dynamic_batch
        else [int(cfg.export.max_batch_size)]
    )
    sizes = sorted(set(sizes))
    for split in ("val", "test", "train"):
        samples = load_split_samples(cfg, split, limit=max(sizes))
        if samples:
            images = [s.read_image() for s in samples]
            images = (images * max(sizes))[: max(sizes)]
            batch, _ = preprocess_images(images, meta.img_size, meta.keep_ratio)
            return [batch[:n] for n in sizes], f"{len(samples)} {split} image(s) of {cfg.splits_dir}"
    return [], f"no split images in {cfg.splits_dir}"


def simplify(cfg: DictConfig, onnx_path: Path, meta: ModelMeta) -> bool | str:
    """onnxslim, verified on real images of the experiment; never on noise (it proves nothing there)."""
    batches, source = probe_batches(cfg, meta)
    if not batches:
        loud_error(
            f"onnxslim skipped: {source}, so a slimmed graph could not be verified; {onnx_path} kept unslimmed"
        )
        return f"skipped: {source}"
    logger.info(f"onnxslim verified on {source}")
    return slim_onnx(onnx_path, batches, meta)


def export_formats(
    cfg: DictConfig, onnx_path: Path, meta: ModelMeta, experiment: Experiment
) -> dict[str, Path]:
    """OpenVINO / TensorRT from the ONNX graph, where their libraries are installed."""
    formats = [str(f) for f in cfg.export.formats]
    status, artifacts = available_backends(), {}
    if "openvino" in formats:
        if status["openvino"] is None:
            for key, fp16 in (("ov_fp32", False), ("ov_fp16", True)):
                if not fp16 or cfg.export.ov_fp16:
                    artifacts[key] = export_openvino(onnx_path, meta, experiment.artifact(key), fp16=fp16)
        else:
            logger.warning(f"OpenVINO export skipped: {status['openvino']}")
    if "tensorrt" in formats:
        if status["tensorrt"] is None:
            key = "trt_fp16" if cfg.export.trt_fp16 else "trt_fp32"
            artifacts[key] = export_tensorrt(
                onnx_path, meta, experiment.artifact(key), bool(cfg.export.trt_fp16),
                float(cfg.export.trt_workspace_gb),
            )  # fmt: skip
        else:
            logger.warning(f"TensorRT export skipped: {status['tensorrt']}")
    return artifacts


def run(cfg: DictConfig) -> dict[str, Any]:
    cfg = stage_config(cfg)
    experiment = Experiment.of(cfg)
    checkpoint = experiment.file("best")
    if not checkpoint.exists():
        raise UserError(f"{checkpoint} not found: train exp_name={cfg.exp_name} first")
    formats = [str(f) for f in cfg.export.formats]
    unknown = sorted(set(formats) - {"onnx", "openvino", "tensorrt"})
    if unknown:
        raise UserError(f"export.formats: unknown {unknown}; use onnx, openvino, tensorrt")
    checkpoint_hash = file_sha256(checkpoint)  # before reading: what every artifact is recorded as made from
    model, torch_meta = build_deploy_model(checkpoint)
    max_batch = int(cfg.export.max_batch_size)
    meta = artifact_meta(torch_meta, None if cfg.export.dynamic_batch else max_batch, max_batch, checkpoint)

    onnx_path = export_onnx(
        model, meta, experiment.artifact("onnx"), meta.max_batch_size, bool(cfg.export.dynamic_batch),
        int(cfg.export.opset),
    )  # fmt: skip
    slimmed = simplify(cfg, onnx_path, meta) if cfg.export.simplify else None
    artifacts = {"onnx": onnx_path, **export_formats(cfg, onnx_path, meta, experiment)}
    if "onnx" not in formats:  # ONNX is the intermediate for the others; drop it if not wanted
        onnx_path.unlink()
        artifacts.pop("onnx")
    for key in artifacts:
        experiment.record_export(key, checkpoint_hash)

    report = {"artifacts": {k: str(v) for k, v in artifacts.items()}, "onnx_slimmed": slimmed}
    report["parity"] = (
        parity_report(cfg, artifacts, checkpoint, str(cfg.device)) if cfg.export.check_parity else {}
    )
    atomic_write_json(experiment.file("export_report"), report)
    print_report(report["parity"])
    logger.info(f"export report: {experiment.file('export_report')}")
    return report


main = stage_main(run)

if __name__ == "__main__":
    main()
