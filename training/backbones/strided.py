"""StridedCNN: a LeNet-sized net (LeCun et al. 1998) for 28x28 grayscale images, cheap enough to
score a 55,000-image pool every active-learning round on one core.

5x5 stride-2 conv (``width``) and 3x3 stride-2 conv (``2 * width``), each with batch norm and
ReLU (28 -> 14 -> 7), then a 128-unit ReLU layer: a 128-d embedding. Fixed to 28x28 inputs.
"""

from __future__ import annotations

from torch import nn

FEATURES = 128


class StridedCNN(nn.Sequential):
    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        w = width
        super().__init__(
            nn.Conv2d(in_channels, w, 5, 2, 2, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * w * 7 * 7, FEATURES),
            nn.ReLU(),
        )
