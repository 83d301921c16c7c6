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


def soft_neighborhood_density(probs: Tensor, temperature: float = 0.05) -> Tensor:
    """SND of target predictions ``probs`` ``(N, C)`` (rows sum to 1): the mean entropy of each sample's softmax
    over its cosine similarities to the other samples' predictions, scaled by ``1 / temperature``. High when the
    predictions form dense neighbourhoods (clusters), low when they are scattered. A scalar tensor."""
    rows = torch.nn.functional.normalize(probs.float(), dim=1)
    similarity = rows @ rows.T / temperature
    similarity.fill_diagonal_(float("-inf"))  # a sample is not its own neighbour
    neighbours = similarity.softmax(dim=1)
    return entropy(neighbours, dim=1).mean()


class SoftNeighborhoodDensity(Metric):
    """Soft neighbourhood density (Saito et al., "Tune it the Right Way: Unsupervised Validation of Domain
    Adaptation via Soft Neighborhood Density", ICCV 2021): a second label-free model-selection score beside
    :class:`InformationMaximization`, higher is better.

    Information maximisation rewards confident predictions, so it also rewards a model that is confidently wrong
    (longer training, strong entropy-lowering terms such as MCC). SND asks instead whether the target predictions
    form tight clusters, measured between samples; its paper reports it ranks hyperparameters of DANN, CDAN, MCC
    and self-training better than entropy on the benchmarks it tried.

    Accumulates the softmax of logits ``(B, C)``, at most ``max_samples`` rows per process (the first ones seen:
    the similarity matrix is ``N × N``), gathered across processes; ``compute`` returns the scalar score.
    """

    full_state_update = False

    def __init__(self, temperature: float = 0.05, max_samples: int = 4000) -> None:
        super().__init__()
        if not temperature > 0 or max_samples < 2:
            raise ValueError(f"temperature must be > 0 and max_samples >= 2, got {temperature} and {max_samples}")
        self.temperature, self.max_samples = temperature, max_samples
        self.add_state("probs", default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor) -> None:
        room = self.max_samples - sum(len(p) for p in self.probs)
        if room > 0:
            self.probs.append(logits[:room].detach().float().softmax(-1))

    def compute(self) -> Tensor:
        probs = torch.cat(self.probs) if isinstance(self.probs, list) else self.probs
        if len(probs) < 2:
            return torch.tensor(float("nan"), device=probs.device)
        return soft_neighborhood_density(probs, self.temperature)
