"""New layers put on top of a backbone. All return logits (use ``cross_entropy`` / ``*_with_logits``)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from tlmodules.errors import ConfigError

HeadKind = Literal["linear", "mlp"]
HEAD_KINDS: tuple[str, ...] = ("linear", "mlp")


def check_head(head: str, hidden: int) -> None:
    """A clear error for an unknown ``head`` or an ``mlp`` without hidden units (builds nothing, so a module
    can check its arguments in its constructor without drawing random numbers)."""
    if head not in HEAD_KINDS:
        raise ConfigError(f"unknown head {head!r}; choose one of {', '.join(HEAD_KINDS)}")
    if head == "mlp" and hidden < 1:
        raise ConfigError(f"head='mlp' needs head_hidden >= 1, got {hidden}")


def build_head(
    head: str, in_features: int, num_outputs: int, hidden: int, dropout: float, normalize: bool = False
) -> ClassificationHead:
    """The head every technique puts on its features: ``linear``, or ``mlp`` with one hidden layer of
    ``hidden`` units; ``dropout`` before each linear layer; ``normalize``: L2-normalise the features first.
    ``(B, in_features)`` → ``(B, num_outputs)``."""
    check_head(head, hidden)
    return ClassificationHead(in_features, num_outputs, hidden if head == "mlp" else 0, dropout, normalize)


class L2Normalize(nn.Module):
    """Unit-length rows along the last dimension (features compared by cosine similarity)."""

    def forward(self, features: Tensor) -> Tensor:
        return nn.functional.normalize(features, dim=-1)


class ClassificationHead(nn.Module):
    """Linear (``hidden=0``) or one-hidden-layer MLP classifier, optionally on L2-normalised features.

    Input ``(B, in_features)`` → logits ``(B, num_classes)``; the same works per token on
    ``(B, T, in_features)``.
    """

    def __init__(
        self, in_features: int, num_classes: int, hidden: int = 0, dropout: float = 0.0, normalize: bool = False
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        first: list[nn.Module] = [L2Normalize()] if normalize else []
        if hidden > 0:
            self.net = nn.Sequential(
                *first,
                nn.Dropout(dropout),
                nn.Linear(in_features, hidden),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            )
        else:
            self.net = nn.Sequential(*first, nn.Dropout(dropout), nn.Linear(in_features, num_classes))
        self.in_features = in_features
        self.num_classes = num_classes

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


class DomainDiscriminator(nn.Module):
    """Tells source from target: ``(B, in_features)`` → domain logits ``(B,)`` (source = 1, target = 0).

    ``layers`` times ``Linear → BatchNorm → ReLU``, then ``Linear(hidden, 1)``. The default (two layers of
    1024) is Transfer-Learning-Library's; the MNIST network of DANN (Ganin et al., JMLR 2016, Fig. 4) has one
    layer of 100. Returns logits instead of a sigmoid so that the loss is
    ``binary_cross_entropy_with_logits``, which is safe under autocast.
    """

    def __init__(self, in_features: int, hidden: int = 1024, batch_norm: bool = True, layers: int = 2) -> None:
        super().__init__()
        if layers < 1 or hidden < 1:
            raise ConfigError(f"the discriminator needs layers >= 1 and hidden >= 1, got {layers} and {hidden}")

        def block(width_in: int) -> list[nn.Module]:
            norm: list[nn.Module] = [nn.BatchNorm1d(hidden)] if batch_norm else []
            return [nn.Linear(width_in, hidden), *norm, nn.ReLU(inplace=True)]

        hidden_layers = [module for depth in range(layers) for module in block(hidden if depth else in_features)]
        self.net = nn.Sequential(*hidden_layers, nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).squeeze(-1)
