"""Near-identical boxes of one class: how many of a trained model's kept detections are duplicates.

    python -m benchmarks.duplicates output/demo [output/other ...] [--splits val,test] [--iou 0.7]

For each experiment folder, best.pt (torch, fp32) runs on the split's images, and at the model's own
thresholds (thresholds.json, what every later stage applies) this counts:
  kept        detections at or above their class's threshold
  duplicates  kept detections that overlap a higher-scoring kept detection of the same class at IoU > --iou
              (what a class-aware suppression at that IoU would remove)
  dup images  images with at least one duplicate
  dup TP/FP   duplicates that are false positives (their object was already found) and the (rare) ones that
              are true positives (the higher-scoring copy missed the object at IoU 0.5)
and the metrics with and without that suppression: val mAP50 and precision / recall / F1 at the model's
thresholds. The same counts at fixed thresholds (--at) separate "the model scores duplicates high" from
"the threshold is low".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from src.models.postprocess import duplicate_mask


def suppressed(dets, iou: float):
    """Detections without their same-class duplicates (every score kept, as mAP wants them)."""
    return dets.select(~duplicate_mask(dets.boxes, dets.scores, dets.labels, iou))


def count(detections, thresholds: np.ndarray, iou: float) -> dict:
    kept = [d.filter(thresholds) for d in detections]
    dup = [duplicate_mask(d.boxes, d.scores, d.labels, iou) for d in kept]
    return {
        "kept": int(sum(len(d) for d in kept)),
        "duplicates": int(sum(m.sum() for m in dup)),
        "dup_images": int(sum(bool(m.any()) for m in dup)),
        "images": len(kept),
    }


def analyse(exp: Path, split: str, iou: float, fixed: list[float]) -> dict:
    from src.common.config import load_config
    from src.common.experiment import stage_config
    from src.dl.split_samples import load_split_samples
    from src.runtime import load_model
    from src.runtime.evaluate import evaluate_detector, score

    cfg = stage_config(load_config([f"exp_name={exp.name}", f"output_dir={exp.parent}"]))
    detector = load_model(exp / "best.pt", device="cpu", precision="fp32")
    samples = load_split_samples(cfg, split)
    result = evaluate_detector(detector, samples, min_conf=0.01, desc=f"{exp.name} {split}")
    thresholds = detector.thresholds()
    conf = float(detector.meta.conf_thresh)
    names = detector.class_names
    row = {"exp": exp.name, "split": split, "threshold": conf} | count(result.detections, thresholds, iou)
    plain = {k: result.metrics[k] for k in ("mAP_50", "precision", "recall", "f1")}
    deduped = [suppressed(d, iou) for d in result.detections]
    after = score(deduped, result.samples, names, conf)
    row |= {f"{k}": round(v, 4) for k, v in plain.items()}
    row |= {f"{k}_dedup": round(after[k], 4) for k in ("mAP_50", "precision", "recall", "f1")}
    for t in fixed:
        at = count(result.detections, np.full(len(names), t, np.float32), iou)
        row[f"dup@{t}"] = f"{at['duplicates']}/{at['kept']}"
    return row


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiments", nargs="+", type=Path)
    parser.add_argument("--splits", default="val,test")
    parser.add_argument("--iou", type=float, default=0.7)
    parser.add_argument("--at", default="0.2,0.3,0.5", help="also count duplicates at these fixed thresholds")
    args = parser.parse_args(argv)
    fixed = [float(t) for t in args.at.split(",") if t]
    rows = [
        analyse(exp, split, args.iou, fixed) for exp in args.experiments for split in args.splits.split(",")
    ]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
