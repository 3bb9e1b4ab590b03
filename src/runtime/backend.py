"""What every backend runner shares: the errors for a missing backend and for an unreadable file, and the
output tuple."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from src.common.errors import UserError

# labels (B, K) int64, boxes (B, K, 4) float32 xyxy in pixels of the given target sizes, scores (B, K) float32
# [, masks (B, K, h, w) float32 mask logits: segment models only] (src/runtime/meta.py: output_names)
Outputs = tuple[np.ndarray, ...]


class BackendUnavailable(RuntimeError):
    """A backend whose library (or hardware) is missing. Other backends keep working."""

    def __init__(self, backend: str, reason: str):
        super().__init__(f"{backend} backend unavailable: {reason}")
        self.backend = backend
        self.reason = reason


class ArtifactError(UserError, ValueError):
    """A model file that cannot be loaded: cut short, damaged, or not made by this project. The message
    names the file (for an OpenVINO IR, whichever of the .xml / .bin is at fault) and what to do."""

    def __init__(self, path: str | Path, reason: str):
        path = Path(path)
        advice = (
            "use another checkpoint (best.pt / last.pt of a training run)"
            if path.suffix.lower() in (".pt", ".pth")
            else "re-export it (python -m src.dl.export)"
        )
        super().__init__(f"{path}: cannot be loaded ({reason}); {advice}")
        self.path = path
