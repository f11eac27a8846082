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


def reference_scan_loss(anchor_logits, neighbour_logits, entropy_weight):
    """SCAN's public code: binary cross-entropy of the agreement against 1, minus the weighted
    entropy of the mean prediction (probabilities clamped at 1e-8)."""
    anchors, neighbours = anchor_logits.softmax(1), neighbour_logits.softmax(1)
    similarity = torch.bmm(anchors.unsqueeze(1), neighbours.unsqueeze(2)).squeeze()
    consistency = F.binary_cross_entropy(similarity, torch.ones_like(similarity))
    mean = anchors.mean(0).clamp(min=1e-8)
    return consistency - entropy_weight * -(mean * mean.log()).sum()


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_scan_loss_and_its_gradient_equal_the_reference(scale):
    from mtl_unsup.tasks.scan import scan_loss

    g = torch.Generator().manual_seed(0)
    anchor = (torch.randn(64, 10, generator=g, dtype=torch.float64) * scale).requires_grad_()
    neighbour = (torch.randn(64, 10, generator=g, dtype=torch.float64) * scale).requires_grad_()
    ours = scan_loss(anchor, neighbour, 5.0)
    theirs = reference_scan_loss(anchor, neighbour, 5.0)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    # the gradients of the agreement term (the entropy term's are the same expression)
    ours_grad = torch.autograd.grad(scan_loss(anchor, neighbour, 0.0), anchor)[0]
    theirs_grad = torch.autograd.grad(reference_scan_loss(anchor, neighbour, 0.0), anchor)[0]
    # PyTorch's BCE divides by max(s (1 - s), 1e-12): below an agreement s of 1e-12 the
    # reference's gradient shrinks with s; ours stays the exact gradient of -log s there
    similarity = (anchor.softmax(1) * neighbour.softmax(1)).sum(1).detach()
    exact, low = similarity * (1 - similarity) > 1e-11, similarity < 1e-11
    assert torch.allclose(ours_grad[exact], theirs_grad[exact], rtol=1e-5, atol=1e-12)
    # where the reference's gradient shrinks, ours is at least as large (a clamp would zero it)
    ours_size, theirs_size = ours_grad.abs().sum(1), theirs_grad.abs().sum(1)
    assert (ours_size[low] >= theirs_size[low] - 1e-12).all()
    if scale == 30.0:  # confident pairs that disagree carry most of the loss
        assert theirs.item() > 10 and low.any() and ours_size[low].sum() > 0
