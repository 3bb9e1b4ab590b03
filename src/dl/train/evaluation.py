"""Evaluation during and after training: predictions on val/test, the negatives folder, which epoch is best,
and the final files (metrics.csv, per_class.csv, thresholds.json, plots/, eval_preds/).

Every rank predicts its shard of a split; rank 0 gathers, scores and judges (the others get None).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import torch
from loguru import logger
from torch import nn
from torch.utils.data import DataLoader

from src.common.errors import ConfigError
from src.common.experiment import Experiment
from src.common.io import atomic_write_csv, atomic_write_json
from src.dl.train.core import TrainState
from src.dl.train.distributed import DistContext, all_gather_objects
from src.dl.train.false_positives import (
    describe,
    evaluate_negatives,
    evenly_spaced,
    fppi_key,
    prefer_lower_fppi,
)
from src.dl.train.samplers import ShardSampler
from src.dl.train.settings import EvalSettings
from src.metrics.masks import MASK_COLUMNS
from src.metrics.plots import save_eval_images
from src.metrics.records import predict_batches
from src.metrics.validator import evaluate
from src.models.spec import ModelSpec


class Evaluator:
    def __init__(
        self,
        settings: EvalSettings,
        ctx: DistContext,
        spec: ModelSpec,
        exp: Experiment,
        postprocessor: nn.Module,
        datasets: dict,
        collate,
        negatives: list[Path],
        amp_dtype: torch.dtype | None,
    ) -> None:
        """datasets: {"val": ..., "test": ...} (others ignored); collate: the evaluation collate;
        negatives: the held-out background images (checked disjoint from the splits; [] = none)."""
        self.settings, self.ctx, self.spec, self.exp = settings, ctx, spec, exp
        self.postprocessor, self.datasets, self.collate = postprocessor, datasets, collate
        self.negatives, self.amp_dtype = negatives, amp_dtype
        self.device = ctx.device
        self.conf_thresh, self.iou_thresh = settings.conf_thresh, settings.iou_thresh

    # ------------------------------------------------------------------ predictions

    def eval_loader(self, split: str) -> DataLoader | None:
        dataset = self.datasets.get(split)
        if dataset is None or len(dataset) == 0:
            return None
        return DataLoader(
            dataset,
            batch_size=self.settings.batch_size,
            sampler=ShardSampler(len(dataset), self.ctx.rank, self.ctx.world_size),
            num_workers=self.settings.num_workers,
            collate_fn=self.collate,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.settings.seed),
        )

    @torch.no_grad()
    def predict_split(self, model: nn.Module, split: str) -> tuple[list, list] | None:
        """Predictions and ground truth for every image of `split` exactly once, on rank 0 (None elsewhere)."""

        loader = self.eval_loader(split)
        if loader is None:
            return None
        was_training = model.training
        model.eval()
        preds, gts = predict_batches(
            model, loader, self.device, self.postprocessor, self.amp_dtype, desc=f"eval {split}",
            show_progress=self.ctx.is_main,
        )  # fmt: skip
        model.train(was_training)
        gathered = all_gather_objects(self.ctx, (preds, gts))
        if not self.ctx.is_main:
            return None
        return [p for part, _ in gathered for p in part], [g for _, part in gathered for g in part]

    def evaluate_split(self, model: nn.Module, split: str, plots: bool):
        """ValResult of `split` on rank 0 (None elsewhere or for an empty split); plots and eval pictures."""

        result = self.predict_split(model, split)
        if result is None:
            return None
        preds, gts = result
        names = self.spec.class_names
        evaluation = evaluate(preds, gts, names, self.conf_thresh, self.iou_thresh)
        pictures = self.exp.file("eval_preds") / split
        shutil.rmtree(pictures, ignore_errors=True)  # only this eval's pictures
        save_eval_images(preds, gts, pictures, names, self.conf_thresh, self.settings.eval_images)
        if plots:
            evaluation.save(self.exp.file("plots") / split)
        return evaluation

    def negatives_metrics(self, model: nn.Module, subsample: bool = False) -> dict[str, float]:
        """FPPI, clean-image rate and max score of `model` on the negatives folder ({} without one).

        subsample: only train.negatives_max_images of them (the same ones every epoch; scoring them all
        each epoch can cost more than the val split)."""
        if not self.negatives:
            return {}
        settings = self.settings
        images = evenly_spaced(self.negatives, settings.negatives_max_images) if subsample else self.negatives
        return evaluate_negatives(
            model, images, settings.negatives_thresholds, postprocessor=self.postprocessor,
            img_size=self.spec.img_size, keep_ratio=self.spec.keep_ratio, device=self.device,
            batch_size=settings.batch_size, num_workers=settings.num_workers,
            amp_dtype=self.amp_dtype, show_progress=self.ctx.is_main,
        )  # fmt: skip

    # ------------------------------------------------------------------ which epoch is best

    def validates(self, epoch: int) -> bool:
        return self.settings.validates(epoch)

    def judge_epoch(self, state: TrainState, epoch: int, evaluation, negatives: dict) -> dict:
        """This epoch's metrics (val + negatives), thresholds, and whether they beat the best so far."""
        if evaluation is None:
            if epoch == 0:
                logger.warning("no validation images: best.pt follows the latest weights, no early stopping")
            metrics, thresholds, score = dict(negatives), {}, float(epoch)  # every epoch 'improves'
            improved = score > state.best_score
        else:
            metrics = {k: float(v) for k, v in evaluation.metrics.items()} | negatives
            thresholds, score = evaluation.thresholds, self.decision_score(metrics)
            improved = self.beats_best(state, metrics, score)
        if metrics:
            best = "new best" if improved else f"best: epoch {state.best_epoch + 1}"
            parts = [self.describe(metrics), f"negatives: {describe(negatives)}" if negatives else ""]
            logger.info(f"epoch {epoch + 1}: {'; '.join(p for p in parts if p)} ({best})")
        return {
            "improved": improved,
            "metrics": metrics,
            "thresholds": thresholds,
            "best_score": score if improved else state.best_score,
            "best_epoch": epoch if improved else state.best_epoch,
            "epochs_without_improvement": 0 if improved else state.epochs_without_improvement + 1,
            "best_metrics": metrics if improved else state.best_metrics,
            "best_thresholds": thresholds if improved else state.best_thresholds,
            "peak_score": max(state.peak_score, score),
        }

    def beats_best(self, state: TrainState, metrics: dict, score: float) -> bool:
        """Higher decision score wins; with train.fppi_tolerance, within that band of the best score the
        lower FPPI at conf_thresh wins (prefer_lower_fppi; the band hangs from the highest score seen)."""
        tolerance = self.settings.fppi_tolerance
        if tolerance is None:
            return score > state.best_score
        best = {**state.best_metrics, "decision_score": state.best_score} if state.best_epoch >= 0 else None
        return prefer_lower_fppi(
            {**metrics, "decision_score": score}, best, tolerance, fppi_key(self.conf_thresh),
            map_key="decision_score", peak_map=state.peak_score,
        )  # fmt: skip

    def decision_score(self, metrics: dict) -> float:
        names = list(self.settings.decision_metrics)
        missing = [n for n in names if n not in metrics]
        if missing:
            raise KeyError(f"train.decision_metrics {missing} are not computed; available: {sorted(metrics)}")
        return float(sum(float(metrics[n]) for n in names))

    def describe(self, metrics: dict) -> str:
        shown = dict.fromkeys(
            [*self.settings.decision_metrics, "mAP_50_95", "mask_mAP_50", "precision", "recall"]
        )
        return ", ".join(f"{k} {metrics[k]:.4f}" for k in shown if k in metrics)

    # ------------------------------------------------------------------ after training

    def write_final_files(self, results: dict, negatives: dict) -> tuple[dict, dict]:
        """metrics.csv (+ a "negatives" row), per_class.csv, thresholds.json (picked on val); rank 0.

        Returns (thresholds, {split: metrics} of the splits that have images)."""

        done = {split: r for split, r in results.items() if r is not None}
        rows = [{"split": split, **r.metrics} for split, r in done.items()]
        if negatives:  # its own row: the neg_* columns, nothing else (no boxes to match there)
            rows.append({"split": "negatives", **negatives})
        atomic_write_csv(self.exp.file("metrics"), pd.DataFrame(rows))
        per_class = [r.per_class.assign(split=split) for split, r in done.items()]
        if per_class:
            frame = pd.concat(per_class, ignore_index=True)
            columns = ["split", *[c for c in frame.columns if c != "split"]]
            atomic_write_csv(self.exp.file("per_class"), frame[columns])
        # Thresholds are chosen on val only; test stays an unbiased check of them.
        thresholds = (
            done["val"].thresholds if "val" in done else {"conf_thresh": self.conf_thresh, "per_class": {}}
        )
        atomic_write_json(self.exp.file("thresholds"), thresholds)
        for split, r in done.items():
            logger.info(f"best.pt on {split}: {self.describe(r.metrics)}")
        if negatives:
            logger.info(f"best.pt on negatives: {describe(negatives)}")
        picked = "; ".join(["picked on val", *([thresholds["fallback"]] if "fallback" in thresholds else [])])
        logger.info(
            f"thresholds ({picked}): global {thresholds['conf_thresh']:.2f} -> {self.exp.file('thresholds')}"
        )
        return thresholds, {split: {k: float(v) for k, v in r.metrics.items()} for split, r in done.items()}


def check_decision_metrics(names: list[str], task: str) -> None:
    """train.decision_metrics may name mask mAP only for a segmentation model (a detector has none)."""

    masks = [name for name in names if name in MASK_COLUMNS]
    if masks and task != "segment":
        raise ConfigError(
            f"train.decision_metrics {masks} need a segmentation model (model.task=segment); model.task={task} "
            "has no masks: choose from mAP_50, mAP_50_95, precision, recall, f1, ..."
        )
