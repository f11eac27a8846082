"""SCAN's strong view on batches: RandAugment (kornia) drawn per group of images, then Cutout.

SCAN (Van Gansbeke et al., 2020) trains its clustering and self-label stages on images each
given 4 operations drawn from a RandAugment list, each at a random strength, then one square
hole. kornia's :class:`~kornia.augmentation.auto.RandAugment` draws its operations once per call
for the whole batch, at one fixed strength; :class:`GroupRandAugment` calls it on groups of
images, each group with its own draw and its own strength, so a batch still sees many
combinations. Both modules draw from torch's global RNG, which training seeds per step.
"""

from __future__ import annotations

import torch
from kornia.augmentation.auto import RandAugment
from torch import nn

# SCAN's list (Identity and Invert left out), in kornia's terms. kornia's shear is in units of
# 180 degrees (0.032 is SCAN's 0.1 shear coefficient, ~5.7 degrees) and its brightness is
# additive (x + f - 1), so its range is kept to a darkening of at most 0.4.
SCAN_POLICY = [
    [("auto_contrast", 0, 1)], [("equalize", 0, 1)], [("rotate", -30.0, 30.0)],
    [("solarize", 0.0, 1.0)], [("posterize", 4, 8)], [("color", 0.05, 0.95)],
    [("contrast", 0.05, 0.95)], [("brightness", 0.6, 1.0)], [("sharpness", 0.05, 0.95)],
    [("shear_x", -0.032, 0.032)], [("shear_y", -0.032, 0.032)],
    [("translate_x", -0.1, 0.1)], [("translate_y", -0.1, 0.1)],
]


class GroupRandAugment(nn.Module):
    """``num_ops`` RandAugment operations per image, drawn anew for each group of images.

    Args:
        num_ops: operations applied to each image (SCAN: 4).
        group_size: images that share one draw of operations and strength.
        max_magnitude: strengths are drawn uniformly in ``[1, max_magnitude]`` of kornia's 30.
        policy: kornia's policy list; None is :data:`SCAN_POLICY`.
    """

    def __init__(self, num_ops: int = 4, group_size: int = 16, max_magnitude: int = 29,
                 policy: list | None = None) -> None:
        super().__init__()
        if group_size < 1 or not 1 <= max_magnitude <= 29:
            raise ValueError(f"group_size={group_size} must be >= 1 and max_magnitude={max_magnitude} "
                             "in [1, 29]")
        self.augment = RandAugment(n=num_ops, m=max_magnitude, policy=policy or SCAN_POLICY)
        self.group_size, self.max_magnitude = group_size, max_magnitude

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for group in x.split(self.group_size):
            self.augment.m = int(torch.randint(1, self.max_magnitude + 1, ()))
            out.append(self.augment(group))
        return torch.cat(out).clamp_(0.0, 1.0)


class Cutout(nn.Module):
    """One square hole per image (DeVries and Taylor, 2017, as SCAN uses it): a side drawn up to
    ``max_size`` pixels, centred anywhere, clipped at the border, filled with ``fill`` (the data's
    mean, so that after normalisation the hole is zero, as in SCAN).

    Args:
        max_size: the largest side of a hole, in pixels (SCAN on CIFAR-10: 16), or as a share
            of the image's shorter side when below 1 (0.5: 16 of 32 pixels, whatever the size).
        fill: the hole's value per channel, in [0, 1] image units.
    """

    def __init__(self, max_size: float = 16, fill: list[float] | float = 0.5) -> None:
        super().__init__()
        if not 0 < max_size < 1 and (max_size < 1 or max_size != int(max_size)):
            raise ValueError(f"max_size={max_size}: a whole number of pixels >= 1, or a share of "
                             "the image's side between 0 and 1")
        self.max_size = max_size
        fill = [fill] if isinstance(fill, int | float) else list(fill)
        self.register_buffer("fill", torch.tensor(fill, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        side = int(self.max_size) if self.max_size >= 1 else max(1, round(self.max_size * min(h, w)))
        half = torch.randint(1, side + 1, (b, 1, 1), device=x.device) // 2
        cy = torch.randint(0, h, (b, 1, 1), device=x.device)
        cx = torch.randint(0, w, (b, 1, 1), device=x.device)
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        hole = (ys >= cy - half) & (ys < cy + half) & (xs >= cx - half) & (xs < cx + half)
        fill = self.fill.to(x.dtype).expand(b, x.shape[1], h, w)
        return torch.where(hole.unsqueeze(1), fill, x)
