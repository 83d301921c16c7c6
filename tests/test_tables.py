"""read_table on ragged CSV/TSV rows (more fields than the header or the first row), and on the real text files."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SHARED_DATA

from datamodules.tables import DataError, read_table

TEXT = SHARED_DATA / "text"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_row_with_a_tab_in_its_sentence_is_named_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "train.tsv", "text\tlabel\ngood food\tpos\nbad\tfood\tneg\nfine\tpos\n")
    with pytest.raises(DataError) as caught:
        read_table(path, quoting=False)
    message = str(caught.value)
    assert message.startswith(f"{path} line 3 has 3 fields but the header has 2 (['text', 'label'])")
    assert "remove or replace a tab inside the field" in message and "quoting: true" in message
    with pytest.raises(DataError, match=r"line 3 has 3 fields.*put the field holding a tab in double quotes"):
        read_table(path)  # quoting on: quotes would protect the tab


def test_line_numbers_count_blank_lines_and_multi_line_quoted_fields(tmp_path: Path) -> None:
    text = 'text,label\n"two\nlines",pos\n\nfine,neg\n"three\nphysical\nlines",neg,extra\n'
    path = write(tmp_path / "train.csv", text)
    with pytest.raises(DataError, match=r"train\.csv lines 6-8 \(one record\) has 3 fields but the header has 2"):
        read_table(path)
    write(path, text.replace(",extra", ""))
    table = read_table(path)
    assert [row[0] for row in table.rows] == ["two\nlines", "fine", "three\nphysical\nlines"]


def test_without_a_header_the_first_row_sets_the_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "data.tsv", "good\t1\nbad\t0\nit\twas\t0\n")
    with pytest.raises(DataError, match=r"line 3 has 3 fields but the first row has 2.*first row's missing fields"):
        read_table(path, header=False)


def test_a_wrong_separator_says_which_file_format_to_choose(tmp_path: Path) -> None:
    path = write(tmp_path / "data.csv", "text\tlabel\ngood, really\tpos\n")  # tab-separated, named .csv
    with pytest.raises(DataError, match=r"line 2 has 2 fields but the header has 1.*set file_format: tsv"):
        read_table(path)
    assert read_table(path, file_format="tsv").rows == [["good, really", "pos"]]


def test_short_rows_are_missing_values_and_trailing_empty_fields_are_dropped(tmp_path: Path) -> None:
    path = write(tmp_path / "data.tsv", "text\tlabel\ngood\tpos\nlonely\nbad\tneg\t\t\n")
    table = read_table(path)
    assert table.columns == ["text", "label"]
    assert table.rows == [["good", "pos"], ["lonely"], ["bad", "neg"]]
    assert table.column("label", "label") == ["pos", None, "neg"]
    headless = read_table(write(tmp_path / "h.tsv", "a\tb\nc\nd\te\t\n"), header=False)
    assert headless.columns == ["0", "1"] and headless.rows == [["a", "b"], ["c"], ["d", "e"]]


def test_jsonl_is_not_affected(tmp_path: Path) -> None:
    path = write(tmp_path / "data.jsonl", '{"text": "a\\tb", "label": 1}\n{"text": "c", "label": 0, "extra": 5}\n')
    assert read_table(path).rows == [["a\tb", 1, None], ["c", 0, 5]]


# the real files as their README says to read them: none has a ragged row
REAL_FILES = [
    ("uci_sentences/amazon_cells_labelled.txt", {"header": False, "quoting": False}, 1000, 2),
    ("uci_sentences/imdb_labelled.txt", {"header": False, "quoting": False}, 1000, 2),
    ("uci_sentences/yelp_labelled.txt", {"header": False, "quoting": False}, 1000, 2),
    ("sst2/train.tsv", {}, 60614, 2),
    ("sst2/dev.tsv", {}, 6735, 2),
    ("sst2/test.tsv", {}, 872, 2),
    ("sms_spam/SMSSpamCollection", {"header": False, "quoting": False}, 5574, 2),
    ("ag_news/test.csv", {}, 7600, 3),
    ("ag_news/alps_train_subset_dev.tsv", {"header": False}, 10001, 2),
    ("imdb_reviews/imdb_reviews_3179.csv", {}, 3179, 2),
]


@pytest.mark.skipif(not TEXT.is_dir(), reason="shared text data not available")
@pytest.mark.parametrize(("name", "options", "rows", "columns"), REAL_FILES, ids=[f[0] for f in REAL_FILES])
def test_real_text_files_still_read(name: str, options: dict, rows: int, columns: int) -> None:
    table = read_table(TEXT / name, **options)
    assert len(table.rows) == rows and len(table.columns) == columns
    assert all(len(row) == columns for row in table.rows)


@pytest.mark.skipif(not TEXT.is_dir(), reason="shared text data not available")
def test_a_quoted_csv_read_with_quoting_off_is_refused_not_shifted() -> None:
    with pytest.raises(DataError, match=r"test\.csv line 3 has 6 fields but the header has 3.*quoting: true"):
        read_table(TEXT / "ag_news" / "test.csv", quoting=False)
