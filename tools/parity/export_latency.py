"""ONNX latency of each family's export next to the official code's export of the same weights.

    PYTHONPATH=<tools/parity/README.md's extras> official-venv/bin/python tools/parity/export_latency.py \
        --deim /path/to/DEIM --detr /path/to/detr --out /tmp/export_latency [--ours-python .venv/bin/python]

Per family (smallest size: D-FINE-n, DEIM-D-FINE-n, RT-DETRv2-r18, DEIM-RT-DETRv2-r18, DETR-R50) and input
size (320, 640), three steps, each in a fresh process (the official config loader keeps the keys of
earlier files):
1. `official` (official venv): the official model with the parity fixtures' weights (tests/detinit.py's
   deterministic values, the calibrated norm statistics of tests/fixtures/parity), exported as the
   official tools/deployment/export_onnx.py does it (`model.deploy()` + `postprocessor.deploy()`, inputs
   images + orig_target_sizes, dynamic batch, opset 16, legacy exporter), and its state dict saved.
   DETR has no export script: its module in eval (no auxiliary outputs) and its PostProcess, with the
   ImageNet normalisation its data pipeline applies in front, through torch.onnx.export.
2. `ours` (our venv): our model of the same spec loads that state dict and is exported by the product's
   own `src.dl.export.export_onnx` (dynamic batch, opset 17), unslimmed like the official file.
3. `time` (either venv): onnxruntime CPU sessions with 1 intra-op and 1 inter-op thread, batch 1, the two
   graphs of a family and size run alternately; median wall and process-CPU milliseconds, and the largest
   score difference between the two graphs' sorted scores (same weights: should be ~0). Step 2 also
   checks that our ONNX equals our torch model (src.dl.export.outputs_match on every top-K output).
Prints a markdown table and writes <out>/export_latency.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PARITY = REPO / "tests" / "fixtures" / "parity"
SIZES_PX = (320, 640)
# arch -> (display name, our size, official config under configs/ or None for DETR, norm statistics file)
FAMILIES = {
    "dfine": ("D-FINE-n", "n", "deim_dfine/dfine_hgnetv2_n_coco.yml", "dfine_n_bn_stats.npz"),
    "deim_dfine": ("DEIM-D-FINE-n", "n", "deim_dfine/deim_hgnetv2_n_coco.yml", "deim/deim_n_bn_stats.npz"),
    "rtdetrv2": (
        "RT-DETRv2-r18",
        "r18",
        "deim_rtdetrv2/rtdetrv2_r18vd_120e_coco.yml",
        "rtdetrv2/rtdetrv2_r18_bn_stats.npz",
    ),
    "deim_rtdetrv2": (
        "DEIM-RT-DETRv2-r18",
        "r18",
        "deim_rtdetrv2/deim_r18vd_120e_coco.yml",
        "rtdetrv2/deim_rtdetrv2_r18_bn_stats.npz",
    ),
    "detr": ("DETR-R50", "r50", None, "detr/detr_r50_bn_stats.npz"),
}
NUM_CLASSES = 80
COMPUTED_BUFFERS = ("anchors", "valid_mask")  # image-size dependent, computed by each model itself


def onnx_path(out: Path, arch: str, px: int, side: str) -> Path:
    return out / f"{arch}_{px}_{side}.onnx"


def weights_path(out: Path, arch: str, px: int) -> Path:
    return out / f"{arch}_{px}_weights.pt"


# ------------------------------------------------------------------------------------------- official side


def fixture_weights(model, norm_stats: Path):
    """The parity fixtures' float32 weights: deterministic values, then the calibrated norm statistics."""
    import torch

    sys.path.insert(0, str(REPO))
    from tests.detinit import deterministic_state_dict

    state = model.state_dict()
    skip = {key for key in state if key.endswith(COMPUTED_BUFFERS)}
    state = deterministic_state_dict(state, skip)
    for key, value in np.load(norm_stats).items():
        state[key] = torch.from_numpy(value).to(state[key].dtype)
    model.load_state_dict(state)


def official_deim(root: Path, arch: str, px: int):
    import torch

    sys.path.insert(0, str(root))
    from engine.core import YAMLConfig

    config = FAMILIES[arch][2]
    backbone = "HGNetv2" if "dfine" in arch else "PResNet"
    cfg = YAMLConfig(
        str(root / "configs" / config), eval_spatial_size=[px, px], **{backbone: {"pretrained": False}}
    )
    model, postprocessor = cfg.model, cfg.postprocessor
    fixture_weights(model, PARITY / FAMILIES[arch][3])
    state = {key: value.clone() for key, value in model.state_dict().items()}  # deploy() fuses in place

    class Model(torch.nn.Module):  # tools/deployment/export_onnx.py's wrapper
        def __init__(self):
            super().__init__()
            self.model, self.postprocessor = model.deploy(), postprocessor.deploy()

        def forward(self, images, orig_target_sizes):
            return self.postprocessor(self.model(images), orig_target_sizes)

    return Model(), state, torch.tensor([[px, px]])


def official_detr(root: Path, px: int):
    import torch

    spec = importlib.util.spec_from_file_location("detr_make_fixtures", HERE / "detr" / "make_fixtures.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    modules = fixtures.import_official(root)
    model = fixtures.build_official(modules, "r50", dropout=0.0)[0]
    fixture_weights(model, PARITY / FAMILIES["detr"][3])
    model.aux_loss = False  # deployed: the last layer's outputs only
    postprocess = modules[2].PostProcess()
    mean = torch.tensor(fixtures.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(fixtures.IMAGENET_STD)[:, None, None]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model.eval()

        def forward(self, images, orig_target_sizes):  # sizes (B, 2) as (w, h); PostProcess takes (h, w)
            outputs = self.model((images - mean) / std)
            result = postprocess(outputs, orig_target_sizes.flip(1))
            return tuple(torch.stack([r[key] for r in result]) for key in ("labels", "boxes", "scores"))

    return Model(), model.state_dict(), torch.tensor([[px, px]], dtype=torch.float32)


def export_official(args, arch: str, px: int) -> None:
    import torch

    if arch == "detr":
        wrapper, state, size = official_detr(args.detr, px)
    else:
        wrapper, state, size = official_deim(args.deim, arch, px)
    torch.save(state, weights_path(args.out, arch, px))
    # DETR's PostProcess splits the batch into per-image results, which the tracer fixes at the traced size
    images = torch.rand(1 if arch == "detr" else 2, 3, px, px)
    with torch.no_grad():
        torch.onnx.export(
            wrapper.eval(),
            (images, size.repeat(len(images), 1)),
            str(onnx_path(args.out, arch, px, "official")),
            input_names=["images", "orig_target_sizes"],
            output_names=["labels", "boxes", "scores"],
            dynamic_axes={"images": {0: "N"}, "orig_target_sizes": {0: "N"}},
            opset_version=16,
            do_constant_folding=True,
            dynamo=False,  # the exporter the official script was written for
        )


# ------------------------------------------------------------------------------------------------ our side


def export_ours(args, arch: str, px: int) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from src.dl.export import export_onnx, onnx_outputs, outputs_match
    from src.models import ModelSpec, build
    from src.runtime.meta import ModelMeta
    from src.runtime.torch_model import DeployModel

    _, size, _, _ = FAMILIES[arch]
    classes = tuple(map(str, range(NUM_CLASSES)))
    queries = 100 if arch == "detr" else 300  # each official config's query count
    spec = ModelSpec(arch=arch, size=size, img_size=(px, px), data_class_names=classes, num_queries=queries)
    model, _, postprocessor = build(spec)
    state = torch.load(weights_path(args.out, arch, px), map_location="cpu")
    state = {key: value for key, value in state.items() if not key.endswith(COMPUTED_BUFFERS)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = [key for key in missing if not key.endswith(COMPUTED_BUFFERS)]
    if left or unexpected:
        raise SystemExit(f"{arch}: the official weights do not fit ours: missing {left}, extra {unexpected}")
    meta = ModelMeta(
        class_names=list(classes), img_size=(px, px), model_name=size, arch=arch, num_queries=queries
    )
    meta.batch_size, meta.max_batch_size = None, 8
    deploy = DeployModel(model, postprocessor).eval()  # as src.runtime.torch_model.build_deploy_model
    path = export_onnx(deploy, meta, onnx_path(args.out, arch, px, "ours"), 1, True)
    # fp32 export equals torch: every output of the top-K (no score threshold), batch 2
    images = torch.rand(2, 3, px, px, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[px, px]], dtype=torch.float32).repeat(2, 1)
    with torch.no_grad():
        reference = [t.numpy() for t in deploy(images, sizes)]
    ok, detail = outputs_match(reference, onnx_outputs(path, images.numpy(), sizes.numpy()))
    check = {"torch_vs_onnx_ok": ok, "detail": detail}
    (args.out / f"{arch}_{px}_ours_parity.json").write_text(json.dumps(check) + "\n")
    print(f"{arch} {px}: our ONNX vs torch: {detail}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ timing


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds(sess, px: int) -> dict[str, np.ndarray]:
    images = np.random.default_rng(0).random((1, 3, px, px), dtype=np.float32)
    size_input = sess.get_inputs()[1]
    dtype = np.int64 if "int64" in size_input.type else np.float32
    return {sess.get_inputs()[0].name: images, size_input.name: np.array([[px, px]], dtype=dtype)}


def run_once(sess, inputs) -> tuple[float, float, list[np.ndarray]]:
    start, cpu_start = time.perf_counter(), time.process_time()
    outputs = sess.run(None, inputs)
    return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu_start) * 1e3, outputs


def time_pair(out: Path, arch: str, px: int, warmup: int, repeats: int) -> dict:
    """Official and our graph alternately; medians in ms and the largest sorted-score difference."""
    sessions = {side: session(onnx_path(out, arch, px, side)) for side in ("official", "ours")}
    inputs = {side: feeds(sess, px) for side, sess in sessions.items()}
    wall: dict[str, list[float]] = {side: [] for side in sessions}
    cpu: dict[str, list[float]] = {side: [] for side in sessions}
    scores = {}
    for i in range(warmup + repeats):
        for side, sess in sessions.items():
            wall_ms, cpu_ms, outputs = run_once(sess, inputs[side])
            scores[side] = np.sort(outputs[2].ravel())[::-1]
            if i >= warmup:
                wall[side].append(wall_ms)
                cpu[side].append(cpu_ms)
    top = min(len(scores["official"]), len(scores["ours"]))
    return {
        "median_wall_ms": {side: statistics.median(v) for side, v in wall.items()},
        "median_cpu_ms": {side: statistics.median(v) for side, v in cpu.items()},
        "max_sorted_score_diff": float(np.abs(scores["official"][:top] - scores["ours"][:top]).max()),
        "all_wall_ms": wall,
    }


def torch_parity(out: Path, arch: str, px: int) -> str:
    path = out / f"{arch}_{px}_ours_parity.json"
    return json.loads(path.read_text())["detail"] if path.exists() else "not checked"


def table(results: dict) -> str:
    lines = [
        "| model | input | official (ms) | ours (ms) | ours/official | official CPU (ms) | ours CPU (ms) "
        "| ours/official (CPU) | max score diff | our ONNX vs torch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, r in results.items():
        arch, px = key.rsplit("_", 1)
        w, c = r["median_wall_ms"], r["median_cpu_ms"]
        lines.append(
            f"| {FAMILIES[arch][0]} | {px} | {w['official']:.1f} | {w['ours']:.1f} | "
            f"{w['ours'] / w['official']:.3f} | {c['official']:.1f} | {c['ours']:.1f} | "
            f"{c['ours'] / c['official']:.3f} | {r['max_sorted_score_diff']:.1e} | {r['ours_onnx_vs_torch']} |"
        )
    return "\n".join(lines)


def time_all(args) -> None:
    import onnxruntime

    results, load_before = {}, os.getloadavg()
    for arch in args.arch or list(FAMILIES):
        for px in SIZES_PX:
            results[f"{arch}_{px}"] = time_pair(args.out, arch, px, args.warmup, args.repeats)
            results[f"{arch}_{px}"]["ours_onnx_vs_torch"] = torch_parity(args.out, arch, px)
            partial = args.out / "export_latency.partial.json"  # kept if a later pair fails
            partial.write_text(json.dumps(results, indent=1) + "\n")
            print(f"timed {arch} {px}", file=sys.stderr, flush=True)
    report = {
        "onnxruntime": onnxruntime.__version__,
        "threads": 1,
        "repeats": args.repeats,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "results": results,
    }
    (args.out / "export_latency.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table(results))
    print(f"load average before {load_before}, after {report['loadavg_after']}")


# ------------------------------------------------------------------------------------------------ driver


def step(python: str, args, command: str, archs: list[str], px: int | None = None) -> None:
    line = [
        python,
        str(Path(__file__).resolve()),
        command,
        "--deim",
        str(args.deim),
        "--detr",
        str(args.detr),
    ]
    line += ["--out", str(args.out), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    line += [item for arch in archs for item in ("--arch", arch)] + (["--px", str(px)] if px else [])
    # our venv has its own onnx / onnxruntime / hydra: the official venv's PYTHONPATH additions stay out
    env = None if python == sys.executable else {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(line, check=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="all", choices=("all", "official", "ours", "time"))
    parser.add_argument("--deim", type=Path, required=True, help="checkout of Intellindust-AI-Lab/DEIM")
    parser.add_argument("--detr", type=Path, required=True, help="checkout of facebookresearch/detr")
    parser.add_argument("--out", type=Path, required=True, help="folder for the ONNX files and the report")
    parser.add_argument("--ours-python", default=str(REPO / ".venv" / "bin" / "python"), help="our venv")
    parser.add_argument("--arch", action="append", choices=list(FAMILIES), help="default: all five")
    parser.add_argument("--px", type=int, choices=SIZES_PX)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "official":
        export_official(args, args.arch[0], args.px)
    elif args.command == "ours":
        export_ours(args, args.arch[0], args.px)
    elif args.command == "time":
        time_all(args)
    else:
        archs = args.arch or list(FAMILIES)
        for arch in archs:
            for px in SIZES_PX:
                step(sys.executable, args, "official", [arch], px)
                step(args.ours_python, args, "ours", [arch], px)
        step(sys.executable, args, "time", archs)


if __name__ == "__main__":
    main()
