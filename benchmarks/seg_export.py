"""Segmentation vs detection exports: fp32 exported latency of a segment model <= 1.25x the detector's at the
same size (ONNX Runtime and OpenVINO), mean mask IoU of the fp32 exports against torch >= 0.99.

    python -m benchmarks.seg_export [--size n] [--img 640] [--runs 20] [--images 3] [--before]

Both models are D-FINE at the same size with random weights (speed does not depend on them), exported as
`make export` does (ONNX, onnxslim, OpenVINO fp32 IR, top `--max-detections` per image) and run on the CPU
through the runtime API, batch 1:
- graph ms: the backend's run of the exported graph alone (what the 4th output, the mask logits, costs);
- predict ms: resize + graph + postprocessing, with the threshold set so that `--kept` detections are kept
  (a segmentation model also resamples their masks to the original image, network_input.masks_to_original).
--before also exports both models as they were before the deploy-mode mask head: mask logits of every query
computed and then gathered, GroupNorm by reshape, the top 300 per image. Every variant's runs alternate, so
a busy shared machine slows all alike; medians (and the fastest run, the least disturbed one).
Mask IoU: the detections of `--images` synthetic images (shapes on noise, 800x600: not the network size,
so the resize is undone too) paired with torch's as export parity pairs them (src/dl/parity.py), mean over
the pairs among each image's `--top` best, and over the whole top-K (see mask_parity).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks.random_checkpoint import random_checkpoint

TASKS = ("detect", "segment")
BEFORE = "before"  # the variant suffix of the graphs as exported before the deploy-mode mask head
BEFORE_TOP_K = 300  # what those graphs returned per image (every query of a 300-query model)


def restore_full_mask_graph(model) -> None:
    """Undo the deploy-mode mask head of a deployed model: every query's logits (then gathered by the
    postprocessor) and nn.GroupNorm, i.e. the graph exported before it (the benchmark's baseline)."""
    from torch import nn

    from src.models.mask_head import DeployGroupNorm

    head = getattr(model.model, "mask_head", None)
    if head is None:
        return
    head.deploy_mode = False
    for parent in list(head.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DeployGroupNorm):
                norm = nn.GroupNorm(child.groups, child.weight.shape[0], eps=child.eps)
                norm.weight, norm.bias = child.weight, child.bias
                setattr(parent, name, norm)


def export_fp32(
    checkpoint: Path, probe: np.ndarray, max_detections: int, before: bool = False
) -> dict[str, Path]:
    """torch checkpoint -> {torch, onnx (slimmed when it changes nothing), ov_fp32}, each returning the
    top `max_detections` per image (export.max_detections); before: the earlier mask graph."""
    from src.dl.export import artifact_meta, export_onnx, export_openvino, limit_detections, slim_onnx
    from src.runtime.torch_model import build_deploy_model

    folder = checkpoint.parent
    model, meta = build_deploy_model(checkpoint)
    if before:
        restore_full_mask_graph(model)
    limit_detections(model, max_detections)
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
    """Median and fastest graph / predict ms of each variant's detector, the variants taking turns run by
    run in an order that rotates, each turn starting with an untimed graph run (it absorbs what the previous
    variant leaves behind: runtime threads spin-waiting, caches); the fastest run is the least disturbed one
    on a shared machine."""
    from src.common.network_input import preprocess_images

    names = list(detectors)
    times = {name: {"graph": [], "predict": []} for name in names}
    for name, detector in detectors.items():  # warm-up
        for _ in range(3):
            detector.predict([image], conf=confs[name])
    for run in range(runs):
        for name in names[run % len(names) :] + names[: run % len(names)]:
            detector = detectors[name]
            batch, _ = preprocess_images([image], detector.img_size, detector.meta.keep_ratio)
            detector.run_batch(batch)
            started = time.perf_counter()
            detector.run_batch(batch)
            times[name]["graph"].append((time.perf_counter() - started) * 1000)
            times[name]["predict"].append(detector.timed([image], conf=confs[name])[1])
    return {
        name: {k: float(np.median(v)) for k, v in t.items()}
        | {f"{k}_min": float(np.min(v)) for k, v in t.items()}
        for name, t in times.items()
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


def variants(before: bool) -> dict[str, tuple[str, bool]]:
    """name -> (task, exported as before)."""
    names = {task: (task, False) for task in TASKS}
    if before:
        names |= {f"{task} {BEFORE}": (task, True) for task in TASKS}
    return names


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
    parser.add_argument("--max-detections", type=int, default=100, help="export.max_detections")
    parser.add_argument("--before", action="store_true", help="also time the graphs of before (see above)")
    args = parser.parse_args(argv)
    images = synthetic_images(max(1, args.images))
    probe = np.random.default_rng(0).random((1, 3, args.img, args.img), dtype=np.float32)
    results: dict = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "load_before": os.getloadavg(),
                     "latency": {}, "mask_iou": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, (task, before) in variants(args.before).items():
            started = time.perf_counter()
            top_k = BEFORE_TOP_K if before else args.max_detections
            checkpoint = random_checkpoint(Path(tmp) / name.replace(" ", "_"), args.size, args.img, task)
            paths[name] = export_fp32(checkpoint, probe, top_k, before)
            print(f"[{name}] exported in {time.perf_counter() - started:.0f} s")
        for backend in ("onnx", "ov_fp32"):
            detectors = {name: load_model(p[backend], device="cpu") for name, p in paths.items()}
            confs = {name: conf_keeping(d, images[0], args.kept) for name, d in detectors.items()}
            results["latency"][backend] = time_pair(detectors, images[0], confs, args.runs)
        print("[segment] mask IoU of the fp32 exports against torch:")
        results["mask_iou"] = mask_parity(paths["segment"], images, args.top)
    results["load_after"] = os.getloadavg()
    print_table(results, args)
    return results


def print_table(results: dict, args) -> None:
    load = f"load average {results['load_before'][0]:.1f} -> {results['load_after'][0]:.1f}"
    print(
        f"\nD-FINE-{args.size} at {args.img}x{args.img}, batch 1, CPU: {results['cpu']} "
        f"({results['threads']} torch threads, {load}); predict keeps {args.kept} detections"
    )
    print(
        f"{'backend':<16}{'detect ms':>10}{'segment ms':>11}{'ratio':>7}  {'predict det':>12}{'seg':>8}"
        f"{'ratio':>7}  mask IoU top {args.top} / all"
    )
    for backend, lat in results["latency"].items():
        for suffix in ("", f" {BEFORE}"):
            if f"detect{suffix}" not in lat:
                continue
            det, seg = lat[f"detect{suffix}"], lat[f"segment{suffix}"]
            iou = results["mask_iou"][backend] if not suffix else None
            label = f"{backend}{suffix}"
            print(
                f"{label:<16}{det['graph']:>10.1f}{seg['graph']:>11.1f}{seg['graph'] / det['graph']:>7.2f}  "
                f"{det['predict']:>12.1f}{seg['predict']:>8.1f}{seg['predict'] / det['predict']:>7.2f}  "
                + (f"{iou['top']:.4f} / {iou['all']:.4f}" if iou else "-")
            )
            print(
                f"{'  fastest':<16}{det['graph_min']:>10.1f}{seg['graph_min']:>11.1f}"
                f"{seg['graph_min'] / det['graph_min']:>7.2f}  {det['predict_min']:>12.1f}"
                f"{seg['predict_min']:>8.1f}{seg['predict_min'] / det['predict_min']:>7.2f}"
            )
    print(f"targets: graph ratio <= 1.25, mask IoU >= 0.99 (fp32); top-K {args.max_detections}, before 300")


if __name__ == "__main__":
    main()
