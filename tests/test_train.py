"""Generic trainer pieces on a small real torch module: optimizer groups, OneCycle, EMA, samplers, AMP, losses."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from src.dl.ema import ModelEMA
from src.dl.optim import build_optimizer, build_param_groups, build_scheduler, group_lrs
from src.dl.trainer_utils import (
    EpochShuffleSampler,
    ShardSampler,
    loss_kind,
    resolve_amp,
    rng_state,
    set_rng_state,
    sum_loss_kinds,
    to_float32,
)


class TinyDetector(nn.Module):
    """Names like D-FINE's: backbone.*, encoder.*, decoder.* with convs, BatchNorm, LayerNorm and biases."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential()
        self.backbone.add_module("conv", nn.Conv2d(3, 4, 3, bias=False))
        self.backbone.add_module("bn", nn.BatchNorm2d(4))
        self.backbone.add_module("lab", nn.Linear(4, 4))
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.decoder = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone.bn(self.backbone.conv(x)).mean((2, 3))
        return self.decoder(self.encoder(self.backbone.lab(x)))


def _group_of(groups: list[dict], param: nn.Parameter) -> dict:
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_param_groups_split_backbone_and_no_decay():
    model = TinyDetector()
    groups = build_param_groups(model, base_lr=1e-3, backbone_lr=1e-4, weight_decay=0.1)
    assert {g["name"] for g in groups} == {"backbone", "backbone_no_decay", "rest", "rest_no_decay"}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    conv = _group_of(groups, model.backbone.conv.weight)
    assert (conv["lr"], conv["weight_decay"]) == (1e-4, 0.1)
    for norm_or_bias in (model.backbone.bn.weight, model.backbone.bn.bias, model.backbone.lab.bias):
        group = _group_of(groups, norm_or_bias)
        assert (group["lr"], group["weight_decay"]) == (1e-4, 0.0)
    for norm_or_bias in (model.encoder[1].weight, model.encoder[1].bias, model.decoder.bias):
        group = _group_of(groups, norm_or_bias)
        assert (group["lr"], group["weight_decay"]) == (1e-3, 0.0)
    assert _group_of(groups, model.decoder.weight)["weight_decay"] == 0.1


def test_onecycle_gives_each_group_its_own_peak_lr_and_backbone_really_moves_slower():
    model = TinyDetector()
    optimizer = build_optimizer(model, base_lr=1e-2, backbone_lr=1e-4, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_pct=0.3)
    peaks: dict[str, float] = {}
    for _ in range(10):
        for name, lr in group_lrs(optimizer).items():
            peaks[name] = max(peaks.get(name, 0.0), lr)
        optimizer.step()
        scheduler.step()
    assert math.isclose(peaks["lr_backbone"], 1e-4, rel_tol=1e-6)
    assert math.isclose(peaks["lr_rest"], 1e-2, rel_tol=1e-6)

    # The LR really applies: one Adam step moves a parameter by ~lr (Adam normalises the gradient).
    model = TinyDetector()
    optimizer = build_optimizer(model, base_lr=1e-2, backbone_lr=1e-4, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    backbone_move = (model.backbone.conv.weight - before["backbone.conv.weight"]).abs().max().item()
    head_move = (model.decoder.weight - before["decoder.weight"]).abs().max().item()
    assert backbone_move == pytest.approx(1e-4, rel=0.01)
    assert head_move == pytest.approx(1e-2, rel=0.01)


def test_ema_follows_official_warmup_ramp():
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = ModelEMA(model, decay=0.9, warmups=10)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    decay = 0.9 * (1 - math.exp(-1 / 10))
    assert torch.allclose(ema.module.weight, torch.full_like(model.weight, 1 - decay))
    assert not any(p.requires_grad for p in ema.module.parameters())
    restored = ModelEMA(model, decay=0.9, warmups=10)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1 and torch.equal(restored.module.weight, ema.module.weight)


def test_ema_copies_integer_buffers():
    model = nn.BatchNorm1d(3)
    ema = ModelEMA(model, decay=0.99, warmups=0)
    model(torch.randn(4, 3))
    ema.update(model)
    assert ema.module.num_batches_tracked.item() == 1


def test_epoch_sampler_is_reproducible_splits_ranks_and_skips():
    full = list(EpochShuffleSampler(10, seed=3))
    assert sorted(full) == list(range(10))
    again = EpochShuffleSampler(10, seed=3)
    again.set_epoch(0, skip=4)
    assert list(again) == full[4:] and len(again) == 6
    other_epoch = EpochShuffleSampler(10, seed=3)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != full
    ranks = [EpochShuffleSampler(5, seed=0, rank=r, world_size=2) for r in range(2)]
    shares = [list(s) for s in ranks]
    assert len(shares[0]) == len(shares[1]) == 3  # padded so both ranks step equally often
    assert set(shares[0]) | set(shares[1]) == set(range(5))


def test_shard_sampler_sees_every_image_once():
    shards = [list(ShardSampler(7, rank, 3)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(7))


def test_resolve_amp():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        resolve_amp("fp16", cpu)
    with pytest.raises(ValueError, match="train.amp"):
        resolve_amp("half", cpu)


def test_rng_state_round_trip():
    state = rng_state()
    first = (torch.rand(3), torch.randint(0, 100, (1,)).item())
    set_rng_state(state)
    assert torch.equal(torch.rand(3), first[0])


def test_loss_kinds_sum_over_layers():
    assert loss_kind("loss_vfl_aux_3") == "loss_vfl"
    assert loss_kind("loss_bbox_dn_pre") == "loss_bbox"
    assert loss_kind("loss_giou_enc_0") == "loss_giou"
    assert loss_kind("loss_fgl") == "loss_fgl"
    summed = sum_loss_kinds({"loss_vfl": 1.0, "loss_vfl_aux_0": 2.0, "loss_ddf_dn_1": 0.5})
    assert summed == {"loss_vfl": 3.0, "loss_ddf": 0.5}


def test_to_float32_nested():
    out = to_float32(
        {"a": torch.ones(2, dtype=torch.bfloat16), "b": [{"c": torch.ones(1, dtype=torch.int64)}]}
    )
    assert out["a"].dtype == torch.float32 and out["b"][0]["c"].dtype == torch.int64
