"""Entity spans, the entity-level F1 metric and tag sequences read from token logits."""

from __future__ import annotations

import pytest
import torch
from seqeval.metrics import f1_score, precision_score, recall_score

from tlmodules.entities import EntityF1, entity_spans, tags_from_logits


# -- entity_spans -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tags, spans",
    [
        (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 1), ("LOC", 3, 3)}),
        (["O", "I-MISC", "I-MISC", "O"], {("MISC", 1, 2)}),  # I- without B- starts an entity (lenient)
        (["B-PER", "I-LOC", "I-LOC"], {("PER", 0, 0), ("LOC", 1, 2)}),  # type change ends the run
        (["O", "B-ORG", "I-ORG"], {("ORG", 1, 2)}),  # entity running to the end of the sentence
        (["O", "O", "B-ORG"], {("ORG", 2, 2)}),  # one-word entity at the end
        (["B-PER", "B-PER"], {("PER", 0, 0), ("PER", 1, 1)}),  # B after B: two entities
        (["O", "O"], set()),
        ([], set()),
    ],
)
def test_entity_spans(tags, spans):
    assert entity_spans(tags) == spans


def test_entity_spans_rejects_nested_sentences():
    with pytest.raises(ValueError, match="one sentence's tags as strings; item 0"):
        entity_spans([["B-PER"], ["O"]])


# -- EntityF1 ---------------------------------------------------------------------------------------
# 3 sentences: 3 gold entities (PER, LOC in the first; ORG in the second), 3 predicted (PER, ORG, ORG),
# 2 correct (PER 0-1, ORG 1-1); the LOC at word 3 is predicted as ORG: one false positive, one false negative.
# tp=2 fp=1 fn=1 -> P = 2/3, R = 2/3, F1 = 2/3.
GOLD = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "O"], ["O", "O"]]
PRED = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "O"], ["O", "O"]]


def scores(metric: EntityF1) -> dict[str, float]:
    return {k: v.item() for k, v in metric.compute().items()}


def test_entity_f1_hand_example():
    metric = EntityF1()
    metric.update(PRED, GOLD)
    assert (metric.tp.item(), metric.fp.item(), metric.fn.item()) == (2, 1, 1)
    assert scores(metric) == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})


def test_entity_f1_unequal_precision_and_recall_match_seqeval():
    # gold: PER 0-1, LOC 3-3, ORG 5-5 (3 entities); predicted: PER 0-0 (wrong span), LOC 3-3 (correct).
    # tp=1 fp=1 fn=2 -> P = 1/2, R = 1/3, F1 = 2PR/(P+R) = (1/3)/(5/6) = 2/5.
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"]]
    pred = [["B-PER", "O", "O", "B-LOC", "O", "O"]]
    metric = EntityF1()
    metric.update(pred, gold)
    expected = {"precision": 1 / 2, "recall": 1 / 3, "f1": 2 / 5}
    assert scores(metric) == pytest.approx(expected)
    seqeval = {"precision": precision_score(gold, pred), "recall": recall_score(gold, pred), "f1": f1_score(gold, pred)}
    assert seqeval == pytest.approx(expected)


def test_entity_f1_accumulates_across_updates_and_resets():
    once, twice = EntityF1(), EntityF1()
    once.update(PRED, GOLD)
    twice.update(PRED[:1], GOLD[:1])
    twice.update(PRED[1:], GOLD[1:])
    assert scores(twice) == scores(once)
    twice.reset()
    assert (twice.tp.item(), twice.fp.item(), twice.fn.item()) == (0, 0, 0)
    twice.update(PRED[1:], GOLD[1:])  # only the correct ORG: P = R = F1 = 1
    assert scores(twice) == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0})


def test_entity_f1_states_sum_when_merged():
    # merge_state applies each state's dist_reduce_fx, as the DDP sync does
    first, second, whole = EntityF1(), EntityF1(), EntityF1()
    first.update(PRED[:1], GOLD[:1])
    second.update(PRED[1:], GOLD[1:])
    whole.update(PRED, GOLD)
    first.merge_state(second)
    assert scores(first) == scores(whole)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ([["O", "O"]], [["O", "O"]]),  # no entities at all
        ([["B-PER", "O"]], [["O", "O"]]),  # predicted but no gold: P = 0, R undefined -> 0
        ([["O", "O"]], [["B-PER", "O"]]),  # gold but none predicted
    ],
)
def test_entity_f1_is_zero_not_nan_when_undefined(pred, gold):
    metric = EntityF1()
    with pytest.warns(UserWarning, match="called before the ``update``"):  # torchmetrics' own warning
        assert scores(metric) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    metric.update(pred, gold)
    assert scores(metric) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_entity_f1_length_mismatch():
    metric = EntityF1()
    with pytest.raises(ValueError, match="sentence 1 has 2 predicted tags but 3 target tags"):
        metric.update([["O"], ["O", "O"]], [["O"], ["O", "O", "O"]])
    with pytest.raises(ValueError, match="got 1 predicted sentences but 2 target sentences"):
        metric.update([["O"]], [["O"], ["O"]])


# -- tags_from_logits -------------------------------------------------------------------------------
NAMES = ["O", "B-PER", "I-PER"]


def logits_for(predicted: list[list[int]]) -> torch.Tensor:
    """(B, T, C) logits whose argmax is ``predicted``."""
    return torch.nn.functional.one_hot(torch.tensor(predicted), len(NAMES)).float() * 5 - 1


def test_tags_from_logits_reads_only_labelled_positions():
    # sentence 0: [CLS] w0 w0' w1 [SEP]; sentence 1: [CLS] w0 [SEP] pad pad
    labels = torch.tensor([[-100, 1, -100, 2, -100], [-100, 0, -100, -100, -100]])
    predicted = [[0, 1, 0, 0, 2], [1, 1, 2, 2, 2]]  # what the model says at -100 positions must not show
    pred, gold = tags_from_logits(logits_for(predicted), labels, NAMES)
    assert gold == [["B-PER", "I-PER"], ["O"]]
    assert pred == [["B-PER", "O"], ["B-PER"]]
    metric = EntityF1()
    metric.update(pred, gold)  # gold PER 0-1, predicted PER 0-0 and PER 0-0: tp=0 fp=2 fn=1
    assert (metric.tp.item(), metric.fp.item(), metric.fn.item()) == (0, 2, 1)


def test_tags_from_logits_errors():
    logits = logits_for([[0, 1, 2]])
    with pytest.raises(ValueError, match=r"logits \(B, T, C\) and labels \(B, T\); got \(1, 3, 3\) and \(3,\)"):
        tags_from_logits(logits, torch.tensor([0, 1, 2]), NAMES)
    with pytest.raises(ValueError, match="logits have 3 classes but class_names lists 2"):
        tags_from_logits(logits, torch.tensor([[0, 1, 2]]), NAMES[:2])
    with pytest.raises(ValueError, match=r"label -1 is neither a class index in \[0, 3\) nor ignore_index=-100"):
        tags_from_logits(logits, torch.tensor([[-100, -1, 2]]), NAMES)
