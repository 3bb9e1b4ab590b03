"""Segmentation vs detection exports (issue 14's targets: fp32 exported latency <= 1.25x the detector's,
mean mask IoU of the fp32 exports against torch >= 0.99).

    python -m benchmarks.seg_export [--size n] [--img 640] [--runs 20] [--images 3]

Both models are D-FINE at the same size with random weights (speed does not depend on them), exported as
`make export` does (ONNX, onnxslim, OpenVINO fp32 IR) and run on the CPU through the runtime API, batch 1:
- graph ms: the backend's run of the exported graph alone (what the 4th output, the mask logits, costs);
- predict ms: resize + graph + postprocessing, with the threshold set so that `--kept` detections are kept
  (a segmentation model also resamples their masks to the original image, network_input.masks_to_original).
Detection and segmentation runs alternate, so a busy shared machine slows both alike; medians.
Mask IoU: the detections of `--images` synthetic images (shapes on noise, 800x600: not the network size,
so the resize is undone too) paired with torch's as export parity pairs them (src/dl/parity.py), mean over
the pairs among each image's `--top` best, and over the whole top-K (see mask_parity).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from src.common.io import atomic_torch_save

NUM_CLASSES = 80
TASKS = ("detect", "segment")


def make_checkpoint(folder: Path, size: str, img: int, task: str) -> Path:
    """A checkpoint in the trainer's format with freshly initialised weights (the same seed for both tasks:
    the detection part of the two models is identical)."""
    from src.models import build_model

    torch.manual_seed(0)
    model = build_model(size, NUM_CLASSES, img_size=(img, img), num_queries=300, task=task)
    meta = {
        "model_name": size, "variant": "dfine", "num_classes": NUM_CLASSES, "task": task,
        "class_names": [f"class{i}" for i in range(NUM_CLASSES)], "img_size": [img, img],
        "keep_ratio": False, "num_queries": 300, "thresholds": {"conf_thresh": 0.5},
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_torch_save(folder / "best.pt", {"model": model.state_dict(), "ema": None, "meta": meta})


def export_fp32(checkpoint: Path, probe: np.ndarray) -> dict[str, Path]:
    """torch checkpoint -> {torch, onnx (slimmed when it changes nothing), ov_fp32}."""
    from src.dl.export import artifact_meta, export_onnx, export_openvino, slim_onnx
    from src.runtime.torch_model import build_deploy_model

    folder = checkpoint.parent
    model, meta = build_deploy_model(checkpoint)
    meta = artifact_meta(meta, batch_size=1, max_batch_size=1)
    onnx_path = export_onnx(model, meta, folder / "model.onnx", 1, dynamic_batch=False)
    slim_onnx(onnx_path, [probe], meta)
    ov_path = export_openvino(onnx_path, meta, folder / "model_fp32.xml", fp16=False)
    return {"torch": checkpoint, "onnx": onnx_path, "ov_fp32": ov_path}


def synthetic_images(count: int, height: int = 600, width: int = 800) -> list[np.ndarray]:
    """Noise with a few filled shapes: a picture with edges and regions, unlike plain noise."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        image = rng.integers(60, 140, (height, width, 3), dtype=np.uint8)
        for _ in range(6):
            centre = (int(rng.integers(80, width - 80)), int(rng.integers(80, height - 80)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                cv2.circle(image, centre, int(rng.integers(20, 80)), colour, -1)
            else:
                half = rng.integers(20, 80, 2)
                cv2.rectangle(
                    image, tuple(np.subtract(centre, half)), tuple(np.add(centre, half)), colour, -1
                )
        images.append(image)
    return images


def conf_keeping(detector, image: np.ndarray, kept: int) -> float:
    """The threshold that keeps the `kept` highest-scoring detections of `image`."""
    scores = detector(image, conf=0.0).scores
    return float(scores[min(kept, len(scores)) - 1]) if len(scores) else 0.0


def time_pair(detectors: dict, image: np.ndarray, confs: dict, runs: int) -> dict[str, dict[str, float]]:
    """Median and fastest graph / predict ms of each task's detector, the tasks alternating run by run (the
    fastest run is the least disturbed one on a shared machine)."""
    from src.common.network_input import preprocess_images

    times = {task: {"graph": [], "predict": []} for task in detectors}
    for task, detector in detectors.items():  # warm-up
        for _ in range(3):
            detector.predict([image], conf=confs[task])
    for _ in range(runs):
        for task, detector in detectors.items():
            batch, _ = preprocess_images([image], detector.img_size, detector.meta.keep_ratio)
            started = time.perf_counter()
            detector.run_batch(batch)
            times[task]["graph"].append((time.perf_counter() - started) * 1000)
            times[task]["predict"].append(detector.timed([image], conf=confs[task])[1])
    return {
        task: {k: float(np.median(v)) for k, v in t.items()}
        | {f"{k}_min": float(np.min(v)) for k, v in t.items()}
        for task, t in times.items()
    }


def mask_parity(paths: dict[str, Path], images: list[np.ndarray], top: int) -> dict[str, dict[str, float]]:
    """Mean mask IoU of each export's detections against torch's, paired as export parity pairs them:
    over the pairs among each image's `top` highest-scoring torch detections, and over the whole top-K.
    Random weights give nearly flat mask logits (std ~0.04 over a query's map): float differences of ~1e-4
    between torch and a fused export graph then move the 0-crossing, a mask's edge, by pixels. The low-score
    tail of the top-K shows it most; a trained model's logits cross 0 steeply at object edges."""
    from src.dl.parity import compare_detections
    from src.runtime import load_model

    reference = [load_model(paths["torch"], device="cpu")(image, conf=0.0) for image in images]
    out = {}
    for name in ("onnx", "ov_fp32"):
        model = load_model(paths[name], device="cpu")
        candidate = [model(image, conf=0.0) for image in images]
        weighted, pairs = 0.0, 0
        for ref, cand in zip(reference, candidate, strict=True):
            conf = float(ref.scores[min(top, len(ref)) - 1]) if len(ref) else 0.0
            drift = compare_detections([ref], [cand], conf=conf)
            weighted, pairs = weighted + drift["mean_mask_iou"] * drift["compared"], pairs + drift["compared"]
        every = compare_detections(reference, candidate, conf=0.0)
        out[name] = {"top": weighted / max(1, pairs), "top_pairs": pairs, "all": every["mean_mask_iou"],
                     "all_pairs": every["compared"]}  # fmt: skip
        print(
            f"  {name}: mean mask IoU {out[name]['top']:.4f} over {pairs} pairs of the top {top} per image, "
            f"{every['mean_mask_iou']:.4f} over all {every['compared']} top-K pairs"
        )
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> dict:
    from src.runtime import load_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="n")
    parser.add_argument("--img", type=int, default=640)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--images", type=int, default=3, help="images for the mask IoU")
    parser.add_argument("--kept", type=int, default=10, help="detections kept per image when timing predict")
    parser.add_argument("--top", type=int, default=30, help="mask IoU over the top N detections per image")
    args = parser.parse_args(argv)
    images = synthetic_images(max(1, args.images))
    probe = np.random.default_rng(0).random((1, 3, args.img, args.img), dtype=np.float32)
    results: dict = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "latency": {}, "mask_iou": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for task in TASKS:
            started = time.perf_counter()
            paths[task] = export_fp32(make_checkpoint(Path(tmp) / task, args.size, args.img, task), probe)
            print(f"[{task}] exported in {time.perf_counter() - started:.0f} s")
        for backend in ("onnx", "ov_fp32"):
            detectors = {task: load_model(paths[task][backend], device="cpu") for task in TASKS}
            confs = {task: conf_keeping(d, images[0], args.kept) for task, d in detectors.items()}
            results["latency"][backend] = time_pair(detectors, images[0], confs, args.runs)
        print("[segment] mask IoU of the fp32 exports against torch:")
        results["mask_iou"] = mask_parity(paths["segment"], images, args.top)
    print_table(results, args)
    return results


def print_table(results: dict, args) -> None:
    print(
        f"\nD-FINE-{args.size} at {args.img}x{args.img}, batch 1, CPU: {results['cpu']} "
        f"({results['threads']} torch threads); predict keeps {args.kept} detections"
    )
    print(
        f"{'backend':<9}{'detect ms':>10}{'segment ms':>11}{'ratio':>7}  {'predict det':>12}{'seg':>8}{'ratio':>7}"
        f"  mask IoU top {args.top} / all"
    )
    for backend, lat in results["latency"].items():
        det, seg = lat["detect"], lat["segment"]
        print(
            f"{backend:<9}{det['graph']:>10.1f}{seg['graph']:>11.1f}{seg['graph'] / det['graph']:>7.2f}  "
            f"{det['predict']:>12.1f}{seg['predict']:>8.1f}{seg['predict'] / det['predict']:>7.2f}  "
            f"{results['mask_iou'][backend]['top']:.4f} / {results['mask_iou'][backend]['all']:.4f}"
        )
        print(
            f"{'  fastest':<9}{det['graph_min']:>10.1f}{seg['graph_min']:>11.1f}"
            f"{seg['graph_min'] / det['graph_min']:>7.2f}  {det['predict_min']:>12.1f}{seg['predict_min']:>8.1f}"
            f"{seg['predict_min'] / det['predict_min']:>7.2f}"
        )
    print("targets: graph ratio <= 1.25, mask IoU >= 0.99 (fp32)")


if __name__ == "__main__":
    main()
