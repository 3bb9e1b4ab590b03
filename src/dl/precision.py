"""Deployment precision per machine: which (artifact, runtime precision) pairs run here, and which to use.

A deployment is an exported file run at one inference precision: model_fp32.xml at f32 or bf16,
model_fp16.xml at f16, model_int8.xml, model.onnx, TensorRT engines. Export measures every deployment this
machine can run against torch (src/dl/parity.py, on up to export.parity_images images of every split:
paired box IoU and score deviation percentiles, the mAP50 delta with its paired bootstrap interval,
detections present in one runtime only, for a segmentation model the pairs' mean mask IoU, latency) and
picks the fastest one that holds export.precision_rule (`holds`); export.precision pins a family
(fp32 | bf16 | f16 | int8) instead. The choice and its reason go to the manifest ("deployment"), bench.csv
(column `chosen`) and are what best_artifact / load_model use when no precision is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.dl.parity import MIN_PARITY_DETECTIONS, significant_drop, too_many_unmatched
from src.runtime import available_backends, backend_for
from src.runtime.openvino_model import precision_unavailable

FAMILIES = ("fp32", "bf16", "f16", "int8")


@dataclass(frozen=True)
class Deployment:
    name: str  # how reports and bench.csv name it
    artifact: str  # ARTIFACTS key of the file
    runtime: str | None  # precision given to load_model (None: the file runs as exported)
    family: str  # what export.precision pins: fp32 | bf16 | f16 | int8


DEPLOYMENTS = (
    Deployment("onnx", "onnx", None, "fp32"),
    Deployment("ov_fp32", "ov_fp32", "f32", "fp32"),
    Deployment("ov_fp32@bf16", "ov_fp32", "bf16", "bf16"),
    Deployment("ov_fp16", "ov_fp16", "f32", "f16"),  # fp16 weights, computed in f32 (CPUs without FP16)
    Deployment("ov_fp16@f16", "ov_fp16", "f16", "f16"),
    Deployment("ov_int8", "ov_int8", "f32", "int8"),
    Deployment("ov_int8@bf16", "ov_int8", "bf16", "int8"),  # int8 layers + bf16 for what stayed float
    Deployment("trt_fp32", "trt_fp32", None, "fp32"),
    Deployment("trt_fp16", "trt_fp16", None, "f16"),
    Deployment("trt_int8", "trt_int8", None, "int8"),
)
BASELINE = "ov_fp32"  # the fp32 deployment latency ratios are given against (CPU)
BY_NAME = {d.name: d for d in DEPLOYMENTS}


def unavailable_reason(deployment: Deployment, path: Path, device: str) -> str | None:
    """Why this machine cannot run `deployment` (None: it can): a missing library or GPU, or a precision
    the hardware has no native support for (OpenVINO bf16 without AVX512-BF16/AMX)."""
    backend = backend_for(path)
    reason = available_backends()[backend]
    if reason is not None:
        return reason
    if backend == "openvino" and deployment.runtime not in (None, "f32"):

        return precision_unavailable(deployment.runtime, device)
    return None


def candidates(
    artifacts: dict[str, Path], device: str
) -> tuple[dict[str, tuple[Path, str | None]], dict[str, str]]:
    """(runnable: name -> (path, runtime precision), skipped: name -> reason) for the given artifacts."""
    runnable, skipped = {}, {}
    for deployment in DEPLOYMENTS:
        path = artifacts.get(deployment.artifact)
        if path is None:
            continue
        reason = unavailable_reason(deployment, path, device)
        if reason is None:
            runnable[deployment.name] = (path, deployment.runtime)
        else:
            skipped[deployment.name] = reason
    return runnable, skipped


def holds(entry: dict[str, Any], rule, reduced: bool = True) -> list[str]:
    """What breaks the precision rule for one parity entry (empty: it holds).

    The bulk of the paired boxes must agree (median IoU), nearly all of them closely (5th percentile), and
    nearly all scores (95th percentile of the deviation); mAP50 may not drop beyond the rule where the
    paired bootstrap interval says the drop is systematic; detections present in one runtime only may not
    exceed the rule's rate beyond a binomial test (a collapse of class logits shows there first). A
    reduced precision (not fp32) must also have been compared on enough detections: with an untrained
    model nothing scores above parity_conf, and "no box moved" would otherwise pick int8 unverified.
    """

    if "error" in entry:
        return [f"cannot run: {entry['error']}"]
    problems = []
    compared = int(entry.get("compared", 0))
    if reduced and compared < MIN_PARITY_DETECTIONS:
        problems.append(
            f"only {compared} detections compared (< {MIN_PARITY_DETECTIONS}): parity not verified"
        )
    if significant_drop(entry, float(rule.map50_drop)):
        problems.append(
            f"mAP50 drop {-entry['mAP_50_delta']:.4f} > {rule.map50_drop} (interval of the delta "
            f"[{entry['mAP_50_delta_low']:+.4f}, {entry['mAP_50_delta_high']:+.4f}] below 0)"
        )
    if float(entry["median_iou"]) < float(rule.box_iou_median):
        problems.append(f"median box IoU {entry['median_iou']:.4f} < {rule.box_iou_median}")
    if float(entry["p5_iou"]) < float(rule.box_iou_p5):
        problems.append(f"5th percentile box IoU {entry['p5_iou']:.4f} < {rule.box_iou_p5}")
    if float(entry["p95_score_dev"]) > float(rule.score_dev_p95):
        problems.append(
            f"95th percentile score deviation {entry['p95_score_dev']:.4f} > {rule.score_dev_p95}"
        )
    unmatched = int(entry.get("unmatched", 0))
    if too_many_unmatched(unmatched, compared, float(rule.unmatched_frac), float(rule.confidence)):
        problems.append(f"{unmatched} of {compared} detections in one runtime only (> {rule.unmatched_frac})")
    if "mean_mask_iou" in entry and float(entry["mean_mask_iou"]) < float(rule.mask_iou):  # segment models
        problems.append(f"mean mask IoU {entry['mean_mask_iou']:.4f} < {rule.mask_iou}")
    return problems


def choose(parity: dict[str, Any], skipped: dict[str, str], pin: str, rule) -> dict[str, Any]:
    """The deployment to use: {name, artifact, precision, family, reason, latency_ms, ratio_to_fp32}.

    auto: the fastest deployment whose parity holds the rule; pinned: the fastest of that family that runs
    here (a warning in the reason when it breaks the rule); a pin nothing here can run falls back to auto.
    """
    measured = {n: e for n, e in parity.items() if n in BY_NAME and isinstance(e, dict)}
    latency = {n: float(e["latency_ms_median"]) for n, e in measured.items() if "error" not in e}
    verdicts = {n: holds(e, rule, BY_NAME[n].family != "fp32") for n, e in measured.items()}
    fastest = sorted(latency, key=latency.get)
    notes = [f"skipped {n}: {r}" for n, r in skipped.items()]
    notes += [f"{n} fails: {'; '.join(v)}" for n, v in verdicts.items() if v]
    chosen, why = None, ""
    if pin != "auto":
        pinned = [n for n in fastest if BY_NAME[n].family == pin]
        if pinned:
            chosen, why = pinned[0], f"pinned by export.precision={pin}"
            if verdicts[chosen]:
                why += f" (parity does NOT hold: {'; '.join(verdicts[chosen])})"
        else:
            why = f"export.precision={pin} cannot run here, chosen automatically instead: "
    if chosen is None:
        good = [n for n in fastest if not verdicts[n]]
        fp32 = [n for n in fastest if BY_NAME[n].family == "fp32"]
        if good:
            chosen = good[0]
            masks = any("mean_mask_iou" in e for e in measured.values())
            mask_rule = f", mean mask IoU >= {rule.mask_iou}" if masks else ""
            why += (
                f"fastest that holds parity (box IoU median >= {rule.box_iou_median} and p5 >= "
                f"{rule.box_iou_p5}, score deviation p95 <= {rule.score_dev_p95}, no significant mAP50 "
                f"drop > {rule.map50_drop}, unmatched <= {rule.unmatched_frac}{mask_rule})"
            )
        elif fp32:
            chosen = fp32[0]
            why += "nothing held parity: the fastest fp32 deployment"
        else:
            return {"name": None, "reason": "nothing measured: " + "; ".join(notes)}
    base = latency.get(BASELINE)
    ratio = latency[chosen] / base if base else None
    if ratio is not None:
        why += f"; {latency[chosen]:.2f} ms = {ratio:.2f}x {BASELINE}'s {base:.2f} ms"
    deployment = BY_NAME[chosen]
    return {
        "name": chosen,
        "artifact": deployment.artifact,
        "precision": deployment.runtime,
        "family": deployment.family,
        "latency_ms": latency[chosen],
        "ratio_to_fp32": ratio,
        "reason": "; ".join([why, *notes]),
    }
