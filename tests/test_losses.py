import math

import pytest
import torch
import torch.nn.functional as F

from mtl_unsup.tasks.losses import balanced_class_weights, nt_xent, rotate_batch


def test_nt_xent_matches_a_direct_computation():
    torch.manual_seed(0)
    z1, z2, t = torch.randn(4, 6), torch.randn(4, 6), 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    expected = 0.0
    for i in range(8):
        j = (i + 4) % 8
        sims = [(z[i] @ z[m]) / t for m in range(8) if m != i]
        expected += -(z[i] @ z[j] / t) + torch.logsumexp(torch.stack(sims), 0)
    assert nt_xent(z1, z2, t).item() == pytest.approx((expected / 8).item(), rel=1e-5)


def test_nt_xent_is_low_for_matching_views_and_high_for_unrelated_ones():
    torch.manual_seed(0)
    z = torch.randn(32, 16)
    aligned = nt_xent(z, z + 0.01 * torch.randn_like(z), 0.1)
    unrelated = nt_xent(z, torch.randn(32, 16), 0.1)
    assert aligned < 0.5 < math.log(63) * 0.5 < unrelated


def test_nt_xent_rejects_bad_inputs():
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(2, 3), torch.randn(2, 3), 0.0)
    with pytest.raises(ValueError, match="shape"):
        nt_xent(torch.randn(2, 3), torch.randn(3, 3))


def test_rotate_batch_rotates_each_image_by_its_own_turns():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    turns = torch.tensor([1, 3])
    out = rotate_batch(x, turns)
    assert torch.equal(out[0], torch.rot90(x[0], 1, dims=(1, 2)))
    assert torch.equal(out[1], torch.rot90(x[1], 3, dims=(1, 2)))
    assert torch.equal(rotate_batch(out, (4 - turns) % 4), x)


def test_balanced_weights_equalise_cluster_mass():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    w = balanced_class_weights(labels, 4)
    mass = torch.bincount(labels, minlength=4).float() * w
    assert torch.allclose(mass[:3], mass[0].expand(3))
    assert w[3] == 0  # an empty cluster gets no weight, not a division by zero
