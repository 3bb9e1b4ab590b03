"""The parity procedure's inputs and checks, shared by the families' parity tests.

tests/fixtures/parity/ (and its README) hold what the official code produced: the input batch, the
targets, per model the calibrated BatchNorm statistics, the expected outputs and loss terms.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.detinit import deterministic_state_dict

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
ORIG_SIZES_WH = torch.tensor([[640, 480], [1280, 720]])
# The official postprocessors ran with the COCO configs' remap_mscoco_category: labels 0..79 -> COCO ids.
COCO_IDS = np.array(
    [
        *range(1, 12),
        *range(13, 26),
        27,
        28,
        *range(31, 45),
        *range(46, 66),
        67,
        70,
        *range(72, 83),
        *range(84, 91),
    ]
)
# Tolerances (absolute, on sigmoid probabilities and normalised boxes). Our models reproduce the official
# code run on this machine bit for bit (max diff 0.0). The D-FINE fixtures were produced on another
# machine, and the official code itself, run here, is off from its own fixtures by up to ~1e-5 on
# probabilities and ~1e-6 on boxes: float32 platform noise, since anchors (float32 `log`) and position
# embeddings (float32 sin/cos) are float32 even in a float64 model, and moving a few anchor logits by one
# float32 ulp shifts the outputs by exactly this much. So: a loose bound on the worst entry and a tight
# one on the median entry; a real implementation difference (another op, activation, query order) moves
# outputs by 1e-3 or more.
PROB_TOL, PROB_MEDIAN_TOL = 5e-5, 1e-6
BOX_TOL, BOX_MEDIAN_TOL = 5e-6, 1e-7
LOSS_RTOL = 1e-6


def parity_input() -> torch.Tensor:
    """(2, 3, 640, 640) float64 in [0, 1]."""
    return torch.from_numpy(np.load(FIXTURES / "input_uint8.npy").astype(np.float64) / 255.0)


def parity_targets() -> list[dict[str, torch.Tensor]]:
    raw = json.loads((FIXTURES / "targets.json").read_text())
    return [
        {
            "labels": torch.tensor(t["labels"], dtype=torch.int64),
            "boxes": torch.tensor(t["boxes_cxcywh"], dtype=torch.float64),
        }
        for t in raw
    ]


def prepare_parity_model(model: nn.Module, bn_stats: Path) -> nn.Module:
    """Deterministic weights (anchors / valid_mask keep the model's own), float64, calibrated BN stats."""
    state = model.state_dict()
    skip = {k for k in state if k.endswith("anchors") or k.endswith("valid_mask")}
    model.load_state_dict(deterministic_state_dict(state, skip))
    model.double()
    stats = np.load(bn_stats)
    model.load_state_dict({**model.state_dict(), **{k: torch.from_numpy(stats[k]) for k in stats.files}})
    return model


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def assert_close(name: str, ours: np.ndarray, expected: np.ndarray, tol: float, median_tol: float) -> None:
    assert ours.shape == expected.shape, f"{name}: shape {ours.shape} != {expected.shape}"
    diff = np.abs(ours - expected)
    assert diff.max() <= tol, f"{name}: max abs diff {diff.max():.3e} > {tol:.0e}"
    assert np.median(diff) <= median_tol, f"{name}: median abs diff {np.median(diff):.3e} > {median_tol:.0e}"


def assert_outputs_match(ours: dict[str, np.ndarray], expected, modes=("eval", "train")) -> None:
    """Probabilities and boxes of each mode's forward within the parity tolerances."""
    for mode in modes:
        assert_close(
            f"{mode} probs",
            sigmoid(ours[f"{mode}_pred_logits"]),
            sigmoid(expected[f"{mode}_pred_logits"]),
            PROB_TOL,
            PROB_MEDIAN_TOL,
        )
        assert_close(
            f"{mode} boxes",
            ours[f"{mode}_pred_boxes"],
            expected[f"{mode}_pred_boxes"],
            BOX_TOL,
            BOX_MEDIAN_TOL,
        )


def assert_postprocessing_matches(postprocessor: nn.Module, expected, ours_post_scores: np.ndarray) -> None:
    """Our postprocessor on the official raw outputs gives the official detections exactly, and on our raw
    outputs the same ranked scores (labels of near-tied scores may swap places)."""
    official_raw = {k: torch.from_numpy(expected[f"eval_{k}"]) for k in ("pred_logits", "pred_boxes")}
    post = postprocessor(official_raw, ORIG_SIZES_WH)
    labels = torch.stack([p["labels"] for p in post]).numpy()
    np.testing.assert_array_equal(COCO_IDS[labels], expected["post_labels"])
    for key, expected_key in (("boxes", "post_boxes_xyxy"), ("scores", "post_scores")):
        ours = torch.stack([p[key] for p in post]).numpy()
        np.testing.assert_allclose(ours, expected[expected_key], rtol=1e-12, atol=1e-12)
    assert_close("post scores", ours_post_scores, expected["post_scores"], PROB_TOL, PROB_MEDIAN_TOL)


def assert_losses_match(ours: dict[str, float], expected: dict[str, float]) -> None:
    """Every official loss term, no more and no fewer, each within LOSS_RTOL."""
    assert sorted(ours) == sorted(expected), f"terms differ: {sorted(set(ours) ^ set(expected))}"
    wrong = {
        k: (ours[k], v) for k, v in expected.items() if abs(ours[k] - v) > LOSS_RTOL * max(abs(v), 1e-12)
    }
    assert not wrong, f"loss terms off: {wrong}"


def assert_matches_manifest(
    state: dict[str, torch.Tensor], expected: dict[str, list[int]], label: str
) -> None:
    """Our state dict has exactly the official names (expected: name -> shape, from a fixture manifest)
    with the same shapes."""
    ours = {key: list(value.shape) for key, value in state.items()}
    missing, extra = set(expected) - set(ours), set(ours) - set(expected)
    assert not missing and not extra, f"{label}: missing {sorted(missing)[:5]} extra {sorted(extra)[:5]}"
    wrong = {k: (ours[k], v) for k, v in expected.items() if ours[k] != v}
    assert not wrong, f"{label}: shape mismatches {list(wrong.items())[:5]}"
