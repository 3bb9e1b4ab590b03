"""Benchmark every available artifact of an experiment on the test split (val when there is no test).

    python -m src.dl.bench exp_name=my_run [bench.backends=[torch,onnx] bench.images=100]

Per backend: latency median / p90 in ms (one image at a time, after warm-up; image decoding excluded,
resize + inference + postprocessing included), throughput, mAP50, mAP50-95 (a segmentation model also
mask_mAP_50, mask_mAP_50_95: COCO mask mAP against the labels' polygons), and precision / recall / F1 at
both thresholds, named: `*@tuned` at the model's saved thresholds (thresholds.json: the global one in column
conf_tuned, plus its per-class ones; what infer applies) and
`*@eval` at train.conf_thresh (column conf_eval), the threshold of training's metrics.csv
(src/metrics/validator.py). Writes output/<exp>/bench.csv and annotated images per backend
(bench/<backend>/: ground truth green, predictions red; masks too for a segmentation model).

A backend that fails (a stale export, a damaged file...) is a row whose note says "failed:" with the file
and the reason, and it is never `chosen`; when every backend fails the stage exits non-zero and the previous
bench.csv is kept. The pictures of a backend replace only the ones bench wrote before (src/dl/stage_outputs.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from loguru import logger
from omegaconf import DictConfig

from src.common.config import stage_main
from src.common.draw import draw_gt_vs_pred, save_image_rgb
from src.common.errors import UserError
from src.common.experiment import ARTIFACTS, Experiment, stage_config
from src.common.io import atomic_write_csv
from src.dl.artifacts import load_artifact, sliced_if_configured
from src.dl.precision import candidates
from src.dl.split_samples import full_image_config, load_split_samples
from src.dl.stage_outputs import StagedOutputs
from src.metrics.masks import MASK_COLUMNS
from src.runtime import available_backends
from src.runtime.evaluate import EvalResult, LabelledImage, evaluate_detector, score
from src.runtime.outputs import OutputNames

PR_KEYS = ("precision", "recall", "f1")
COLUMNS = [
    "backend", "device", "infer_precision", "images", "latency_ms_median", "latency_ms_p90", "throughput_img_s",
    "mAP_50", "mAP_50_95", *MASK_COLUMNS, "conf_tuned", "precision@tuned", "recall@tuned", "f1@tuned",
    "conf_eval", "precision@eval", "recall@eval", "f1@eval", "chosen", "note", "artifact",
]  # fmt: skip


class BenchFailed(UserError):
    """Every backend failed: nothing measured, the previous bench.csv is kept."""


def bench_samples(cfg: DictConfig) -> tuple[str, list[LabelledImage]]:
    split = str(cfg.bench.split)
    order = ["test", "val"] if split == "auto" else [split]
    images_cfg = full_image_config(cfg)  # trained on tiles: the full images
    for name in order:
        samples = load_split_samples(images_cfg, name, limit=cfg.bench.images)
        if samples:
            return name, samples
    raise UserError(f"no images in the {' / '.join(order)} split(s) of {cfg.splits_dir}: run `make split`")


def artifacts_to_bench(cfg: DictConfig) -> tuple[dict[str, tuple[Path, str | None]], dict[str, str]]:
    """(deployment name -> (file, runtime precision), skipped deployment -> reason) for the requested
    artifacts that exist: every runtime precision of each (src/dl/precision.py), torch at
    bench.torch_precision; a precision this machine cannot run is skipped with the reason."""
    experiment = Experiment.of(cfg)
    present = {}
    for variant in cfg.bench.backends:
        if variant not in ARTIFACTS:
            raise UserError(f"bench.backends: unknown {variant!r}; choose from {sorted(ARTIFACTS)}")
        path = experiment.artifact(variant)
        if path.exists():
            present[variant] = path
        else:
            logger.info(f"bench: {variant} skipped ({path.name} not found; run src.dl.export)")
    found, skipped = candidates(present, str(cfg.device))
    if "torch" in present:
        reason = available_backends()["torch"]
        if reason is None:
            found = {"torch": (present["torch"], str(cfg.bench.torch_precision)), **found}
        else:
            skipped["torch"] = reason
    for name, reason in skipped.items():
        logger.warning(f"bench: {name} skipped ({reason})")
    return found, skipped


def save_pictures(result: EvalResult, out_dir: Path, thresholds, class_names: list[str], n: int) -> None:
    """Ground truth and predictions of the first n samples, one picture each, named after the image's path
    (src/runtime/outputs.py: two images of the same name in different folders keep apart)."""
    shown = result.samples[:n]
    names, root = OutputNames.of_files(sample.path for sample in shown)
    for index, sample in enumerate(shown):
        dets = result.with_masks(index).filter(thresholds)
        image = sample.read_image()
        gt_masks = sample.masks(*image.shape[:2])[sample.has_mask] if dets.masks is not None else None
        picture = draw_gt_vs_pred(
            image, sample.boxes, sample.labels, dets.boxes, dets.labels, dets.scores, class_names,
            gt_masks=gt_masks, pred_masks=dets.masks,
        )  # fmt: skip
        save_image_rgb(out_dir / names.in_folder(".", sample.path.relative_to(root), ".jpg"), picture)


def bench_one(
    cfg: DictConfig, variant: str, path: Path, precision: str | None, samples: list[LabelledImage]
) -> dict[str, Any]:
    detector = sliced_if_configured(load_artifact(path, device=str(cfg.device), precision=precision), cfg)
    result = evaluate_detector(detector, samples, warmup=int(cfg.bench.warmup), desc=f"bench {variant}")
    # P/R/F1 where the model is deployed (its saved global + per-class thresholds, what infer applies) and
    # at train.conf_thresh, what training's metrics.csv reports them at.
    at_tuned = score(result.above(detector.thresholds()), result.samples, detector.class_names, conf=0.0)
    conf_eval = float(cfg.train.conf_thresh)
    at_eval = score(result.detections, result.samples, detector.class_names, conf_eval)
    if cfg.bench.save_images:
        with StagedOutputs(Experiment.of(cfg).file("bench_images") / variant, "bench") as pictures:
            shown = int(cfg.bench.save_images)
            save_pictures(result, pictures.path, detector.thresholds(), detector.class_names, shown)
            pictures.commit()
    return {
        "backend": variant,
        "device": str(detector.runner.device),
        "infer_precision": detector.runner.precision,
        "images": len(result.samples),
        **result.latency_stats(),
        "mAP_50": result.metrics["mAP_50"],
        "mAP_50_95": result.metrics["mAP_50_95"],
        **{k: result.metrics[k] for k in MASK_COLUMNS if k in result.metrics},
        "conf_tuned": float(detector.meta.conf_thresh),
        **{f"{k}@tuned": at_tuned[k] for k in PR_KEYS},
        "conf_eval": conf_eval,
        **{f"{k}@eval": at_eval[k] for k in PR_KEYS},
        "artifact": str(path),
    }


def bench_columns(rows: list[dict[str, Any]]) -> list[str]:
    """bench.csv's columns: the mask mAP columns only when a segmentation model was measured."""
    segment = any(key in row for row in rows for key in MASK_COLUMNS)
    return [c for c in COLUMNS if segment or c not in MASK_COLUMNS]


def format_table(frame: pd.DataFrame) -> str:
    shown = frame.drop(columns=["artifact", "note"]).copy()
    notes = [f"  {row.backend}: {row.note}" for row in frame.itertuples() if isinstance(row.note, str)]
    return "\n".join([shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"), *notes])


def mark_chosen(rows: list[dict[str, Any]], deployment: dict) -> None:
    """`chosen` on the measured row of the deployment export recorded (its reason in `note`); a row that
    failed or was skipped keeps its own note and is never chosen."""
    for row in rows:
        measured = "note" not in row
        row["chosen"] = measured and row["backend"] == deployment.get("name")
        if row["chosen"]:
            row["note"] = f"chosen by export: {deployment.get('reason')}"


def run(cfg: DictConfig) -> pd.DataFrame:
    cfg = stage_config(cfg)
    experiment = Experiment.of(cfg)
    split, samples = bench_samples(cfg)
    artifacts, skipped = artifacts_to_bench(cfg)
    if not artifacts:
        raise UserError(f"nothing to benchmark in {experiment.root}: train and export first")
    logger.info(f"bench on {len(samples)} {split} images: {', '.join(artifacts)}")
    rows, failures = [], []
    for variant, (path, precision) in artifacts.items():
        try:
            rows.append(bench_one(cfg, variant, path, precision, samples))
        except Exception as err:  # one broken backend must not hide the others' numbers
            failures.append(f"{variant} ({path}): {err}")
            logger.error(f"bench: {failures[-1]}")
            rows.append({"backend": variant, "note": f"failed: {err}", "artifact": str(path)})
    if len(failures) == len(artifacts):
        raise BenchFailed(
            f"bench: every backend failed, {experiment.file('bench')} left as it was: " + "; ".join(failures)
        )
    rows += [{"backend": name, "note": f"skipped: {reason}"} for name, reason in skipped.items()]
    mark_chosen(rows, experiment.deployment())
    frame = pd.DataFrame(rows, columns=bench_columns(rows))
    atomic_write_csv(experiment.file("bench"), frame)
    print(f"\nBenchmark on the {split} split ({len(samples)} images), batch 1:\n{format_table(frame)}\n")
    logger.info(f"bench: {experiment.file('bench')}")
    return frame


main = stage_main(run)

if __name__ == "__main__":
    main()
