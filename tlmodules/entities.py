"""Entity-level scoring of BIO tag sequences (CoNLL style): spans, a micro F1 metric, tags from token logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from seqeval.metrics.sequence_labeling import get_entities
from torch import Tensor
from torchmetrics import Metric

from tlmodules.labels import IGNORE_INDEX


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one sentence's BIO tags as ``(type, first, last)`` word positions (``last`` inclusive).

    Spans come from seqeval's ``get_entities`` (its default, lenient mode, as in the CoNLL ``conlleval``
    script): an ``I-X`` without a ``B-X`` starts an entity, and a type change inside a run ends one.
    """
    tags = list(tags)
    for position, tag in enumerate(tags):
        if not isinstance(tag, str):
            raise ValueError(
                f"entity_spans takes one sentence's tags as strings; item {position} is {tag!r} "
                f"({type(tag).__name__}); pass e.g. ['B-PER', 'O'], one sentence at a time"
            )
    return set(get_entities(tags))


class EntityF1(Metric):
    """Micro precision / recall / F1 over entities: a predicted entity counts only when its span and type
    both match a gold entity exactly.

    ``update(predicted, target)`` takes sentences of tag strings (``predicted[i]`` and ``target[i]`` of
    equal length); counts are sum-reduced tensors, so they add up across processes under DDP.
    ``compute()`` gives ``{"precision", "recall", "f1"}`` as scalar float tensors; a ratio whose
    denominator is zero (no predicted or no gold entities) is 0, never NaN.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    tp: Tensor
    fp: Tensor
    fn: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: Sequence[Sequence[str]], target: Sequence[Sequence[str]]) -> None:
        if isinstance(predicted, str) or isinstance(target, str):
            raise ValueError("EntityF1.update takes lists of sentences, each a list of tags, not a string")
        if len(predicted) != len(target):
            raise ValueError(
                f"EntityF1.update got {len(predicted)} predicted sentences but {len(target)} target sentences; "
                "pass the same sentences in both"
            )
        tp = fp = fn = 0
        for number, (pred_tags, gold_tags) in enumerate(zip(predicted, target)):
            if len(pred_tags) != len(gold_tags):
                raise ValueError(
                    f"EntityF1.update: sentence {number} has {len(pred_tags)} predicted tags but {len(gold_tags)} "
                    "target tags; give one predicted tag per gold tag (the labelled words of the sentence)"
                )
            pred, gold = entity_spans(pred_tags), entity_spans(gold_tags)
            tp += len(pred & gold)
            fp += len(pred - gold)
            fn += len(gold - pred)
        self.tp += tp
        self.fp += fp
        self.fn += fn

    def compute(self) -> dict[str, Tensor]:
        tp, fp, fn = (x.double() for x in (self.tp, self.fp, self.fn))
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, tp + fn)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)  # = 2PR / (P + R), and 0 where that is undefined
        return {"precision": precision.float(), "recall": recall.float(), "f1": f1.float()}


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def tags_from_logits(
    logits: Tensor, labels: Tensor, class_names: Sequence[str], ignore_index: int = IGNORE_INDEX
) -> tuple[list[list[str]], list[list[str]]]:
    """Predicted and gold tags per sentence, read at the labelled positions only, in order.

    ``logits``: (B, T, C) token scores; ``labels``: (B, T) class indices, ``ignore_index`` at positions
    that carry no label (special tokens, later sub-tokens of a word, padding); ``class_names``: C names.
    Returns ``(predicted, gold)``: B lists each, of equal length per sentence.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"tags_from_logits needs logits (B, T, C) and labels (B, T); got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if logits.shape[-1] != len(class_names):
        raise ValueError(
            f"logits have {logits.shape[-1]} classes but class_names lists {len(class_names)}; "
            "pass the class_names of the data the model was trained on"
        )
    labels = labels.detach().cpu()
    keep = labels != ignore_index
    bad = keep & ((labels < 0) | (labels >= len(class_names)))
    if bad.any():
        value = labels[bad][0].item()
        raise ValueError(
            f"label {value} is neither a class index in [0, {len(class_names)}) nor ignore_index={ignore_index}; "
            "(predict batches have no gold tags: read their word starts from batch['word_starts'] instead)"
        )
    best = logits.detach().argmax(dim=-1).cpu()
    predicted, gold = [], []
    for row in range(labels.shape[0]):
        mask = keep[row]
        predicted.append([class_names[i] for i in best[row][mask].tolist()])
        gold.append([class_names[i] for i in labels[row][mask].tolist()])
    return predicted, gold
