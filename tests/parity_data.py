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
# Absolute tolerances on sigmoid probabilities and normalised boxes: a loose bound on the worst entry
# (float32 anchors and position embeddings make a float64 model platform-dependent at ~1e-5), a tight
# one on the median; a real implementation difference moves outputs by 1e-3 or more.
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


def assert_losses_match(ours: dict[str, float], expected: dict[str, float]) -> None:
    """Every official loss term, no more and no fewer, each within LOSS_RTOL."""
    assert sorted(ours) == sorted(expected), f"terms differ: {sorted(set(ours) ^ set(expected))}"
    wrong = {
        k: (ours[k], v) for k, v in expected.items() if abs(ours[k] - v) > LOSS_RTOL * max(abs(v), 1e-12)
    }
    assert not wrong, f"loss terms off: {wrong}"
