"""The pieces of the few-label ``contrastive`` fine-tuning strategy (SetFit-style).

SetFit (Tunstall et al., "Efficient Few-Shot Learning Without Prompts", 2022) fine-tunes a sentence encoder so
that same-class examples embed close together and different-class ones apart, then fits a logistic regression on
the tuned embeddings. Here the first part is the supervised contrastive loss over each batch (SupCon: Khosla et
al., "Supervised Contrastive Learning", NeurIPS 2020), taken from pytorch-metric-learning: every same-class pair
of a batch is a positive, every other pair a negative, so a batch of ``B`` examples yields ``B·(B-1)`` ordered
pairs, where SetFit's pair sampling pays two encoder passes per pair. The second part is :func:`fit_logistic_head`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tlmodules.estimators import fit_estimator, linear_head_parameters, make_estimator

ClassWeight = Literal["balanced"] | None  # the fitted head's class weights (scikit-learn's ``class_weight``)
CLASS_WEIGHTS = ("balanced", None)


class SupervisedContrastiveLoss(nn.Module):
    """SupCon over one batch: embeddings ``(B, F)`` (any scale; compared by cosine similarity) and class
    labels ``(B,)`` → a scalar. Anchors without a same-class partner in the batch add nothing; a batch without
    any same-class pair gives zero (with a graph, so every process still runs backward under DDP)."""

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        from pytorch_metric_learning.losses import SupConLoss

        self.temperature = temperature
        self.loss = SupConLoss(temperature=temperature)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        embeddings = embeddings.float()  # the similarity's exp(·/τ) is not bf16-safe
        return self.loss(embeddings, labels) + 0.0 * embeddings.sum()

    def floor(self, labels: Tensor, num_classes: int) -> Tensor:
        """The lowest value the loss can take on a batch of these labels ``(B,)``: its value when the classes'
        embeddings form a regular simplex, every same-class pair at cosine 1 and every other pair at
        ``-1/(C-1)`` (SupCon's minimisers: Graf et al., "Dissecting Supervised Contrastive Learning", ICML
        2021). Anchor ``i`` with ``P_i`` positives and ``N_i`` negatives then scores
        ``log(P_i + N_i·exp(-C/((C-1)·τ)))``, about ``log P_i`` at the usual temperatures; the loss averages
        over anchors with a positive, and is zero on a batch without both kinds of pair."""
        same = labels[:, None] == labels[None, :]
        positives = same.sum(dim=1) - 1
        negatives = (~same).sum(dim=1)
        counted = (positives > 0) & (negatives.sum() > 0)  # the anchors the loss averages over
        classes = max(num_classes, 2)
        negative_weight = math.exp(-classes / ((classes - 1) * self.temperature))
        per_anchor = torch.log(positives.clamp(min=1).float() + negatives.float() * negative_weight)
        # masked rather than indexed: no host sync on the training step
        return (per_anchor * counted).sum() / counted.sum().clamp(min=1)


def lone_anchor_share(labels: Sequence[int], batch_size: int) -> float:
    """The expected share of examples with no same-class partner in a random batch of ``batch_size`` drawn from
    ``labels`` (class indices of the training split): SupCon anchors that teach nothing. An example of a class
    with ``n`` of the ``N`` examples is alone when none of the other ``B - 1`` is of its class,
    ``C(N - n, B - 1) / C(N - 1, B - 1)`` (without replacement)."""
    total = len(labels)
    others = min(batch_size, total) - 1
    if others <= 0:
        return 1.0 if total else 0.0
    alone = 0.0
    for count in Counter(int(y) for y in labels).values():
        rest = total - count
        if rest >= others:  # else every batch holds a partner
            log_p = _log_comb(rest, others) - _log_comb(total - 1, others)
            alone += count * math.exp(log_p)
    return alone / total


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def share_rank_zero_buffers(module: nn.Module) -> None:
    """Copy process 0's buffers (BatchNorm running statistics) to every process (collective; no-op alone).

    DDP keeps the parameters identical across processes but lets each update its own running statistics from its
    own batches (it broadcasts process 0's only at the start of the next wrapped forward). Features that the
    processes compute outside that forward and then pool must come from one network: process 0's, which is the
    one checkpoints save."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def gather_in_sample_order(features: Tensor, labels: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Every process's ``(N_i, F)`` features and ``(N_i,)`` labels (collective; moves through the CPU: a few-label
    training set is small), sorted by the samples' dataset ``index`` ``(N_i,)``: the order, and so the fitted
    head, does not depend on the number of processes or on how the split was cut into batches."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (features.cpu(), labels.cpu(), index.cpu()))
        features = torch.cat([f for f, _, _ in gathered]).to(features.device)
        labels = torch.cat([y for _, y, _ in gathered]).to(labels.device)
        index = torch.cat([i for _, _, i in gathered])
    order = torch.argsort(index.cpu(), stable=True).to(features.device)
    return features[order], labels[order]


@torch.no_grad()
def embed_split(backbone: nn.Module, batches: Iterable[dict[str, Any]]) -> tuple[Tensor, Tensor, Tensor]:
    """The backbone's pooled features ``(N, F)``, the labels ``(N,)`` and the dataset indices ``(N,)`` of every
    ``{"inputs", "labels", "index"}`` batch (positions in reading order where a batch has no ``index``)."""
    features, labels, indices = [], [], []
    seen = 0
    for batch in batches:
        batch_features = backbone(batch["inputs"]).float()
        features.append(batch_features)
        labels.append(batch["labels"])
        index = batch.get("index")
        indices.append(index if index is not None else torch.arange(seen, seen + len(batch_features)))
        seen += len(batch_features)
    if not features:
        empty = torch.zeros(0, dtype=torch.long)
        return torch.zeros(0, backbone.num_features), empty, empty
    return torch.cat(features), torch.cat(labels), torch.cat(indices).long()


def fit_logistic_head(
    layer: nn.Linear,
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    seed: int,
    class_weight: ClassWeight = "balanced",
) -> None:
    """Fit scikit-learn's logistic regression (its defaults, as SetFit, but for ``class_weight``) on L2-normalised
    ``features`` ``(N, F)`` and copy it into ``layer`` (``Linear(F, num_classes)``): its logits then equal the
    estimator's decision function. A class missing from ``labels`` gets a bias that keeps it from being predicted.

    ``class_weight="balanced"`` weighs each example of class ``c`` by ``N / (C · n_c)``. With balanced labels every
    weight is 1 and the fit is the unweighted one. With a few examples of one class among many of another, the
    unweighted fit's L2 penalty (``C = 1`` on unit-norm features) outweighs the minority's few terms and the head
    can predict the majority class for every input; ``None`` keeps the unweighted fit (SetFit's)."""
    estimator = make_estimator("logistic_regression", {"class_weight": class_weight}, seed=seed)
    estimator = fit_estimator(estimator, F.normalize(features, dim=-1), labels)
    weight, bias = linear_head_parameters(estimator, num_classes)
    layer.weight.copy_(weight.to(layer.weight))
    layer.bias.copy_(bias.to(layer.bias))
