"""Export a trained experiment: ONNX, OpenVINO IR (fp32, fp16), TensorRT engine, plus a parity report.

    python -m src.dl.export exp_name=my_run [export.dynamic_batch=true export.max_batch_size=8]

Every artifact has the postprocessing fused (inputs images + orig_target_sizes -> labels, boxes, scores
of the top export.max_detections per image, and for a segmentation model masks: low-resolution mask logits
of those; see src/runtime/meta.py) and carries its metadata, so `src.runtime.load_model(path)` needs no
config. Each one is then run next to the torch model on up to export.parity_images images of every split;
output/<exp>/export_report.json says how far it drifts (paired boxes, scores, mAP50 with its bootstrap
interval; src/dl/parity.py), a drift beyond tolerance is reported loudly, and the fastest deployment that
holds export.precision_rule is chosen (src/dl/precision.py). export.int8 adds model_int8.xml
(src/dl/quantize.py) to the candidates.
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
from src.common.network_input import preprocess_images
from src.dl.parity import loud_error, parity_report, print_report
from src.dl.precision import candidates, choose
from src.dl.quantize import Int8Settings, calibration_sets, make_int8
from src.dl.split_samples import load_split_samples
from src.runtime import available_backends
from src.runtime.meta import (
    INPUT_NAMES,
    ModelMeta,
    write_onnx_meta,
    write_openvino_meta,
    write_sidecar,
)
from src.runtime.openvino_model import save_ir
from src.runtime.tensorrt_model import import_tensorrt
from src.runtime.torch_model import DeployModel, build_deploy_model

# ---------------------------------------------------------------------------------------------------- ONNX


def limit_detections(model: DeployModel, max_detections: int) -> int:
    """The graph returns the top `max_detections` detections per image (never more than the model's own
    top-K); a segment model's graph then computes mask logits for those queries only. Returns K."""
    return model.postprocessor.deploy(max_detections=max_detections).num_top_queries


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
    names = INPUT_NAMES + meta.output_names  # a segment model has a 4th output, "masks"
    dynamic_axes = {name: {0: "batch"} for name in names} if dynamic_batch else None
    # Trace with 2 images when dynamic: a batch of 1 lets the tracer bake size-1 broadcasts into the graph.
    images, sizes = dummy_inputs(meta, max(batch, 2) if dynamic_batch else batch)

    def write(tmp: Path) -> None:
        with torch.no_grad():
            torch.onnx.export(
                model,
                (images, sizes),
                str(tmp),
                input_names=list(INPUT_NAMES),
                output_names=list(meta.output_names),
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


# Largest mask-logit change onnxslim may make (float noise; a mis-folded graph moves logits by whole units).
MASK_LOGIT_ATOL = 1e-2


def outputs_match(a: list[np.ndarray], b: list[np.ndarray], atol: float = 1e-3) -> tuple[bool, str]:
    """Same labels, boxes (pixels) and scores [and mask logits], allowing float noise (and swaps of
    equal-score entries)."""
    labels_a, boxes_a, scores_a, *masks_a = a
    labels_b, boxes_b, scores_b, *masks_b = b
    if labels_a.shape != labels_b.shape or len(a) != len(b):
        return False, f"shapes differ: {[o.shape for o in a]} vs {[o.shape for o in b]}"
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
    detail = f"max score dev {score_dev:.2e}, max box dev {box_dev:.2e} px, labels identical: {same_labels}"
    if masks_a:  # (B, K, h, w): compared in the same score order as the labels
        order = lambda o: o[:, :, None, None]  # noqa: E731
        mask_dev = float(
            np.abs(
                np.take_along_axis(masks_a[0], order(order_a), 1)
                - np.take_along_axis(masks_b[0], order(order_b), 1)
            ).max(initial=0.0)
        )
        ok = ok and mask_dev <= MASK_LOGIT_ATOL
        detail += f", max mask logit dev {mask_dev:.2e}"
    return ok, detail


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
        reference = onnx_outputs(path, batch, sizes)
        try:
            ok, detail = outputs_match(reference, onnx_outputs(slim, batch, sizes))
        except Exception as err:  # a slimmed graph onnxruntime cannot load or run counts as changed
            ok, detail = False, f"the slimmed graph does not run: {err}"
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
    save_ir(model, path, compress_to_fp16=fp16)  # the .xml/.bin pair replaced as a pair
    logger.info(f"OpenVINO IR ({ir_meta.precision} weights): {path}")
    return path


# ---------------------------------------------------------------------------------------------------- TensorRT


def int8_calibrator(trt, batches: list[np.ndarray], cache: Path):
    """A TensorRT IInt8EntropyCalibrator2 over preprocessed split images (batches (B, 3, H, W) float32),
    its scales cached in `cache` (a rebuild skips calibration). Written for GPU machines; not run on the
    CPU-only machine this project is developed on."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.batches, self.device_batch = iter(batches), None

        def get_batch_size(self) -> int:
            return int(batches[0].shape[0])

        def get_batch(self, names):  # one device pointer per network input, None when done
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.device_batch = torch.from_numpy(batch).cuda()  # kept alive until the next call
            h, w = batch.shape[2:]
            self.device_sizes = torch.tensor([[w, h]] * len(batch), dtype=torch.float32).cuda()
            pointers = {
                INPUT_NAMES[0]: self.device_batch.data_ptr(),
                INPUT_NAMES[1]: self.device_sizes.data_ptr(),
            }
            return [pointers[name] for name in names]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, data) -> None:
            atomic_write(cache, lambda tmp: tmp.write_bytes(bytes(data)))

    return EntropyCalibrator()


def export_tensorrt(
    onnx_path: Path, meta: ModelMeta, path: Path, precision: str, workspace_gb: float, calibration=None
) -> Path:
    """ONNX -> serialized TensorRT engine (build it on the GPU that will run it) + `<engine>.json` metadata.
    precision fp32 | fp16 | int8 (int8: `calibration` batches of split images; fp16 kept for what int8
    cannot take)."""

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
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = int8_calibrator(trt, calibration, path.with_suffix(".calib"))
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
    engine_meta.precision = precision
    write_sidecar(path, engine_meta)
    logger.info(f"TensorRT engine ({engine_meta.precision}): {path}")
    return path


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
            engines = ["fp16" if cfg.export.trt_fp16 else "fp32"] + (["int8"] if cfg.export.trt_int8 else [])
            for precision in engines:
                calibration = probe_batches(cfg, meta)[0] if precision == "int8" else None
                if precision == "int8" and not calibration:
                    logger.warning("TensorRT int8 skipped: no split images to calibrate on")
                    continue
                key = f"trt_{precision}"
                artifacts[key] = export_tensorrt(
                    onnx_path, meta, experiment.artifact(key), precision,
                    float(cfg.export.trt_workspace_gb), calibration,
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
    top_k = limit_detections(model, int(cfg.export.max_detections))
    max_batch = int(cfg.export.max_batch_size)
    meta = artifact_meta(torch_meta, None if cfg.export.dynamic_batch else max_batch, max_batch, checkpoint)
    meta.extra["max_detections"] = top_k

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
    artifacts |= quantize_int8(cfg, experiment, artifacts)

    report = {"artifacts": {k: str(v) for k, v in artifacts.items()}, "onnx_slimmed": slimmed}
    runnable, skipped = candidates(artifacts, str(cfg.device))
    for name, reason in skipped.items():
        logger.warning(f"precision {name} skipped: {reason}")
    report["parity"] = (
        parity_report(cfg, runnable, checkpoint, str(cfg.device)) if cfg.export.check_parity else {}
    )
    report["skipped"] = skipped
    print_report(report["parity"])
    report["deployment"] = choose_deployment(cfg, experiment, report["parity"], skipped)
    atomic_write_json(experiment.file("export_report"), report)
    logger.info(f"export report: {experiment.file('export_report')}")
    return report


def quantize_int8(cfg: DictConfig, experiment: Experiment, artifacts: dict[str, Path]) -> dict[str, Path]:
    """model_int8.xml by NNCF (src/dl/quantize.py, the ov_int8.* options, calibrated on train images) when
    export.int8 and there is an fp32 IR; export's parity check then measures it like every artifact."""
    if not cfg.export.int8 or "ov_fp32" not in artifacts:
        return {}
    settings = Int8Settings.from_options(cfg.ov_int8, conf=float(cfg.export.parity_conf))
    load = lambda split, limit: load_split_samples(cfg, split, limit=limit)  # noqa: E731
    try:
        validation_size = int(cfg.ov_int8.val_images) if settings.mode == "accuracy" else 0
        calibration, validation = calibration_sets(load, settings, validation_size)
        return {"ov_int8": make_int8(experiment, settings, calibration, validation)[0]}
    except UserError as err:  # no images to calibrate on: the float exports stand
        logger.warning(f"OpenVINO int8 skipped: {err}")
        return {}


def choose_deployment(cfg: DictConfig, experiment: Experiment, parity: dict, skipped: dict) -> dict:
    """The fastest deployment holding export.precision_rule (or the pinned export.precision), recorded."""
    pin = str(cfg.export.precision)
    if not any(isinstance(v, dict) and "ok" in v for v in parity.values()):
        reason = "parity not measured (export.check_parity=false or no val images): no deployment chosen"
        logger.warning(f"precision: {reason}; infer uses the fp32 exports")
        choice = {"name": None, "reason": reason}
    else:
        choice = choose(parity, skipped, pin, cfg.export.precision_rule)
        logger.info(f"deployment: {choice['name']}: {choice['reason']}")
    experiment.record_deployment({**choice, "device": str(cfg.device)})
    return choice


main = stage_main(run)

if __name__ == "__main__":
    main()
