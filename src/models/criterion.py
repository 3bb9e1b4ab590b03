"""D-FINE training loss: the official criterion's terms, weights and matching rules, in our own code.

Terms per decoder output ("head"), weighted by `weight_dict` and named like the official criterion:
  loss_vfl  varifocal classification loss (or loss_mal, DEIM's matchability-aware loss)
  loss_bbox L1 between matched boxes;  loss_giou  1 - GIoU between matched boxes
  loss_fgl  fine-grained localisation: the predicted edge distributions against the ground truth's
            position between the two nearest bins of the FDR weighting function
  loss_ddf  decoupled distillation focal: every layer's distributions against the last layer's (GO-LSD)
Suffixes: none = last decoder layer, _aux_i = earlier layers, _pre = the first layer's plain box head,
_enc_i = encoder proposals, _dn_i / _dn_pre = denoising queries.

False-positive control (both off by default, which is the official loss):
  bg_loss_weight  multiplies the classification loss of every background query (matched to no object) in
                  every head, so a user can push unmatched queries' scores down harder
  loss_vfl_neg_dn_i / loss_vfl_neg_dn_pre (loss_mal_neg_...): classification loss of the denoising branch's
                  background negatives (denoising.py), all of them targets "no object", normalised like
                  the other denoising terms and weighted like loss_vfl; they get no box or distribution term

Segmentation models (outputs with "pred_masks"): loss_mask_bce and loss_mask_dice on sampled points of
the last layer's matched queries (src/models/mask_loss.py), weighted by train.mask_loss. With
train.mask_loss.matcher_cost > 0 the last layer's matching also weighs mask BCE + dice (matcher.py); the
matcher reads "pred_masks" from the outputs and "masks" / "has_mask" from the targets it is given.

Matching: classification terms use each head's own Hungarian matching; box and distribution terms use
the GO-LSD "union set" (each query's most frequent target across all heads' matchings), normalised by
its size; with use_union_set=False (RT-DETRv2, DEIM-RT-DETRv2) every term uses its head's own matching,
normalised by the number of ground-truth boxes. Denoising queries are matched by construction (query k
of a group <-> its ground truth).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from src.common.boxes import paired_box_iou, paired_generalized_box_iou
from src.models.dfine.fdr import bbox2distance
from src.models.mask_loss import MaskLossSettings, mask_losses
from src.models.matcher import HungarianMatcher, MatchIndices, corners
from src.models.outputs import DetectorOutputs

# The official D-FINE COCO recipe (configs/dfine/include/dfine_hgnetv2.yml); DEIM swaps vfl for mal.
DEFAULT_LOSS_WEIGHTS = {"vfl": 1.0, "mal": 1.0, "bbox": 5.0, "giou": 2.0, "fgl": 0.15, "ddf": 1.5}
DEFAULT_MATCHER_COSTS = {"class": 2.0, "bbox": 5.0, "giou": 2.0}
CLS_LOSS_GAMMA = {"vfl": 2.0, "mal": 1.5}
VFL_ALPHA = 0.75
DDF_TEMPERATURE = 5.0
# The official DDF balances matched/unmatched terms as if every GPU held 8 images.
DDF_REFERENCE_BATCH = 8


def _batch_query_index(match: MatchIndices) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (query idx, target idx) pairs -> (image idx, query idx) to index (B, Q, ...) tensors."""
    image = torch.cat([torch.full_like(queries, i) for i, (queries, _) in enumerate(match)])
    query = torch.cat([queries for queries, _ in match])
    return image, query


def _matched(targets: list[dict[str, torch.Tensor]], match: MatchIndices, key: str) -> torch.Tensor:
    return torch.cat([t[key][j] for t, (_, j) in zip(targets, match)], dim=0)


def _matched_iou(boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """IoU of each predicted box with its own target: (N, 4) x (N, 4) cxcywh -> (N,)."""
    return paired_box_iou(corners(boxes), corners(target_boxes))[0]


def union_of_matches(matches: list[MatchIndices]) -> MatchIndices:
    """GO-LSD union set: per image, every query matched by any head, paired with the target it was
    matched to most often. Ties go the way torch's default (unstable) descending sort of the counts
    orders the lexicographically sorted pairs, exactly as in the official criterion; a stable sort would
    pick differently and break loss parity."""
    result = []
    for per_head in zip(*matches):
        pairs = torch.stack([torch.cat([q for q, _ in per_head]), torch.cat([t for _, t in per_head])], 1)
        unique, counts = torch.unique(pairs, return_counts=True, dim=0)
        ranked = unique[torch.argsort(counts, descending=True)].tolist()
        best_target: dict[int, int] = {}
        for query, target in ranked:
            best_target.setdefault(query, target)
        device = pairs.device
        result.append(
            (
                torch.tensor(list(best_target.keys()), dtype=torch.int64, device=device),
                torch.tensor(list(best_target.values()), dtype=torch.int64, device=device),
            )
        )
    return result


def denoising_match(dn_meta: dict, targets: list[dict[str, torch.Tensor]]) -> MatchIndices:
    """Denoising query k of every group reconstructs ground truth k: (positive query idx, gt idx) per image."""
    if not dn_meta["dn_num_group"]:
        return [(torch.zeros(0, dtype=torch.int64, device=t["labels"].device),) * 2 for t in targets]
    match = []
    for positive, target in zip(dn_meta["dn_positive_idx"], targets):
        gt = torch.arange(len(target["labels"]), dtype=torch.int64, device=target["labels"].device)
        match.append((positive.to(gt.device), gt.tile(dn_meta["dn_num_group"])))
    return match


class DFineCriterion(nn.Module):
    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        cls_loss: str = "vfl",
        alpha: float = VFL_ALPHA,
        gamma: float | None = None,
        reg_max: int = 32,
        ddf_temperature: float = DDF_TEMPERATURE,
        bg_loss_weight: float = 1.0,
        mask_loss: MaskLossSettings | None = None,
        use_union_set: bool = True,
    ):
        super().__init__()
        self.mask_loss = mask_loss  # None: a detection criterion
        self.use_union_set = use_union_set  # False: box terms on each head's own matching (RT-DETRv2)
        if cls_loss not in CLS_LOSS_GAMMA:
            raise ValueError(f"cls_loss must be one of {sorted(CLS_LOSS_GAMMA)}, got {cls_loss!r}")
        if not bg_loss_weight >= 0:
            raise ValueError(f"bg_loss_weight must be >= 0, got {bg_loss_weight}")
        self.bg_loss_weight = float(bg_loss_weight)
        self.num_classes, self.matcher, self.cls_loss = num_classes, matcher, cls_loss
        self.weight_dict = dict(weight_dict)  # keyed "loss_vfl", "loss_bbox", ...
        self.alpha = alpha
        self.gamma = CLS_LOSS_GAMMA[cls_loss] if gamma is None else gamma
        self.reg_max, self.ddf_temperature = reg_max, ddf_temperature

    def forward(
        self, outputs: DetectorOutputs, targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """outputs: the model's training outputs (src/models/outputs.py); targets: per image "labels" (n,) int64 and
        "boxes" (n, 4) normalised cxcywh; for masks also "masks" (n, H, W) at the input size and optionally
        "has_mask" (n,) bool (src/models/mask_loss.py). Returns weighted loss terms; their sum is the training loss."""
        self._check_labels(outputs, targets)
        batch, num_queries = outputs["pred_logits"].shape[:2]
        layers = list(outputs.get("aux_outputs", []))
        if "pre_outputs" in outputs:
            layers.append(outputs["pre_outputs"])
        encoder = list(outputs.get("enc_aux_outputs", []))

        match = self.matcher(outputs, targets)
        layer_matches = [self.matcher(out, targets) for out in layers]
        encoder_matches = [self.matcher(out, targets) for out in encoder]
        union = self.use_union_set and layers
        go_match = union_of_matches([match, *layer_matches, *encoder_matches]) if union else match
        num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
        num_go = max(sum(len(q) for q, _ in go_match), 1)

        fdr = {"up": outputs.get("up"), "reg_scale": outputs.get("reg_scale")}
        # Official DDF weighting: sqrt of the matched / unmatched (query, edge) counts of the union set.
        num_matched_edges = 4 * sum(len(q) for q, _ in go_match)
        scale = DDF_REFERENCE_BATCH / batch
        ddf_balance = (
            math.sqrt(num_matched_edges * scale),
            math.sqrt((4 * batch * num_queries - num_matched_edges) * scale),
        )
        state = {"fdr": fdr, "ddf_balance": ddf_balance, "fgl_targets": None}

        def box_match(own: MatchIndices) -> tuple[MatchIndices, int]:
            """The matching (and its normaliser) of a head's box and distribution terms."""
            return (go_match, num_go) if self.use_union_set else (own, num_boxes)

        losses = self._head(outputs, targets, match, num_boxes, *box_match(match), state, "")
        for i, out in enumerate(outputs.get("aux_outputs", [])):
            losses |= self._head(
                out, targets, layer_matches[i], num_boxes, *box_match(layer_matches[i]), state, f"_aux_{i}"
            )
        if "pre_outputs" in outputs:
            pre = outputs["pre_outputs"]
            pre_match = layer_matches[-1]
            losses |= self._head(pre, targets, pre_match, num_boxes, *box_match(pre_match), state, "_pre")
        enc_targets = self._encoder_targets(outputs, targets)
        for i, out in enumerate(encoder):
            losses |= self._head(
                out,
                enc_targets,
                encoder_matches[i],
                num_boxes,
                *box_match(encoder_matches[i]),
                state,
                f"_enc_{i}",
            )
        losses |= self._denoising_losses(outputs, targets, num_boxes, state)
        if "pred_masks" in outputs:
            if self.mask_loss is None:
                raise ValueError(
                    "a segmentation model's outputs need a criterion built with mask_loss settings"
                )
            losses |= mask_losses(outputs["pred_masks"], targets, match, self.mask_loss)
        # As the official criterion: a NaN term (e.g. degenerate boxes) must not poison a whole run.
        return {k: torch.nan_to_num(v, nan=0.0) for k, v in losses.items()}

    def _denoising_losses(self, outputs, targets, num_boxes, state) -> dict[str, torch.Tensor]:
        dn_meta = outputs.get("dn_meta")
        if "dn_outputs" not in outputs or dn_meta is None:
            return {}
        # A batch without boxes has no denoising groups; the (empty) denoising outputs then give zero terms.
        match = denoising_match(dn_meta, targets)
        num_dn = max(num_boxes * dn_meta["dn_num_group"], 1)
        # Own fgl-target cache; the DDF balance stays the one of the matching queries (official behaviour).
        dn_state = {**state, "fgl_targets": None}
        losses = {}
        for i, out in enumerate(outputs["dn_outputs"]):
            losses |= self._head(out, targets, match, num_dn, match, num_dn, dn_state, f"_dn_{i}")
        if "dn_pre_outputs" in outputs:
            pre = outputs["dn_pre_outputs"]
            losses |= self._head(pre, targets, match, num_dn, match, num_dn, dn_state, "_dn_pre")
        return losses | self._negative_losses(outputs, targets, num_dn)

    def _negative_losses(self, outputs, targets, num_dn) -> dict[str, torch.Tensor]:
        """Classification only, every negative a background query (nothing matched); slots for which no
        box clear of the ground truth was found are left out."""
        heads = list(outputs.get("dn_negative_outputs", []))
        if not heads:
            return {}
        suffixes = [f"_dn_{i}" for i in range(len(heads))]
        if "dn_negative_pre_outputs" in outputs:
            heads.append(outputs["dn_negative_pre_outputs"])
            suffixes.append("_dn_pre")
        valid = outputs["dn_meta"].get("dn_negative_valid")
        no_match = denoising_match({"dn_num_group": 0}, targets)
        name = f"loss_{self.cls_loss}"
        return {
            f"{name}_neg{suffix}": self._classification_loss(out, targets, no_match, num_dn, valid)
            * self.weight_dict[name]
            for out, suffix in zip(heads, suffixes)
        }

    def _encoder_targets(self, outputs, targets):
        """Class-agnostic query selection trains the encoder head with one class: every label becomes 0."""
        if outputs.get("enc_meta", {}).get("class_agnostic", False):
            return [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
        return targets

    def _check_labels(self, outputs, targets) -> None:
        num_classes = outputs["pred_logits"].shape[-1]
        for i, target in enumerate(targets):
            labels = target["labels"]
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                raise ValueError(
                    f"target {i}: labels must lie in [0, {num_classes}) for a {num_classes}-class model, "
                    f"got {labels.tolist()}"
                )

    def _head(
        self, out, targets, cls_match, num_cls, box_match, num_box, state, suffix
    ) -> dict[str, torch.Tensor]:
        """Weighted loss terms of one decoder output: classification on its own matching, boxes and
        distributions on the union set."""
        terms = {f"loss_{self.cls_loss}": self._classification_loss(out, targets, cls_match, num_cls)}
        terms |= self._box_losses(out, targets, box_match, num_box)
        if "pred_corners" in out:
            terms |= self._distribution_losses(out, targets, box_match, num_box, state)
        return {k + suffix: v * self.weight_dict[k] for k, v in terms.items() if k in self.weight_dict}

    def _classification_loss(self, out, targets, match, num_boxes, query_mask=None) -> torch.Tensor:
        """VFL / MAL: BCE against an IoU-valued target on matched (query, class) cells, 0 elsewhere.
        Background queries' terms are scaled by bg_loss_weight; query_mask (B, Q) bool drops queries."""
        logits = out["pred_logits"]  # (B, Q, C)
        num_queries, num_classes = logits.shape[1:]
        if num_queries == 0:  # empty denoising part: the mean over queries below would be 0/0
            return logits.sum() * 0
        idx = _batch_query_index(match)
        ious = _matched_iou(out["pred_boxes"][idx], _matched(targets, match, "boxes")).detach()
        classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64, device=logits.device)
        classes[idx] = _matched(targets, match, "labels").to(logits.device)
        one_hot = F.one_hot(classes, num_classes=num_classes + 1)[..., :-1]  # (B, Q, C); class C = background
        score = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        score[idx] = ious.to(score.dtype)
        target = score.unsqueeze(-1) * one_hot  # (B, Q, C)
        prob = logits.sigmoid().detach()
        if self.cls_loss == "vfl":
            weight = self.alpha * prob.pow(self.gamma) * (1 - one_hot) + target
        else:  # mal: the positive target is IoU^gamma and positives keep weight 1
            target = target.pow(self.gamma)
            weight = prob.pow(self.gamma) * (1 - one_hot) + one_hot
        if self.bg_loss_weight != 1.0:  # skipped at 1.0: the official loss, bit for bit
            is_background = (classes == num_classes).unsqueeze(-1)  # (B, Q, 1)
            weight = torch.where(is_background, weight * self.bg_loss_weight, weight)
        if query_mask is not None:
            weight = weight * query_mask.unsqueeze(-1).to(weight.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
        return loss.mean(1).sum() * num_queries / num_boxes

    def _box_losses(self, out, targets, match, num_boxes) -> dict[str, torch.Tensor]:
        idx = _batch_query_index(match)
        boxes = out["pred_boxes"][idx]  # (N, 4)
        target_boxes = _matched(targets, match, "boxes").to(boxes.dtype)
        giou = paired_generalized_box_iou(corners(boxes), corners(target_boxes))  # (N,)
        return {
            "loss_bbox": F.l1_loss(boxes, target_boxes, reduction="none").sum() / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes,
        }

    def _distribution_losses(self, out, targets, match, num_boxes, state) -> dict[str, torch.Tensor]:
        """FGL on the matched queries' edge distributions; DDF (when a teacher is given) on all queries."""
        idx = _batch_query_index(match)
        bins = self.reg_max + 1
        target_boxes = _matched(targets, match, "boxes").to(out["pred_boxes"].dtype)
        if state["fgl_targets"] is None:  # every layer refines the same initial reference boxes
            fdr = state["fdr"]
            state["fgl_targets"] = bbox2distance(
                out["ref_points"][idx].detach(),
                corners(target_boxes),
                self.reg_max,
                fdr["reg_scale"],
                fdr["up"],
            )
        target_bins, weight_right, weight_left = state["fgl_targets"]
        ious = _matched_iou(out["pred_boxes"][idx], target_boxes)  # (N,)
        edge_weight = ious.repeat_interleave(4).detach()  # (4N,), edges in (left, top, right, bottom) order
        pred_corners = out["pred_corners"][idx].reshape(-1, bins)  # (4N, bins)
        losses = {
            "loss_fgl": _unimodal_distribution_focal_loss(
                pred_corners, target_bins, weight_right, weight_left, edge_weight
            ).sum()
            / num_boxes
        }
        if out.get("teacher_corners") is not None:
            losses["loss_ddf"] = self._distillation_loss(out, idx, ious, state["ddf_balance"])
        return losses

    def _distillation_loss(self, out, idx, ious, balance) -> torch.Tensor:
        """KL from the last layer's (teacher) distributions, weighted by the teacher's confidence
        (matched queries: IoU with their target), matched and unmatched parts averaged separately."""
        bins = self.reg_max + 1
        pred = out["pred_corners"].reshape(-1, bins)  # (B*Q*4, bins)
        teacher = out["teacher_corners"].reshape(-1, bins)
        if torch.equal(pred, teacher):
            return pred.sum() * 0
        confidence = out["teacher_logits"].sigmoid().max(dim=-1)[0]  # (B, Q)
        confidence[idx] = ious.to(confidence.dtype)
        weight = confidence.reshape(-1).repeat_interleave(4).detach()  # (B*Q*4,)
        is_matched = torch.zeros_like(confidence, dtype=torch.bool)
        is_matched[idx] = True
        is_matched = is_matched.reshape(-1).repeat_interleave(4)
        temperature = self.ddf_temperature
        kl = F.kl_div(
            F.log_softmax(pred / temperature, dim=1),
            F.softmax(teacher.detach() / temperature, dim=1),
            reduction="none",
        ).sum(-1)
        loss = weight * temperature**2 * kl
        matched = loss[is_matched].mean() if is_matched.any() else 0
        unmatched = loss[~is_matched].mean() if (~is_matched).any() else 0
        num_pos, num_neg = balance
        return (matched * num_pos + unmatched * num_neg) / (num_pos + num_neg)


def _unimodal_distribution_focal_loss(pred, target_bins, weight_right, weight_left, weight) -> torch.Tensor:
    """Cross-entropy towards the two bins around the target, split by the interpolation weights: (4N,)."""
    left = target_bins.long()
    loss = F.cross_entropy(pred, left, reduction="none") * weight_left.reshape(-1) + F.cross_entropy(
        pred, left + 1, reduction="none"
    ) * weight_right.reshape(-1)
    return loss * weight.to(loss.dtype)


def build_criterion(
    model_name: str,
    num_classes: int,
    cls_loss: str = "vfl",
    loss_weights: dict[str, float] | None = None,
    matcher_costs: dict[str, float] | None = None,
    reg_max: int = 32,
    bg_loss_weight: float = 1.0,
    mask_loss: dict | None = None,
    use_union_set: bool = True,
) -> DFineCriterion:
    """The official D-FINE criterion (cls_loss="vfl") or DEIM's (cls_loss="mal", gamma 1.5).

    model_name: the size ("n", "s", "m", "l", "x"); every official size trains with the same loss
    settings, so it is kept for the record only. loss_weights / matcher_costs override single entries,
    keyed like DEFAULT_LOSS_WEIGHTS ("vfl", "bbox", ...) and DEFAULT_MATCHER_COSTS ("class", "bbox", "giou").
    bg_loss_weight: extra weight on the classification loss of background queries (1.0 = official).
    mask_loss: train.mask_loss (bce, dice, points, oversample_ratio, importance_sample_ratio,
    matcher_cost = the matcher's mask cost weight, 0 = box-only matching) for a segmentation model; None
    for a detector. use_union_set: box terms on the GO-LSD union of all heads' matchings (D-FINE, DEIM)
    or on each head's own (False: RT-DETRv2's criterion).
    """
    weights = {**DEFAULT_LOSS_WEIGHTS, **(loss_weights or {})}
    costs = {**DEFAULT_MATCHER_COSTS, **(matcher_costs or {})}
    mask_settings = None if mask_loss is None else dict(mask_loss)
    # The mask matching weight belongs to the matcher, not to the point-sampled loss settings.
    cost_mask = 0.0 if mask_settings is None else float(mask_settings.pop("matcher_cost"))
    matcher = HungarianMatcher(
        cost_class=costs["class"], cost_bbox=costs["bbox"], cost_giou=costs["giou"], cost_mask=cost_mask
    )
    weight_dict = {f"loss_{k}": v for k, v in weights.items() if k not in CLS_LOSS_GAMMA or k == cls_loss}
    criterion = DFineCriterion(
        num_classes,
        matcher,
        weight_dict,
        cls_loss=cls_loss,
        reg_max=reg_max,
        bg_loss_weight=bg_loss_weight,
        mask_loss=None if mask_settings is None else MaskLossSettings(**mask_settings),
        use_union_set=use_union_set,
    )
    criterion.model_name = model_name
    return criterion
