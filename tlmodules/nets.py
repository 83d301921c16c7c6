"""Small built-in feature extractors for small images, trainable from scratch on a CPU."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LeNetFeatures(nn.Module):
    """The LeNet-style digit feature extractor of the DANN paper (Ganin et al., JMLR 2016, Fig. 4, MNIST).

    ``conv5x5(32) → maxpool2 → ReLU → conv5x5(48) → dropout → maxpool2 → ReLU → flatten``.

    ``builtin:lenet`` uses ``dropout=0.5``: channel dropout after the second convolution, as the LeNet of
    Transfer-Learning-Library's digit benchmarks, which regularises the small network against the source
    domain (bench/README.md has the digits figures).

    Input ``(B, C, 28, 28)``; output ``(B, 768)`` (48 channels × 4 × 4). The convolutions run in
    channels-last memory layout, the layout oneDNN's CPU convolution kernels are fastest in.
    """

    num_features = 768

    def __init__(self, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, 32, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv2d(32, 48, 5), nn.Dropout2d(dropout), nn.MaxPool2d(2), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return self.conv2(self.conv1(x)).flatten(1)


class MLPFeatures(nn.Module):
    """A plain MLP trunk for numeric feature vectors: ``(B, in_features) → (B, hidden)``."""

    def __init__(self, in_features: int, hidden: int = 64, depth: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers.append(nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)))
            width = hidden
        self.layers = nn.Sequential(*layers)
        self.num_features = hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
