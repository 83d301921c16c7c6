"""Token-level predict: a FeatureProbeModule tagger on ConllDataModule writes one CSV row per input word
(sentence, word index, word, tag, probability), words without a first sub-token included with an empty tag."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import FILLER, NEGATIVE, POSITIVE, make_trainer

from datamodules import ConllDataModule
from tlmodules import FeatureProbeModule
from tlmodules.predictions import PredictionWriter, word_rows

pytestmark = pytest.mark.filterwarnings("ignore:.*modules? in eval mode.*", "ignore:.*sync_dist=True.*")

TAG_OF = {**{w: "B-POS" for w in POSITIVE}, **{w: "B-NEG" for w in NEGATIVE}}
MAX_LENGTH = 9  # [CLS] + 7 words + [SEP]: the 10-word sentence below loses its last 3 words


@pytest.fixture(autouse=True)
def _small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    monkeypatch.chdir(tmp_path)


def sentences(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(FILLER, 3) + rng.sample(POSITIVE + NEGATIVE, 2)
        rng.shuffle(words)
        out.append(words)
    return out


def write_conll(path: Path, blocks: list[list[str]], tagged: bool = True) -> Path:
    lines = [[f"{w} X {TAG_OF.get(w, 'O')}" if tagged else w for w in words] for words in blocks]
    path.write_text("-DOCSTART- -X- O\n\n" + "\n\n".join("\n".join(b) for b in lines) + "\n", encoding="utf-8")
    return path


def predict_sentences() -> list[list[str]]:
    """Ordinary sentences, one cut off by max_length, one with a word that tokenizes to nothing (a soft
    hyphen) in the middle, and a one-word sentence."""
    words = sentences(5, seed=3)
    return [
        *words[:2],
        ["the", "food", "was", "good", "and", "the", "service", "was", "really", "bad"],
        ["nice", "\u00ad", "phone"],
        ["awful"],
        *words[2:],
    ]


def fitted_tagger(tmp_path: Path, tiny_hf_dir: Path, output: str) -> tuple[FeatureProbeModule, ConllDataModule]:
    train = write_conll(tmp_path / "train.txt", sentences(40, seed=0))
    predict = write_conll(tmp_path / "predict.txt", predict_sentences(), tagged=False)
    data = ConllDataModule(
        train_file=str(train),
        predict_file=str(predict),
        backbone=f"hf:{tiny_hf_dir}",
        max_length=MAX_LENGTH,
        val_fraction=0,
        batch_size=4,
    )
    pl.seed_everything(0)
    model = FeatureProbeModule(backbone=f"hf:{tiny_hf_dir}", level="token", lr=0.05, predict_output=output)
    make_trainer(max_epochs=3, limit_val_batches=0).fit(model, datamodule=data)
    return model, data


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def expected_per_word(model: FeatureProbeModule, data: ConllDataModule, features: bool) -> dict[tuple[int, int], Any]:
    """(sentence index, word position) → the model's own softmax (or token features) at the word's first
    sub-token, by the module's forward on the predict batches (no cache, no writer)."""
    out = {}
    with torch.no_grad():
        for batch in data.predict_dataloader():
            if features:
                values = model.backbone.forward_tokens(batch["inputs"]).float()
            else:
                values = model(batch["inputs"]).float().softmax(-1)
            for row, index in enumerate(batch["index"].tolist()):
                _, positions = data.prediction_words(index)
                starts = values[row][batch["word_starts"][row]]
                assert len(starts) == len(positions)
                out.update({(index, p): v for p, v in zip(positions, starts)})
    return out


def test_token_predict_writes_one_row_per_word_with_the_forward_tag_and_probability(
    tmp_path: Path, tiny_hf_dir: Path
) -> None:
    model, data = fitted_tagger(tmp_path, tiny_hf_dir, "probabilities")
    target = tmp_path / "out" / "tags.csv"
    with pytest.warns(UserWarning, match=r"4 words of 2 sentences have no prediction in .*tags\.csv"):
        make_trainer(callbacks=[PredictionWriter(str(target))]).predict(model, datamodule=data)
    assert not list(target.parent.glob("*.partial"))

    header, rows = read_csv(target)
    assert header == ["sentence", "word_index", "word", "tag", "prob"]
    words = predict_sentences()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (str(s + 1), str(w + 1), word) for s, sentence in enumerate(words) for w, word in enumerate(sentence)
    ]
    expected = expected_per_word(model, data, features=False)
    tagged = 0
    for row in rows:
        sentence, position = int(row[0]) - 1, int(row[1]) - 1
        if (sentence, position) not in expected:  # cut off by max_length, or no token at all
            assert row[3:] == ["", ""]
            continue
        probs = expected[sentence, position]
        assert row[3] in data.class_names and row[3] == data.class_names[int(probs.argmax())]
        assert 0.0 < float(row[4]) <= 1.0
        assert float(row[4]) == pytest.approx(float(probs.max()), abs=2e-6)
        tagged += 1
    untagged = [(int(r[0]), r[2]) for r in rows if r[3] == ""]
    assert untagged == [(3, "was"), (3, "really"), (3, "bad"), (4, "\u00ad")]  # past max_length; no token
    assert tagged == len(rows) - 4
    # a trained tagger: label words get their tags, fillers O (the tiny BERT is random; most, not all)
    gold = [TAG_OF.get(r[2], "O") for r in rows if r[3]]
    assert sum(g == r[3] for g, r in zip(gold, [r for r in rows if r[3]])) >= 0.8 * tagged


def test_token_predict_writes_word_features_for_embeddings_output(tmp_path: Path, tiny_hf_dir: Path) -> None:
    model, data = fitted_tagger(tmp_path, tiny_hf_dir, "embeddings")
    target = tmp_path / "features.csv"
    with pytest.warns(UserWarning, match="4 words of 2 sentences"):
        make_trainer(callbacks=[PredictionWriter(str(target))]).predict(
            model, datamodule=data, return_predictions=False
        )
    header, rows = read_csv(target)
    assert header == ["sentence", "word_index", "word", *(f"f{i}" for i in range(32))]
    assert len(rows) == sum(len(s) for s in predict_sentences())
    expected = expected_per_word(model, data, features=True)
    for row in rows:
        key = (int(row[0]) - 1, int(row[1]) - 1)
        if key not in expected:
            assert row[3:] == [""] * 32
            continue
        values = torch.tensor([float(v) for v in row[3:]])
        torch.testing.assert_close(values, expected[key], atol=1e-5, rtol=1e-5)


def test_word_rows_without_the_words_and_with_a_mismatch() -> None:
    batch = {
        "index": torch.tensor([0, 1]),
        "word_counts": torch.tensor([2, 1]),
        "word_probs": torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]),
    }
    header, rows = word_rows([batch], ["O", "B-X"], lambda i: str(i + 1), None)
    assert header == ["sentence", "word_index", "word", "tag", "prob"]
    assert list(rows) == [
        ["1", "1", "", "O", "0.900000"],
        ["1", "2", "", "B-X", "0.800000"],
        ["2", "1", "", "O", "0.500000"],
    ]
    _, rows = word_rows([batch], ["O", "B-X"], str, lambda i: (["a", "b", "c"], [0, 2]))
    with pytest.raises(ValueError, match="sentence 1 has 1 predicted words but the datamodule marks 2 words"):
        list(rows)
