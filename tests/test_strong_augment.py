"""SCAN's strong view: RandAugment drawn per group of images, and Cutout."""

import pytest
import torch

from mtl_unsup.data.strong_augment import Cutout, GroupRandAugment
from mtl_unsup.models.module import PlainView


def test_cutout_fills_one_clipped_square_per_image_with_the_mean():
    torch.manual_seed(0)
    x = torch.ones(64, 3, 32, 32)
    out = Cutout(max_size=16, fill=[0.1, 0.2, 0.3])(x)
    holes = out[:, 0] != 1
    assert torch.allclose(out[:, 1][holes], torch.tensor(0.2))
    rows, cols = holes.any(2).sum(1), holes.any(1).sum(1)
    assert (holes.sum((1, 2)) == rows * cols).all()  # each hole is one rectangle
    assert rows.max() <= 16 and cols.max() <= 16 and (holes.sum((1, 2)) > 0).float().mean() > 0.8
    assert len(set(holes.sum((1, 2)).tolist())) > 5  # sizes and clipping vary


def test_cutout_given_a_share_scales_its_holes_with_the_image():
    torch.manual_seed(0)
    for side in (16, 64):
        holes = Cutout(max_size=0.5, fill=0.0)(torch.ones(256, 1, side, side))[:, 0] == 0
        rows = holes.any(2).sum(1)
        assert rows.max() == side // 2  # the largest hole is half the side, never more
    with pytest.raises(ValueError, match="share of the image's side"):
        Cutout(max_size=1.5)


def test_group_randaugment_draws_per_group_and_repeats_under_a_seed():
    x = torch.rand(64, 3, 32, 32)
    augment = GroupRandAugment(num_ops=4, group_size=16)
    torch.manual_seed(1)
    a = augment(x)
    torch.manual_seed(1)
    b = augment(x)
    assert a.shape == x.shape and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    changed = [float((a[i:i + 16] - x[i:i + 16]).abs().mean()) for i in range(0, 64, 16)]
    assert len({round(c, 4) for c in changed}) == 4  # each group had its own draw


def test_the_plain_view_is_the_image_or_the_plain_slot_of_cached_rows():
    images, rows = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 5)
    assert torch.equal(PlainView()(images), images)
    assert torch.equal(PlainView()(rows), rows[:, 0])
