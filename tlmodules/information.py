"""Label-free signals of how well a classifier fits an unlabelled domain.

Information maximisation (Krause, Perona & Gomes, NIPS 2010; used for source-free adaptation by
Liang et al., SHOT, ICML 2020): a good classifier on the target domain is confident on each sample
(low mean prediction entropy) and uses all classes (high entropy of the mean prediction). Their
difference ranks checkpoints when target labels do not exist.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of probability vectors along ``dim``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim)


class InformationMaximization(Metric):
    """Accumulates predictions ``(B, C)`` (logits) and computes ``entropy`` (mean per-sample
    prediction entropy, lower is more confident), ``diversity`` (entropy of the mean prediction,
    higher uses more classes) and ``score = diversity - entropy``. Sum-reduced across processes."""

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.add_state("entropy_sum", default=torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("prob_sum", default=torch.zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(()), dist_reduce_fx="sum")

    def update(self, logits: Tensor) -> None:
        probs = logits.float().softmax(-1)
        self.entropy_sum += entropy(probs).sum()
        self.prob_sum += probs.sum(0)
        self.count += probs.shape[0]

    def compute(self) -> dict[str, Tensor]:
        count = self.count.clamp_min(1.0)
        mean_entropy = self.entropy_sum / count
        diversity = entropy(self.prob_sum / count)
        return {"entropy": mean_entropy, "diversity": diversity, "score": diversity - mean_entropy}
