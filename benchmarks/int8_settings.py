"""NNCF int8 settings side by side on a trained experiment: latency against box IoU and mAP50 (the frontier).

    python -m benchmarks.int8_settings exp_name=demo [--settings default no_smooth_quant ...] [--runs 30]

Every setting (SETTINGS: NNCF's options as src/dl/quantize.py names them) quantizes the experiment's
model_fp32.xml, calibrated on its train images, into a temporary folder. Each int8 IR then runs with its
float ops at f32 and at bf16 (where the CPU has native BF16), next to the fp32 IR at f32 and bf16:
- box IoU: the detections (>= export.parity_conf) of the export parity images (every split) paired with the
  fp32 IR's as export pairs them (src/dl/parity.py): mean and 5th percentile; unmatched: detections present
  in one only, beyond export.tolerance.<group>.score of the threshold;
- mAP50 on the whole val split (what bench scores), and its delta from the fp32 IR;
- latency: median ms of single-image calls (resize + inference + postprocessing), every model taking
  turns call by call (a shared machine's load slows all alike); ratio to the fp32 IR at f32.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from src.dl.quantize import ImageSet, Int8Settings, quantize_ir

SETTINGS = {  # name -> Int8Settings fields changed from the defaults (config.yaml's ov_int8)
    "default": {},
    "no_smooth_quant": {"smooth_quant": -1.0},
    "not_transformer": {"transformer": False},
    "performance": {"preset": "performance"},
    "full_bias_correction": {"fast_bias_correction": False},
    "float_box_heads": {"float_parts": ("decoding", "box_heads")},
    "float_heads": {"float_parts": ("decoding", "box_heads", "score_heads")},
    "accuracy_box_iou": {"mode": "accuracy", "metric": "box_iou", "max_drop": 0.02},
}


def quantize_all(cfg, names: list[str], folder: Path) -> dict[str, tuple[Path, float]]:
    """setting name -> (int8 IR, seconds it took)."""
    from src.common.experiment import Experiment
    from src.runtime.evaluate import load_split_samples

    base = Int8Settings.from_options(cfg.ov_int8, conf=float(cfg.export.parity_conf))
    fp32 = Experiment.of(cfg).artifact("ov_fp32")
    calibration = ImageSet.of(load_split_samples(cfg, "train", limit=base.subset_size))
    validation = ImageSet.of(load_split_samples(cfg, "val", limit=int(cfg.ov_int8.val_images)))
    out = {}
    for name in names:
        settings = Int8Settings.from_options(base.describe() | SETTINGS[name])
        path, seconds = quantize_ir(fp32, folder / f"{name}.xml", settings, calibration, validation)
        out[name] = (path, seconds)
        print(f"[{name}] quantized in {seconds:.0f} s")
    return out


def measure(cfg, models: dict[str, tuple[Path, str]], runs: int) -> dict[str, dict]:
    """name -> box IoU against the fp32 IR, val mAP50, latency (see the module doc)."""
    from src.dl.parity import compare_detections, interleaved_latency, parity_samples, tolerance_group
    from src.runtime import load_model
    from src.runtime.evaluate import evaluate_detector, load_split_samples

    conf = float(cfg.export.parity_conf)
    parity, _ = parity_samples(cfg, int(cfg.export.parity_images))
    val = load_split_samples(cfg, "val")
    parity_images, val_images = [s.read_image() for s in parity], [s.read_image() for s in val]
    detectors = {name: load_model(path, device="cpu", precision=p) for name, (path, p) in models.items()}
    reference = evaluate_detector(detectors["fp32"], parity, conf=conf, images=parity_images)
    rows = {}
    for name, detector in detectors.items():
        on_parity = evaluate_detector(detector, parity, conf=conf, images=parity_images, desc=name)
        margin = float(cfg.export.tolerance[tolerance_group(f"ov_{name}")].score)
        drift = compare_detections(reference.detections, on_parity.detections, conf, margin)
        on_val = evaluate_detector(detector, val, conf=conf, images=val_images, desc=name)
        rows[name] = {"mean_iou": drift["mean_iou"], "p5_iou": drift["p5_iou"], "pairs": drift["pairs"],
                      "unmatched": drift["unmatched"], "mAP_50": on_val.metrics["mAP_50"]}  # fmt: skip
    for name, ms in interleaved_latency(detectors, val_images[0], runs).items():
        rows[name]["latency_ms"] = ms
    return rows


def main(argv: list[str] | None = None) -> dict[str, dict]:
    from src.common.config import load_config
    from src.common.experiment import Experiment, stage_config
    from src.runtime.openvino_model import precision_unavailable

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. exp_name=demo")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--keep", type=Path, help="write the int8 IRs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    cfg = stage_config(load_config(args.overrides))
    precisions = ["f32"] + ([] if precision_unavailable("bf16", "cpu") else ["bf16"])
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        quantized = quantize_all(cfg, args.settings, folder)
        fp32 = Experiment.of(cfg).artifact("ov_fp32")
        models = {"fp32" if p == "f32" else f"fp32@{p}": (fp32, p) for p in precisions}
        models |= {name if p == "f32" else f"{name}@{p}": (path, p)
                   for name, (path, _) in quantized.items() for p in precisions}  # fmt: skip
        rows = measure(cfg, models, args.runs)
    print_table(rows, quantized, load_before, time.perf_counter() - started)
    return rows


def print_table(rows: dict[str, dict], quantized: dict, load_before: float, seconds: float) -> None:
    base_ms, base_map = rows["fp32"]["latency_ms"], rows["fp32"]["mAP_50"]
    print(
        f"\nint8 settings vs the fp32 IR ({seconds / 60:.0f} min; load average {load_before:.1f} -> "
        f"{os.getloadavg()[0]:.1f}); box IoU over {rows['fp32']['pairs']} fp32 detections:"
    )
    print(f"{'model':<28}{'ms':>8}{'vs fp32':>8}{'mean IoU':>9}{'p5 IoU':>8}{'val mAP50':>10}{'delta':>8}"
          f"{'unmatched':>10}{'quantize s':>11}")  # fmt: skip
    for name, r in rows.items():
        seconds = quantized.get(name.split("@")[0], (None, float("nan")))[1]
        print(
            f"{name:<28}{r['latency_ms']:>8.2f}{r['latency_ms'] / base_ms:>8.2f}{r['mean_iou']:>9.4f}"
            f"{r['p5_iou']:>8.4f}{r['mAP_50']:>10.4f}{r['mAP_50'] - base_map:>+8.4f}{r['unmatched']:>10}"
            f"{seconds:>11.0f}"
        )
    print("target: <= 0.5x fp32 latency, mAP50 within 0.01, mean box IoU >= 0.98")


if __name__ == "__main__":
    main()
