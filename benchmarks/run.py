"""`make benchmark`: every benchmark table in one go (model size/latency, training speed, loader, backends,
data quality, tracking).

    python -m benchmarks.run                 # all of them
    python -m benchmarks.run model train     # a subset (model | train | loader | val | backends | data | tracking |
                                             #           seg | seg_export | seg_targets | recipes | small_objects)
Each part also runs alone with its own flags:
python -m benchmarks.<model_speed|train_speed|loader_speed|val_cost|backend_speed|near_duplicates|tracking|seg_step|
seg_export|seg_targets|recipes|small_objects> -h
"""

import sys

from src.common.offline import set_offline_env

PARTS = {
    "model": ("Model size and CPU eager latency (batch 1, 640x640)", "benchmarks.model_speed"),
    "train": (
        "Training: full loop vs bare fp32 step, precision, peak RSS (D-FINE-n, 320 px, batch 8)",
        "benchmarks.train_speed",
    ),
    "loader": ("Data loader alone, with and without train.cache (mosaic on)", "benchmarks.loader_speed"),
    "val": (
        "Validation's share of training on the demo data (train.eval_every, negatives)",
        "benchmarks.val_cost",
    ),
    "backends": ("Per-backend latency, n and s at 640 on CPU", "benchmarks.backend_speed"),
    "data": ("Near-duplicates on planted copies; the doctor's speed", "benchmarks.near_duplicates"),
    "tracking": ("Tracking alone on a synthetic video of crossing shapes (ByteTrack)", "benchmarks.tracking"),
    "seg": ("Segmentation vs detection training step (D-FINE-n, 256 px, batch 4)", "benchmarks.seg_step"),
    "seg_export": (
        "Segmentation vs detection exports: fp32 ONNX/OpenVINO latency, mask IoU vs torch (D-FINE-n, 640)",
        "benchmarks.seg_export",
    ),
    "recipes": (
        "Recipe vs the reference recipe: val mAP50 against wall minutes (`--run` trains them)",
        "benchmarks.recipes",
    ),
    "small_objects": (
        "Small objects: tiling + sliced inference vs plain full-image training (trains two models)",
        "benchmarks.small_objects",
    ),
    "seg_targets": (
        "Segmentation vs detection trained with the make demo recipe on polygon demo data",
        "benchmarks.seg_targets",
    ),
}


def main(argv: list[str]) -> None:
    set_offline_env()
    import importlib

    for name in argv or list(PARTS):
        if name not in PARTS:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(PARTS)}")
        title, module = PARTS[name]
        print(f"\n=== {title} ===", flush=True)
        importlib.import_module(module).main([])


if __name__ == "__main__":
    main(sys.argv[1:])
