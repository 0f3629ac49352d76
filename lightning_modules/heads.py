"""Classification heads: the seed's pool/flatten -> Dense(hidden) + ReLU -> Dropout -> output."""

from __future__ import annotations

from typing import TypedDict

from torch import nn


class HeadOptions(TypedDict):
    """The head's settings: one hyperparameter of the model, a plain dict in its checkpoints."""

    pool: str  # avg or flatten
    hidden: int  # 0: a linear head
    dropout: float


POOLING = {  # model.pool: its names (lightning_modules/choices.py POOLS) are checked by the config
    "avg": lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),  # global average (any image size)
    "flatten": nn.Flatten,  # the seed's Flatten
}


def make_pool(kind: str) -> nn.Module:
    return POOLING[kind]()


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
