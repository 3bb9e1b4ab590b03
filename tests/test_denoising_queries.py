"""train.num_denoising: how many contrastive denoising queries a model trains with (denoising.set_denoising_queries)."""

from __future__ import annotations

import pytest
import torch

from src.models import build_model
from src.models.denoising import set_denoising_queries

IMG, QUERIES = 64, 20


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("n", 3, img_size=(IMG, IMG), num_queries=QUERIES, num_denoising=10).train()


def test_the_number_sets_the_groups_and_zero_turns_the_branch_off(model):
    images = torch.rand(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])}
    ]
    try:
        for num, groups in ((10, 5), (4, 2), (1, 1)):  # num // (2 boxes) groups, at least one
            set_denoising_queries(model, num)
            with torch.no_grad():
                out = model(images, targets)
            assert out["dn_meta"]["dn_num_group"] == groups
            assert (
                out["dn_outputs"][0]["pred_logits"].shape[1] == 2 * 2 * groups
            )  # positive + negative per box
        set_denoising_queries(model, 0)
        with torch.no_grad():
            out = model(images, targets)
        assert "dn_outputs" not in out and out["pred_logits"].shape[1] == QUERIES
    finally:
        set_denoising_queries(model, 10)


def test_bad_numbers_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        set_denoising_queries(build_model("n", 3, img_size=(IMG, IMG), num_queries=QUERIES), -1)
    without = build_model("n", 3, img_size=(IMG, IMG), num_queries=QUERIES, num_denoising=0)
    with pytest.raises(ValueError, match="denoising branch"):
        set_denoising_queries(without, 5)
