"""Query selection and denoising set-up shared by the two-stage DETR decoders (D-FINE, RT-DETRv2).

The encoder maps are projected and flattened into one memory (B, sum(h*w), C). Every memory position has
an anchor box (its cell centre, size 0.05 * 2^level); `enc_output` (linear + LayerNorm) and
`enc_score_head` score every position, the top Q become the queries: content = their memory, reference
box = anchor + `enc_bbox_head` delta. In training, contrastive denoising queries (src/models/denoising.py)
can be prepended. A decoder subclasses `QuerySelection` and defines `input_proj`, `enc_output`,
`enc_score_head`, `enc_bbox_head` and, with denoising, `denoising_class_embed`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.models.denoising import get_contrastive_denoising_training_group


def generate_anchors(
    spatial_shapes: list[list[int]], eps: float = 1e-2, grid_size: float = 0.05, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor per memory position: cell centre, size grid_size * 2^level, in logit space.

    Returns anchors (1, sum(h*w), 4) float32 with +inf where the anchor is not well inside the image, and
    valid_mask (1, sum(h*w), 1) bool. Always float32: trained weights saw float32 anchors.
    """
    anchors = []
    for level, (h, w) in enumerate(spatial_shapes):
        grid_y, grid_x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        centres = torch.stack([grid_x, grid_y], dim=-1).unsqueeze(0).to(torch.float32) + 0.5
        centres = centres / torch.tensor([w, h], dtype=torch.float32)  # (1, h, w, 2)
        sizes = torch.ones_like(centres) * grid_size * (2.0**level)
        anchors.append(torch.cat([centres, sizes], dim=-1).reshape(-1, h * w, 4))
    anchors = torch.cat(anchors, dim=1).to(device)
    valid_mask = ((anchors > eps) * (anchors < 1 - eps)).all(-1, keepdim=True)
    anchors = torch.log(anchors / (1 - anchors))
    return torch.where(valid_mask, anchors, torch.inf), valid_mask


def decoder_size_kwargs(
    size, num_classes: int, num_queries: int, num_denoising: int, img_size: tuple[int, int] | None
) -> dict:
    """The decoder arguments a size-table entry fixes (D-FINE's ModelSize and RT-DETRv2's RTDETRSize share
    these fields), plus the run's class, query and denoising counts and its eval input size (h, w)."""
    return dict(
        num_classes=num_classes,
        hidden_dim=size.decoder_hidden_dim,
        num_queries=num_queries,
        feat_channels=list(size.decoder_feat_channels),
        feat_strides=list(size.feat_strides),
        num_levels=size.num_levels,
        num_points=list(size.num_points),
        nhead=size.nhead,
        num_layers=size.num_layers,
        dim_feedforward=size.decoder_ffn_dim,
        activation=size.activation,
        mlp_act=size.mlp_act,
        num_denoising=num_denoising,
        eval_spatial_size=img_size,
        eval_idx=size.eval_idx,
    )


class QuerySelection(nn.Module):
    def __init__(
        self,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        feat_channels: list[int],
        feat_strides: list[int],
        num_levels: int,
        eval_spatial_size: tuple[int, int] | None,
        eps: float = 1e-2,
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        num_dn_negatives: int = 0,
        dn_negative_iou_thresh: float = 0.3,
    ):
        super().__init__()
        if len(feat_channels) > num_levels or len(feat_strides) != len(feat_channels):
            raise ValueError("need len(feat_strides) == len(feat_channels) <= num_levels")
        self.feat_strides = list(feat_strides)
        for _ in range(num_levels - len(self.feat_strides)):  # extra levels: stride-2 convs on the last map
            self.feat_strides.append(self.feat_strides[-1] * 2)
        self.hidden_dim = hidden_dim
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.eps = eps
        self.eval_spatial_size = tuple(eval_spatial_size) if eval_spatial_size else None
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        # Background negatives in the denoising branch (0 = official): denoising.set_denoising_negatives
        self.num_dn_negatives = num_dn_negatives
        self.dn_negative_iou_thresh = dn_negative_iou_thresh
        if self.eval_spatial_size:
            anchors, valid_mask = generate_anchors(self._spatial_shapes_for(self.eval_spatial_size), eps)
            self.register_buffer("anchors", anchors)
            self.register_buffer("valid_mask", valid_mask)

    def _spatial_shapes_for(self, size: tuple[int, int]) -> list[list[int]]:
        height, width = size
        return [[int(height / stride), int(width / stride)] for stride in self.feat_strides]

    def _flatten_memory(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[list[int]]]:
        """Project and flatten the maps: memory (B, sum(h*w), C) and [[h, w], ...] per level."""
        maps = [project(feat) for project, feat in zip(self.input_proj, feats)]
        for level in range(len(maps), self.num_levels):
            maps.append(self.input_proj[level](feats[-1] if level == len(feats) else maps[-1]))
        spatial_shapes = [list(m.shape[2:]) for m in maps]
        memory = torch.cat([m.flatten(2).permute(0, 2, 1) for m in maps], dim=1)
        return memory, spatial_shapes

    def _anchors(self, spatial_shapes: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = getattr(self, "anchors", None)
        if (
            not self.training
            and cached is not None
            and cached.shape[1] == sum(h * w for h, w in spatial_shapes)
        ):
            return cached, self.valid_mask
        return generate_anchors(spatial_shapes, self.eps, device=device)

    def _select_queries(self, memory: torch.Tensor, spatial_shapes: list[list[int]]):
        """Top-Q memory positions by best class score.

        Returns content (B, Q, C) detached, reference logits (B, Q, 4) detached, and for the encoder loss
        (training only) the selected boxes (B, Q, 4) and logits (B, Q, num_classes).
        """
        if memory.shape[1] < self.num_queries:
            raise ValueError(
                f"Input too small: {memory.shape[1]} feature positions for {self.num_queries} queries; "
                "use a larger image size or fewer queries (model.num_queries)"
            )
        anchors, valid_mask = self._anchors(spatial_shapes, memory.device)
        memory = valid_mask.to(memory.dtype) * memory  # invalid positions keep only the biases
        output_memory = self.enc_output(memory)  # (B, L, C)
        logits = self.enc_score_head(output_memory)  # (B, L, num_classes)
        top_index = torch.topk(logits.max(-1).values, self.num_queries, dim=-1).indices  # (B, Q)

        def gather(x: torch.Tensor) -> torch.Tensor:
            x = x.expand(memory.shape[0], -1, -1)
            return x.gather(dim=1, index=top_index.unsqueeze(-1).repeat(1, 1, x.shape[-1]))

        top_memory = gather(output_memory)
        ref_logits = self.enc_bbox_head(top_memory) + gather(anchors)
        enc_boxes = F.sigmoid(ref_logits) if self.training else None
        enc_logits = gather(logits) if self.training else None
        return top_memory.detach(), ref_logits.detach(), enc_boxes, enc_logits

    def _denoising_queries(self, targets: list[dict] | None):
        """Training with num_denoising > 0: (content (B, D, C), box logits (B, D, 4), attention mask,
        dn_meta) of the D denoising queries (src/models/denoising.py); otherwise (or for a batch without
        boxes and negatives) four Nones."""
        if not (self.training and self.num_denoising > 0):
            return None, None, None, None
        if targets is None:
            raise ValueError("Training with denoising needs targets: call model(images, targets)")
        queries, ref_logits, attn_mask, dn_meta = get_contrastive_denoising_training_group(
            targets,
            self.num_classes,
            self.num_queries,
            self.denoising_class_embed,
            num_denoising=self.num_denoising,
            label_noise_ratio=self.label_noise_ratio,
            box_noise_scale=self.box_noise_scale,
            num_negatives=self.num_dn_negatives,
            negative_iou_thresh=self.dn_negative_iou_thresh,
        )
        if ref_logits is None:  # no box in the whole batch: nothing to denoise
            return None, None, None, None
        return queries, ref_logits, attn_mask, dn_meta
