"""MultiTaskDataModule on tiny generated tables and on the real UCI energy-efficiency table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

from datamodules import DataError, MultiTaskDataModule

ENERGY = SHARED_DATA / "tabular" / "energy_efficiency" / "ENB2012_data.csv"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "\n".join(json.dumps(r) for r in records) + "\n")


def numeric_table(path: Path, n: int = 20, shift: float = 0.0) -> Path:
    """Features a (spread), b (scaled), c (constant); labels colour (multiclass) and price (regression)."""
    rng = np.random.default_rng(int(shift) + n)
    lines = ["a,b,c,colour,price"]
    for i in range(n):
        a, b = rng.normal(shift, 3.0), rng.normal(100.0 + shift, 10.0)
        lines.append(f"{a:.4f},{b:.4f},5,{['red', 'green', 'blue'][i % 3]},{i * 1.5}")
    return write(path, "\n".join(lines) + "\n")


NUMERIC_TASKS = [
    {"name": "colour", "kind": "multiclass", "column": "colour", "weight": 2.0, "head_hidden": 8},
    {"name": "price", "kind": "regression", "column": "price"},
]


def numeric_module(train: Path, **kwargs) -> MultiTaskDataModule:
    kwargs.setdefault("tasks", NUMERIC_TASKS)
    kwargs.setdefault("batch_size", 4)
    return MultiTaskDataModule(train_file=str(train), **kwargs)


def rows(path: Path, columns: list[str]) -> np.ndarray:
    """The given columns of a CSV as float64, by hand (numpy), for reference values."""
    header = path.read_text().splitlines()[0].split(",")
    data = np.genfromtxt(path, delimiter=",", skip_header=1, dtype=str)
    return data[:, [header.index(c) for c in columns]].astype(np.float64)


# -- numeric input: standardisation with training statistics only ------------------------------------------
def test_numeric_features_standardised_with_train_split_statistics(tmp_path):
    train = numeric_table(tmp_path / "train.csv", n=20)
    dm = numeric_module(train, val_fraction=0.25, seed=3)
    assert dm.in_features == 3 and dm.input_columns == ["a", "b", "c"]  # every column no task uses
    dm.setup("fit")
    raw = rows(train, ["a", "b", "c"])
    train_idx, val_idx = dm.datasets["train"].indices, dm.datasets["val"].indices
    assert len(train_idx) == 15 and len(val_idx) == 5 and not set(train_idx) & set(val_idx)
    mean, std = raw[train_idx].mean(0), raw[train_idx].std(0)
    std[std == 0] = 1.0  # the constant column c
    assert not np.allclose(mean, raw.mean(0))  # the whole file's statistics would differ
    np.testing.assert_allclose(dm.feature_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(dm.feature_std.numpy(), std, rtol=1e-5)
    val = torch.stack([dm.datasets["val"][i]["inputs"] for i in range(5)]).numpy()
    np.testing.assert_allclose(val, (raw[val_idx] - mean) / std, rtol=1e-4, atol=1e-5)
    assert [dm.datasets["val"][i]["index"] for i in range(5)] == val_idx
    train_x = torch.stack([item["inputs"] for item in dm.datasets["train"]]).double()
    assert dm.datasets["train"][0]["inputs"].dtype == torch.float32
    assert torch.allclose(train_x[:, :2].mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(train_x[:, :2].std(0, correction=0), torch.ones(2, dtype=torch.float64), atol=1e-5)
    assert torch.all(train_x[:, 2] == 0)  # constant: centred, std taken as 1


def test_regression_targets_scaled_with_train_split_statistics(tmp_path):
    train = numeric_table(tmp_path / "train.csv", n=20)
    lines = train.read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ","  # row 0 lacks its price: left out of the statistics
    train.write_text("\n".join(lines) + "\n")
    dm = numeric_module(train, val_fraction=0.25, seed=3)
    dm.setup("fit")
    price = next(t for t in dm.tasks if t["name"] == "price")
    kept = [i for i in dm.datasets["train"].indices if i != 0]
    values = np.array([i * 1.5 for i in kept])
    assert price["target_mean"] == pytest.approx(values.mean()) and price["target_std"] == pytest.approx(values.std())
    assert price["target_mean"] != pytest.approx(np.arange(1, 20).mean() * 1.5)  # not the whole file's
    assert "target_mean" not in next(t for t in dm.tasks if t["name"] == "colour")


def test_val_file_scaled_with_train_file_statistics(tmp_path):
    train = numeric_table(tmp_path / "train.csv", n=12)
    val = numeric_table(tmp_path / "val.csv", n=6, shift=50.0)  # far off: its own statistics would differ
    dm = numeric_module(train, val_file=str(val))
    dm.setup("fit")
    mean, std = rows(train, ["a", "b", "c"]).mean(0), rows(train, ["a", "b", "c"]).std(0)
    std[std == 0] = 1.0
    got = torch.stack([item["inputs"] for item in dm.datasets["val"]]).numpy()
    np.testing.assert_allclose(got, (rows(val, ["a", "b", "c"]) - mean) / std, rtol=1e-4, atol=1e-5)
    assert len(dm.datasets["train"]) == 12  # a val_file: no rows held out of training


def test_state_dict_carries_the_scaling(tmp_path):
    train = numeric_table(tmp_path / "train.csv", n=20)
    dm = numeric_module(train, val_fraction=0.25)
    dm.setup("fit")
    state = dm.state_dict()
    assert torch.equal(state["feature_mean"], dm.feature_mean) and torch.equal(state["feature_std"], dm.feature_std)
    assert state["tasks"][0]["class_names"] == ["blue", "green", "red"]
    # other data (another split) with the checkpoint's statistics: restored before and after setup
    other = numeric_table(tmp_path / "other.csv", n=20, shift=7.0)
    before = numeric_module(other, val_fraction=0.5)
    before.load_state_dict(state)
    before.setup("fit")
    after = numeric_module(other, val_fraction=0.5)
    after.setup("fit")
    assert not torch.allclose(after.feature_mean, dm.feature_mean)
    after.load_state_dict(state)
    for restored in (before, after):
        assert torch.equal(restored.feature_mean, dm.feature_mean)
        assert torch.equal(restored.feature_std, dm.feature_std)
    expected = (torch.tensor(rows(other, ["a", "b", "c"])[0], dtype=torch.float32) - dm.feature_mean) / dm.feature_std
    assert torch.allclose(after.datasets["train"].dataset[0]["inputs"], expected)  # datasets built before restore
    mismatch = {**state, "tasks": [{"name": "colour", "kind": "multiclass", "class_names": ["a", "b"]}]}
    with pytest.raises(DataError, match="colour.*same kind and label set"):
        numeric_module(other).load_state_dict(mismatch)


# -- labels ------------------------------------------------------------------------------------------------
LABEL_CSV = """x,kind,flag,answer,pair,score
1,cat,1,yes,spam,1.5
2,dog,0,No,ham,
3,,true,,,2.25
4,bird,,YES,spam,-3
5,cat,FALSE,no,ham,abc
"""


def label_tasks(*, with_score: bool = True) -> list[dict]:
    tasks = [
        {"name": "animal", "kind": "multiclass", "column": "kind"},
        {"name": "flag", "kind": "binary", "column": "flag"},
        {"name": "answer", "kind": "binary", "column": "answer"},
        {"name": "pair", "kind": "binary", "column": "pair", "weight": 0.5},
    ]
    if with_score:
        tasks.append({"name": "score", "kind": "regression", "column": "score"})
    return tasks


def test_label_encoding_and_missing_labels_per_kind(tmp_path):
    path = write(tmp_path / "labels.csv", LABEL_CSV.replace("abc", "7"))
    dm = MultiTaskDataModule(train_file=str(path), tasks=label_tasks(), val_fraction=0, batch_size=5)
    t = dm.targets["train"]
    assert t["animal"].tolist() == [1, 2, -100, 0, 1] and t["animal"].dtype == torch.int64  # bird, cat, dog
    nan = math.nan
    for name, expected in {
        "flag": [1.0, 0.0, 1.0, nan, 0.0],
        "answer": [1.0, 0.0, nan, 1.0, 0.0],
        "pair": [1.0, 0.0, nan, 1.0, 0.0],  # ham < spam
        "score": [1.5, nan, 2.25, -3.0, 7.0],
    }.items():
        assert t[name].dtype == torch.float32
        torch.testing.assert_close(t[name], torch.tensor(expected), equal_nan=True)
    dm.setup("fit")
    item = dm.datasets["train"][2]
    assert item["index"] == 2 and item["labels"]["animal"].item() == -100 and math.isnan(item["labels"]["pair"])
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["labels"]) == {"animal", "flag", "answer", "pair", "score"}
    dtypes = {"animal": torch.int64, "flag": torch.float32, "answer": torch.float32}
    for name, labels in batch["labels"].items():
        assert labels.shape == (5,) and labels.dtype == dtypes.get(name, torch.float32)
    assert batch["inputs"].shape == (5, 1) and batch["index"].shape == (5,)
    assert sorted(batch["index"].tolist()) == [0, 1, 2, 3, 4]


def test_tasks_completed_with_outputs_and_class_names(tmp_path):
    path = write(tmp_path / "labels.csv", LABEL_CSV.replace("abc", "7"))
    dm = MultiTaskDataModule(train_file=str(path), tasks=label_tasks(), val_fraction=0)
    assert dm.task_names == ["animal", "flag", "answer", "pair", "score"]
    completed = {t["name"]: (t["num_outputs"], t["class_names"]) for t in dm.tasks}
    assert completed == {
        "animal": (3, ["bird", "cat", "dog"]),
        "flag": (1, ["0", "1"]),
        "answer": (1, ["no", "yes"]),
        "pair": (1, ["ham", "spam"]),
        "score": (1, None),
    }
    assert dm.tasks[3]["weight"] == 0.5 and dm.tasks[3]["column"] == "pair"  # pass-through keys kept
    fixed = [{"name": "animal", "kind": "multiclass", "column": "kind", "labels": ["dog", "cat", "bird", "fish"]}]
    dm = MultiTaskDataModule(train_file=str(path), tasks=fixed, val_fraction=0)
    assert dm.tasks[0]["class_names"] == ["dog", "cat", "bird", "fish"] and dm.tasks[0]["num_outputs"] == 4
    assert dm.targets["train"]["animal"].tolist() == [1, 0, -100, 2, 1]


def test_label_set_comes_from_the_training_file(tmp_path):
    train = write(tmp_path / "train.tsv", "x\ty\n1\ta\n2\tb\n3\ta\n")
    val = write(tmp_path / "val.tsv", "x\ty\n1\ta\n2\ta\n")
    tasks = [{"name": "t", "kind": "multiclass", "column": "y"}]
    dm = MultiTaskDataModule(train_file=str(train), val_file=str(val), tasks=tasks)
    assert dm.tasks[0]["class_names"] == ["a", "b"]
    assert dm.targets["val"]["t"].tolist() == [0, 0]
    test = write(tmp_path / "test.tsv", "x\ty\n1\ta\n2\tc\n")
    with pytest.raises(DataError, match=r"label 'c' in .*test\.tsv \(task 't'.*data row 2.*not in the label set"):
        MultiTaskDataModule(train_file=str(train), test_file=str(test), tasks=tasks)


def test_jsonl_labels_with_nulls(tmp_path):
    records = [
        {"x": 0.5, "y": 1, "ok": True, "v": 2},
        {"x": 1.5, "y": None, "ok": None, "v": None},
        {"x": 2.5, "y": 3, "ok": False, "v": 4.5},
    ]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    tasks = [
        {"name": "y", "kind": "multiclass", "column": "y"},
        {"name": "ok", "kind": "binary", "column": "ok"},
        {"name": "v", "kind": "regression", "column": "v"},
    ]
    dm = MultiTaskDataModule(train_file=str(path), tasks=tasks, val_fraction=0)
    assert dm.input_columns == ["x"] and dm.tasks[0]["class_names"] == ["1", "3"]
    assert dm.targets["train"]["y"].tolist() == [0, -100, 1]
    torch.testing.assert_close(dm.targets["train"]["ok"], torch.tensor([1.0, math.nan, 0.0]), equal_nan=True)
    torch.testing.assert_close(dm.targets["train"]["v"], torch.tensor([2.0, math.nan, 4.5]), equal_nan=True)


def test_multilabel_cells_lists_and_missing_rows(tmp_path):
    csv_path = write(tmp_path / "train.csv", "x,tags\n1,news|sport\n2,\n3,|\n4,tech\n5, sport | tech \n")
    tasks = [{"name": "tags", "kind": "multilabel", "column": "tags"}]
    dm = MultiTaskDataModule(train_file=str(csv_path), tasks=tasks, val_fraction=0, batch_size=5)
    assert dm.tasks[0]["class_names"] == ["news", "sport", "tech"] and dm.tasks[0]["num_outputs"] == 3
    expected = [[1, 1, 0], [math.nan] * 3, [0, 0, 0], [0, 0, 1], [0, 1, 1]]  # "" missing; "|" none of them
    torch.testing.assert_close(dm.targets["train"]["tags"], torch.tensor(expected), equal_nan=True)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["labels"]["tags"].shape == (5, 3)
    records = [{"x": 1, "tags": ["b", "a"]}, {"x": 2, "tags": []}, {"x": 3, "tags": None}, {"x": 4, "tags": "a;b"}]
    jsonl = write_jsonl(tmp_path / "train.jsonl", records)
    spec = [{"name": "tags", "kind": "multilabel", "column": "tags", "separator": ";"}]
    dm = MultiTaskDataModule(train_file=str(jsonl), tasks=spec, val_fraction=0)
    torch.testing.assert_close(
        dm.targets["train"]["tags"], torch.tensor([[1, 1], [0, 0], [math.nan] * 2, [1, 1]]), equal_nan=True
    )
    val = write(tmp_path / "val.csv", "x,tags\n1,news|weather\n")
    with pytest.raises(DataError, match=r"labels \['weather'\] in .*val\.csv.*data row 1.*not in the task's label set"):
        MultiTaskDataModule(train_file=str(csv_path), val_file=str(val), tasks=tasks)
    one = write(tmp_path / "one.csv", "x,tags\n1,news\n2,news\n")
    with pytest.raises(DataError, match=r"multilabel task 'tags' has labels \['news'\]; it needs two or more"):
        MultiTaskDataModule(train_file=str(one), tasks=tasks, val_fraction=0)


def test_single_task_tables_merged_each_row_keeping_its_own_labels(tmp_path):
    (tmp_path / "colours").mkdir()
    (tmp_path / "prices").mkdir()
    colours = write(tmp_path / "colours" / "train.csv", "a,b,colour\n1,10,red\n2,20,blue\n3,30,red\n")
    prices = write(tmp_path / "prices" / "train.csv", "b,a,price,note\n40,4,1.5\n50,5,2.5\n")  # other order
    tasks = [
        {"name": "colour", "kind": "multiclass", "column": "colour"},
        {"name": "price", "kind": "regression", "column": "price"},
    ]
    dm = MultiTaskDataModule(
        train_file=[str(colours), str(prices)], tasks=tasks, feature_columns=["a", "b"], val_fraction=0, batch_size=5
    )
    assert dm.targets["train"]["colour"].tolist() == [1, 0, 1, -100, -100]  # the price rows lack a colour
    torch.testing.assert_close(dm.targets["train"]["price"], torch.tensor([math.nan] * 3 + [1.5, 2.5]), equal_nan=True)
    assert dm.tables["train"].row_source(0) == colours and dm.tables["train"].row_source(4) == prices
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    raw = torch.tensor([[1.0, 10], [2, 20], [3, 30], [4, 40], [5, 50]])  # columns matched by name, not position
    expected = (raw - raw.mean(0)) / raw.std(0, correction=0)
    torch.testing.assert_close(batch["inputs"][batch["index"].argsort()], expected, atol=1e-5, rtol=1e-5)
    before = dm.fingerprint("train")
    prices.write_text("b,a,price,note\n40,4,1.5\n50,5,9.5\n")
    changed = MultiTaskDataModule(train_file=[str(colours), str(prices)], tasks=tasks, feature_columns=["a", "b"])
    assert changed.fingerprint("train") != before  # any of the files changes the cache key
    lacking = write(tmp_path / "bad.csv", "a,price\n1,2\n")
    with pytest.raises(DataError, match=r"input column 'b' is not in .*bad\.csv"):
        MultiTaskDataModule(train_file=[str(colours), str(lacking)], tasks=tasks, feature_columns=["a", "b"])


# -- errors ------------------------------------------------------------------------------------------------
def test_task_naming_a_missing_column(tmp_path):
    path = numeric_table(tmp_path / "train.csv", n=6)
    tasks = [{"name": "size", "kind": "regression", "column": "sizes"}]
    with pytest.raises(DataError, match=r"task 'size'.*'sizes'.*\['a', 'b', 'c', 'colour', 'price'\].*'column'"):
        numeric_module(path, tasks=tasks)
    val = write(tmp_path / "val.csv", "a,b,c,colour\n1,2,3,red\n")  # val lacks the price column
    with pytest.raises(DataError, match=r"task 'price'.*'price' is not in .*val\.csv"):
        numeric_module(path, val_file=str(val))


def test_non_numeric_regression_target(tmp_path):
    path = write(tmp_path / "labels.csv", LABEL_CSV)
    with pytest.raises(DataError, match=r"'abc'.*task 'score'.*column 'score'.*data row 5.*must be numbers"):
        MultiTaskDataModule(train_file=str(path), tasks=label_tasks())


def test_unknown_kind_and_duplicate_names(tmp_path):
    path = numeric_table(tmp_path / "train.csv", n=6)
    with pytest.raises(DataError, match=r"task 'price' has unknown kind 'ordinal'.*multiclass"):
        numeric_module(path, tasks=[{"name": "price", "kind": "ordinal", "column": "price"}])
    twice = [NUMERIC_TASKS[0], {"name": "colour", "kind": "regression", "column": "price"}]
    with pytest.raises(DataError, match=r"task name 'colour' is used by more than one task"):
        numeric_module(path, tasks=twice)


def test_binary_column_with_three_values(tmp_path):
    path = write(tmp_path / "t.csv", "x,y\n1,a\n2,b\n3,c\n")
    with pytest.raises(DataError, match=r"binary task 'y'.*3 distinct values \['a', 'b', 'c'\].*multiclass"):
        MultiTaskDataModule(train_file=str(path), tasks=[{"name": "y", "kind": "binary", "column": "y"}])
    val = write(tmp_path / "v.csv", "x,y\n1,1\n2,maybe\n")
    words = write(tmp_path / "w.csv", "x,y\n1,yes\n2,no\n")
    with pytest.raises(DataError, match=r"'maybe' in .*v\.csv.*data row 2.*not a binary value"):
        MultiTaskDataModule(
            train_file=str(words), val_file=str(val), tasks=[{"name": "y", "kind": "binary", "column": "y"}]
        )


def test_non_numeric_feature(tmp_path):
    path = write(tmp_path / "t.csv", "a,b,y\n1,2,3\n4,five,6\n7,8,9\n")
    dm = MultiTaskDataModule(train_file=str(path), tasks=[{"name": "y", "kind": "regression", "column": "y"}])
    with pytest.raises(DataError, match=r"feature column 'b' of .*t\.csv has 'five' in data row 2"):
        dm.setup("fit")
    gap = write(tmp_path / "g.csv", "a,b,y\n1,2,3\n4,,6\n")
    dm = MultiTaskDataModule(train_file=str(gap), tasks=[{"name": "y", "kind": "regression", "column": "y"}])
    with pytest.raises(DataError, match=r"feature column 'b' .* data row 2"):
        dm.setup("fit")


def test_empty_split(tmp_path):
    train = numeric_table(tmp_path / "train.csv", n=6)
    empty = write(tmp_path / "val.csv", "a,b,c,colour,price\n")
    with pytest.raises(DataError, match=r"val file .*val\.csv has no data rows"):
        numeric_module(train, val_file=str(empty))
    one = numeric_table(tmp_path / "one.csv", n=1)
    with pytest.raises(DataError, match=r"cannot hold out 50% of 1 samples"):  # at construction: the split is known
        numeric_module(one, val_fraction=0.5, tasks=[{"name": "price", "kind": "regression", "column": "price"}])


# -- text and image inputs ---------------------------------------------------------------------------------
def test_text_input_padded_per_batch(tmp_path, tiny_hf_dir):
    path = write(
        tmp_path / "reviews.tsv",
        "text\tsentiment\tstars\n"
        "good\tpos\t5\n"
        "the food was very bad\tneg\t1\n"
        "nice phone\t\t4\n"
        "it was really awful and bad\tneg\t\n",
    )
    tasks = [
        {"name": "sentiment", "kind": "multiclass", "column": "sentiment"},
        {"name": "stars", "kind": "regression", "column": "stars"},
    ]
    dm = MultiTaskDataModule(
        train_file=str(path),
        tasks=tasks,
        input_kind="text",
        text_column="text",
        backbone=f"hf:{tiny_hf_dir}",
        val_fraction=0,
        batch_size=2,
    )
    assert dm.in_features is None and dm.tokenizer_source == str(tiny_hf_dir)
    dm.setup("fit")
    assert dm.datasets["train"][0]["inputs"]["input_ids"][0] == 2  # [CLS]
    loader = dm._loader("train", shuffle=False)
    first, second = list(loader)
    # words + [CLS] + [SEP]: rows of 3 and 7 tokens, then 4 and 8
    assert first["inputs"]["input_ids"].shape == (2, 7) and second["inputs"]["input_ids"].shape == (2, 8)
    assert first["inputs"]["attention_mask"].sum(1).tolist() == [3, 7]
    assert first["inputs"]["input_ids"][0, 3:].tolist() == [0, 0, 0, 0]  # [PAD]
    assert first["labels"]["sentiment"].tolist() == [1, 0] and second["labels"]["sentiment"].tolist() == [-100, 0]
    torch.testing.assert_close(second["labels"]["stars"], torch.tensor([4.0, math.nan]), equal_nan=True)
    assert first["index"].tolist() == [0, 1]


def test_text_input_needs_a_text_column(tmp_path, tiny_hf_dir):
    path = write(tmp_path / "t.tsv", "text\ty\ngood\t1\n")
    with pytest.raises(DataError, match=r"needs text_column"):
        MultiTaskDataModule(
            train_file=str(path), tasks=[{"name": "y", "kind": "regression", "column": "y"}], input_kind="text"
        )
    with pytest.raises(DataError, match=r"input column 'body' is not in .*\['text', 'y'\].*text_column"):
        MultiTaskDataModule(
            train_file=str(path),
            tasks=[{"name": "y", "kind": "regression", "column": "y"}],
            input_kind="text",
            text_column="body",
        )


def test_image_input_paths_relative_to_the_table(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.fromarray(np.full((6, 5, 3), 60 * i, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    path = write(tmp_path / "images.csv", "path,label\nimg/0.png,a\nimg/1.png,b\nimg/2.png,\n")
    tasks = [{"name": "label", "kind": "multiclass", "column": "label"}]
    dm = MultiTaskDataModule(
        train_file=str(path), tasks=tasks, input_kind="image", image_column="path", val_fraction=0, batch_size=3
    )
    dm.setup("fit")
    batch = next(iter(dm._loader("train", shuffle=False)))
    assert batch["inputs"].shape == (3, 3, 6, 5) and batch["labels"]["label"].tolist() == [0, 1, -100]
    assert (
        torch.allclose(batch["inputs"][0], torch.tensor(-1.0)) and batch["inputs"][2].mean() > batch["inputs"][1].mean()
    )
    bad = write(tmp_path / "bad.csv", "path,label\nimg/0.png,a\nimg/9.png,b\n")
    dm = MultiTaskDataModule(train_file=str(bad), tasks=tasks, input_kind="image", image_column="path")
    with pytest.raises(DataError, match=r"image 'img/9.png' .*data row 2.*not a file"):
        dm.setup("fit")


# -- real data ---------------------------------------------------------------------------------------------
def test_energy_efficiency_two_regression_tasks():
    if not ENERGY.exists():
        pytest.skip(f"{ENERGY} is not available")
    tasks = [
        {"name": "heating", "kind": "regression", "column": "heatload"},
        {"name": "cooling", "kind": "regression", "column": "coolload"},
    ]
    dm = MultiTaskDataModule(train_file=str(ENERGY), tasks=tasks, val_fraction=0.2, batch_size=64)
    assert dm.in_features == 8
    assert dm.input_columns == ["relacomp", "surf", "wall", "roof", "height", "orient", "glazarea", "glazdist"]
    assert all(t["num_outputs"] == 1 and t["class_names"] is None for t in dm.tasks)
    for name in ("heating", "cooling"):
        labels = dm.targets["train"][name]
        assert labels.shape == (768,) and not torch.isnan(labels).any()
    assert dm.targets["train"]["heating"][0].item() == pytest.approx(15.55)
    assert dm.targets["train"]["cooling"][0].item() == pytest.approx(21.33)
    dm.setup("fit")
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 768 and len(dm.datasets["val"]) == 154
    assert dm.feature_mean.shape == (8,) and torch.all(dm.feature_std > 0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (64, 8) and batch["inputs"].dtype == torch.float32
    assert batch["labels"]["heating"].shape == (64,) and torch.isfinite(batch["inputs"]).all()
    # a held-out split shares the training file's fingerprint (indices address its rows); no test file: none
    assert isinstance(dm.fingerprint("val"), str) and dm.fingerprint("val") == dm.fingerprint("train")
    assert dm.fingerprint("test") is None
    assert dm.prediction_id(0) == "1"
