"""Classification heads: the seed's pool/flatten -> Dense(hidden) + ReLU -> Dropout -> output."""

from __future__ import annotations

from torch import nn


def make_pool(kind: str) -> nn.Module:
    """``avg``: global average pooling (any image size); ``flatten``: the seed's Flatten."""
    if kind == "avg":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if kind == "flatten":
        return nn.Flatten()
    raise ValueError(f"unknown pool {kind!r}; choose avg or flatten")


def make_classifier(in_features: int, num_outputs: int, hidden: int = 256, dropout: float = 0.5) -> nn.Sequential:
    """Dense(hidden) + ReLU + Dropout + output layer; ``hidden=0`` gives a linear head."""
    layers: list[nn.Module] = []
    if hidden > 0:
        layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
        in_features = hidden
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(in_features, num_outputs))
    return nn.Sequential(*layers)


class ClassifierHead(nn.Module):
    """``pool`` then ``classifier``; the feature cache stores ``pool``'s output."""

    def __init__(self, pool: str, feature_shape: tuple[int, int, int], num_outputs: int, hidden: int, dropout: float):
        super().__init__()
        channels, height, width = feature_shape
        in_features = channels if pool == "avg" else channels * height * width
        self.pool = make_pool(pool)
        self.classifier = make_classifier(in_features, num_outputs, hidden, dropout)

    def forward(self, features):
        return self.classifier(self.pool(features))
