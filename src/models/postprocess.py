"""Raw D-FINE outputs -> per-image detections (labels, xyxy pixel boxes, scores[, mask logits]).

Scores are per-class sigmoids; the top `num_top_queries` (query, class) pairs of each image are kept, so a
query may appear with several classes. Only torch ops, so the module traces into an exported graph.
"""

from __future__ import annotations

import torch
from torch import nn

from src.common.boxes import cxcywh_to_xyxy
from src.models.mask_head import MASK_EMBEDDING, PIXEL_EMBEDDING, mask_logits


class PostProcessor(nn.Module):
    def __init__(self, num_classes: int, num_top_queries: int = 300):
        super().__init__()
        self.num_classes = int(num_classes)
        self.num_top_queries = int(num_top_queries)
        self.deploy_mode = False

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_top_queries={self.num_top_queries}"

    def deploy(self, max_detections: int | None = None) -> PostProcessor:
        """Return (labels, boxes, scores[, masks]) tensors, each (B, K[, 4 | h, w]), instead of a list of
        dicts (export). max_detections: a smaller K than num_top_queries (an export's choice: a segment
        model then computes mask logits for K queries only)."""
        self.eval()
        self.deploy_mode = True
        if max_detections is not None:
            self.num_top_queries = min(self.num_top_queries, int(max_detections))
        return self

    def forward(self, outputs: dict[str, torch.Tensor], orig_sizes_wh: torch.Tensor):
        """outputs: {"pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4) normalised cxcywh};
        orig_sizes_wh (B, 2): (width, height) of each original image in pixels.

        Returns per image {"labels" int64 (K,), "boxes" float xyxy pixels (K, 4), "scores" (K,)}, sorted by
        score, K = min(num_top_queries, Q * C). A segmentation model's outputs ("pred_masks" (B, Q, h, w),
        or a deployed head's two embeddings) add "masks": the kept queries' low-resolution logits (K, h, w);
        network_input.masks_to_original turns them into masks of the original image.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        boxes = cxcywh_to_xyxy(boxes) * orig_sizes_wh.to(boxes.dtype).repeat(1, 2).unsqueeze(1)  # (B, Q, 4)
        scores = torch.sigmoid(logits).flatten(1)  # (B, Q * C): index = query * C + class
        # Fewer (query, class) pairs than requested: keep them all. Skipped while tracing (export), where
        # the comparison would be frozen into the graph anyway and only raises a TracerWarning.
        top_k = self.num_top_queries if torch.jit.is_tracing() else min(self.num_top_queries, scores.shape[1])
        scores, index = torch.topk(scores, top_k, dim=-1)
        # a - a // b * b instead of %: some TensorRT versions lack integer mod.
        labels = index - index // self.num_classes * self.num_classes
        query = index // self.num_classes
        boxes = boxes.gather(dim=1, index=query.unsqueeze(-1).repeat(1, 1, boxes.shape[-1]))
        results = [labels, boxes, scores]
        if MASK_EMBEDDING in outputs:  # a deployed mask head: logits of the kept queries only
            embedding = outputs[MASK_EMBEDDING]  # (B, Q, D)
            kept = embedding.gather(dim=1, index=query.unsqueeze(-1).expand(-1, -1, embedding.shape[-1]))
            results.append(mask_logits(kept, outputs[PIXEL_EMBEDDING]))  # (B, K, h, w)
        elif "pred_masks" in outputs:
            pred_masks = outputs["pred_masks"]  # (B, Q, h, w)
            index = query[:, :, None, None].expand(-1, -1, *pred_masks.shape[-2:])
            results.append(pred_masks.gather(dim=1, index=index))  # (B, K, h, w)
        if self.deploy_mode:
            return tuple(results)
        keys = ("labels", "boxes", "scores", "masks")
        return [dict(zip(keys, per_image)) for per_image in zip(*results)]


def build_postprocessor(num_classes: int, num_top_queries: int = 300) -> PostProcessor:
    return PostProcessor(num_classes, num_top_queries)
