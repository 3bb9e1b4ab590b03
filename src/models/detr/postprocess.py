"""Raw DETR outputs -> per-image detections (labels, xyxy pixel boxes, scores), the shared contract.

DETR's own rule: softmax over the classes and "no object", drop the "no object" column, and each query
keeps its best class. Detections are sorted by score (the shared postprocessor's order); K is the number
of queries unless num_top_queries is smaller. Only torch ops, so the module traces into an exported graph.
"""

from __future__ import annotations

import torch
from torch import nn

from src.common.boxes import cxcywh_to_xyxy


class DetrPostProcessor(nn.Module):
    def __init__(self, num_classes: int, num_top_queries: int | None = None):
        super().__init__()
        self.num_classes = int(num_classes)
        self.num_top_queries = None if num_top_queries is None else int(num_top_queries)
        self.deploy_mode = False

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_top_queries={self.num_top_queries}"

    def deploy(self, max_detections: int | None = None) -> DetrPostProcessor:
        """Return (labels, boxes, scores) tensors, each (B, K[, 4]), instead of a list of dicts (export).
        max_detections: a smaller K than num_top_queries (an export's choice)."""
        self.eval()
        self.deploy_mode = True
        if max_detections is not None:
            top = self.num_top_queries
            self.num_top_queries = int(max_detections) if top is None else min(top, int(max_detections))
        return self

    def forward(self, outputs: dict[str, torch.Tensor], orig_sizes_wh: torch.Tensor):
        """outputs: {"pred_logits" (B, Q, classes + 1), "pred_boxes" (B, Q, 4) normalised cxcywh};
        orig_sizes_wh (B, 2): (width, height) of each original image in pixels.

        Returns per image {"labels" int64 (K,), "boxes" xyxy pixels (K, 4), "scores" (K,)}, sorted by score.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # (B, Q) each
        boxes = cxcywh_to_xyxy(boxes) * orig_sizes_wh.to(boxes.dtype).repeat(1, 2).unsqueeze(1)  # (B, Q, 4)
        top_k = (
            scores.shape[1] if self.num_top_queries is None else min(self.num_top_queries, scores.shape[1])
        )
        scores, query = torch.topk(scores, top_k, dim=-1)  # (B, K)
        labels = labels.gather(1, query)
        boxes = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
        if self.deploy_mode:
            return labels, boxes, scores
        return [{"labels": lab, "boxes": box, "scores": sco} for lab, box, sco in zip(labels, boxes, scores)]
