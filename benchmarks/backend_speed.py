"""Per-backend CPU latency of D-FINE n and s at 640x640 (batch 1): torch, ONNX Runtime, OpenVINO fp32 /
fp16 weights / int8. Untrained weights (speed does not depend on them); int8 is calibrated on noise images,
so only its speed is meaningful here.

    python -m benchmarks.backend_speed [--sizes n s] [--img 640] [--runs 20] [--no-int8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.random_checkpoint import random_checkpoint


def export_all(checkpoint: Path, int8: bool) -> dict[str, Path]:
    from src.dl.export import artifact_meta, export_onnx, export_openvino, slim_onnx
    from src.runtime.torch_model import build_deploy_model

    folder = checkpoint.parent
    model, meta = build_deploy_model(checkpoint)
    meta = artifact_meta(meta, batch_size=1, max_batch_size=1)
    onnx_path = export_onnx(model, meta, folder / "model.onnx", 1, dynamic_batch=False)
    h, w = meta.img_size
    slim_onnx(onnx_path, [np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)], meta)
    paths = {"torch": checkpoint, "onnx": onnx_path}
    paths["ov_fp32"] = export_openvino(onnx_path, meta, folder / "model_fp32.xml", fp16=False)
    paths["ov_fp16"] = export_openvino(onnx_path, meta, folder / "model_fp16.xml", fp16=True)
    if int8:
        paths["ov_int8"] = quantize_on_noise(paths["ov_fp32"], meta, folder / "model_int8.xml")
    return paths


def quantize_on_noise(fp32_path: Path, meta, out: Path, images: int = 16) -> Path:
    """int8 with the default ov_int8 settings, calibrated on noise (only its speed means anything)."""
    from src.dl.quantize import ImageSet, Int8Settings, quantize_ir

    rng = np.random.default_rng(0)
    h, w = meta.img_size
    noise = ImageSet([], [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(images)])
    return quantize_ir(fp32_path, out, Int8Settings(subset_size=images), noise)[0]


def latency(path: Path, runs: int, img: int) -> tuple[float, float]:
    from src.runtime import load_model

    detector = load_model(path, device="cpu")
    image = np.random.default_rng(1).integers(0, 256, (img, img, 3), dtype=np.uint8)
    for _ in range(3):
        detector.predict([image])
    times = [detector.timed([image])[1] for _ in range(runs)]
    return float(np.median(times)), float(np.percentile(times, 90))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["n", "s"])
    parser.add_argument("--img", type=int, default=640)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--backends", nargs="+", help="only these of torch onnx ov_fp32 ov_fp16 ov_int8")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)  # eager torch suffers most when cores are oversubscribed
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            folder = Path(tmp) / size
            started = time.perf_counter()
            int8 = not args.no_int8 and (not args.backends or "ov_int8" in args.backends)
            paths = export_all(random_checkpoint(folder, size, args.img), int8=int8)
            paths = {k: v for k, v in paths.items() if not args.backends or k in args.backends}
            print(f"[{size}] exported in {time.perf_counter() - started:.0f} s")
            for backend, path in paths.items():
                median, p90 = latency(path, args.runs, args.img)
                rows.append({"model": size, "backend": backend, "median_ms": median, "p90_ms": p90})
                print(f"[{size}] {backend:<8} {median:8.1f} ms (p90 {p90:.1f})")
    threads = torch.get_num_threads()
    print(
        f"\nCPU latency, batch 1, {args.img}x{args.img}, resize + inference + postprocessing ({threads} threads):"
    )
    print(f"{'model':<6}{'backend':<10}{'median ms':>10}{'p90 ms':>9}{'img/s':>8}")
    for r in rows:
        print(
            f"{r['model']:<6}{r['backend']:<10}{r['median_ms']:>10.1f}{r['p90_ms']:>9.1f}{1000 / r['median_ms']:>8.1f}"
        )
    return rows


if __name__ == "__main__":
    main()
