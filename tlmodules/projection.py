"""Pictures of where two domains' features lie: a 2-D PCA scatter and TensorBoard's projector."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor


def pca_2d(features: Tensor) -> Tensor:
    """``(N, F)`` → the first two principal-component coordinates ``(N, 2)``."""
    centred = features.float() - features.float().mean(0, keepdim=True)
    _, _, basis = torch.linalg.svd(centred, full_matrices=False)
    return centred @ basis[:2].T


def log_domain_projection(
    module: pl.LightningModule,
    kept: Mapping[str, Sequence[tuple[Tensor, Tensor]]],
    class_names: Sequence[str],
    tag: str = "val/feature_projection",
) -> None:
    """Scatter of the domains' features on their first two principal components (a TensorBoard image)
    and the features themselves in the projector, labelled ``domain`` and ``label``; rank 0 only."""
    if not isinstance(module.logger, TensorBoardLogger) or module.global_rank != 0:
        return
    domains = [d for d in kept if kept[d]]
    if not domains:
        return
    feats = {d: torch.cat([f for f, _ in kept[d]]) for d in domains}
    labels = {d: torch.cat([y for _, y in kept[d]]) for d in domains}
    points = pca_2d(torch.cat([feats[d] for d in domains]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    start = 0
    for domain in domains:
        count = len(feats[domain])
        xy = points[start : start + count]
        ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.6, label=f"{domain} ({count})")
        start += count
    ax.set_title(f"features, first two principal components (step {module.global_step})")
    ax.legend(loc="best")
    experiment = module.logger.experiment
    experiment.add_figure(tag, fig, global_step=module.global_step, close=True)
    metadata = [
        [domain, class_names[int(y)] if 0 <= int(y) < len(class_names) else "unlabelled"]
        for domain in domains
        for y in labels[domain].tolist()
    ]
    experiment.add_embedding(
        torch.cat([feats[d] for d in domains]),
        metadata=metadata,
        metadata_header=["domain", "label"],
        tag=tag.replace("projection", "embedding"),
        global_step=module.global_step,
    )
