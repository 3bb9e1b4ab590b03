"""Benchmark every available artifact of an experiment on the test split (val when there is no test).

    python -m src.dl.bench exp_name=my_run [bench.backends=[torch,onnx] bench.images=100]

Per backend: latency median / p90 in ms (one image at a time, after warm-up; image decoding excluded,
resize + inference + postprocessing included), throughput, mAP50, mAP50-95, precision / recall / F1 at the
artifact's threshold (src/metrics/validator.py). Writes output/<exp>/bench.csv and annotated images per backend
(bench/<backend>/: ground truth green, predictions red).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from loguru import logger
from omegaconf import DictConfig

from src.common.config import exp_dir, stage_main, with_saved_model_keys
from src.common.draw import draw_gt_vs_pred, save_image_rgb
from src.common.io import atomic_write_csv
from src.runtime import ARTIFACT_NAMES, available_backends, backend_for, load_model
from src.runtime.evaluate import EvalResult, Sample, evaluate_detector, load_split_samples
from src.runtime.slicing import sliced_if_configured

COLUMNS = [
    "backend", "device", "infer_precision", "images", "latency_ms_median", "latency_ms_p90", "throughput_img_s",
    "mAP_50", "mAP_50_95", "precision", "recall", "f1", "artifact",
]  # fmt: skip


def bench_samples(cfg: DictConfig) -> tuple[str, list[Sample]]:
    split = str(cfg.bench.split)
    order = ["test", "val"] if split == "auto" else [split]
    for name in order:
        samples = load_split_samples(cfg, name, limit=cfg.bench.images)
        if samples:
            return name, samples
    raise FileNotFoundError(
        f"no images in the {' / '.join(order)} split(s) of {cfg.splits_dir}: run `make split`"
    )


def artifacts_to_bench(cfg: DictConfig) -> dict[str, Path]:
    """Variant -> file for each requested variant that exists and whose backend works here."""
    status = available_backends()
    found = {}
    for variant in cfg.bench.backends:
        if variant not in ARTIFACT_NAMES:
            raise ValueError(f"bench.backends: unknown {variant!r}; choose from {sorted(ARTIFACT_NAMES)}")
        path = exp_dir(cfg) / ARTIFACT_NAMES[variant]
        reason = status[backend_for(path)]
        if not path.exists():
            logger.info(
                f"bench: {variant} skipped ({path.name} not found; run src.dl.export / src.dl.ov_int8)"
            )
        elif reason is not None:
            logger.warning(f"bench: {variant} skipped ({reason})")
        else:
            found[variant] = path
    return found


def save_pictures(result: EvalResult, out_dir: Path, thresholds, class_names: list[str], n: int) -> None:
    for sample, dets in list(zip(result.samples, result.above(thresholds), strict=True))[:n]:
        picture = draw_gt_vs_pred(
            sample.read_image(),
            sample.boxes,
            sample.labels,
            dets.boxes,
            dets.labels,
            dets.scores,
            class_names,
        )
        save_image_rgb(out_dir / f"{sample.path.stem}.jpg", picture)


def bench_one(cfg: DictConfig, variant: str, path: Path, samples: list[Sample]) -> dict[str, Any]:
    precision = (
        cfg.bench.ov_precision
        if variant.startswith("ov")
        else cfg.bench.torch_precision
        if variant == "torch"
        else None
    )
    detector = sliced_if_configured(load_model(path, device=str(cfg.device), precision=precision), cfg)
    result = evaluate_detector(detector, samples, warmup=int(cfg.bench.warmup), desc=f"bench {variant}")
    if cfg.bench.save_images:
        pictures = exp_dir(cfg) / "bench" / variant
        save_pictures(
            result, pictures, detector.thresholds(), detector.class_names, int(cfg.bench.save_images)
        )
    return {
        "backend": variant,
        "device": str(detector.runner.device),
        "infer_precision": detector.runner.precision,
        "images": len(result.samples),
        **result.latency_stats(),
        **{k: result.metrics[k] for k in ("mAP_50", "mAP_50_95", "precision", "recall", "f1")},
        "artifact": str(path),
    }


def format_table(frame: pd.DataFrame) -> str:
    shown = frame.drop(columns=["artifact"]).copy()
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def run(cfg: DictConfig) -> pd.DataFrame:
    cfg = with_saved_model_keys(cfg)
    split, samples = bench_samples(cfg)
    artifacts = artifacts_to_bench(cfg)
    if not artifacts:
        raise FileNotFoundError(f"nothing to benchmark in {exp_dir(cfg)}: train and export first")
    logger.info(f"bench on {len(samples)} {split} images: {', '.join(artifacts)}")
    rows = []
    for variant, path in artifacts.items():
        try:
            rows.append(bench_one(cfg, variant, path, samples))
        except Exception as err:  # one broken backend must not hide the others' numbers
            logger.error(f"bench: {variant} failed: {err}")
    frame = pd.DataFrame(rows, columns=COLUMNS)
    atomic_write_csv(exp_dir(cfg) / "bench.csv", frame)
    print(f"\nBenchmark on the {split} split ({len(samples)} images), batch 1:\n{format_table(frame)}\n")
    logger.info(f"bench: {exp_dir(cfg) / 'bench.csv'}")
    return frame


main = stage_main(run)

if __name__ == "__main__":
    main()
