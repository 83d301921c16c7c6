"""Long texts under a token limit: head+tail truncation (Sun et al., "How to Fine-Tune BERT for Text
Classification?", CCL 2019) and overlapping windows pooled per document, built from the tokenizer's own
encodings so that special tokens sit where the tokenizer puts them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from datamodules.tables import DataError

LongText = Literal["truncate", "head_tail", "chunks"]
LONG_TEXT_MODES: tuple[str, ...] = get_args(LongText)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_long_text_arguments(
    long_text: str, head_tokens: int | None, chunk_stride: int | None, max_chunks: int | None
) -> None:
    """Refuse a ``long_text`` mode or a ``head_tokens`` / ``chunk_stride`` / ``max_chunks`` that no tokenizer could
    make sense of (their upper bounds, which depend on the tokenizer, are checked by :func:`check_content_budget`)."""
    if long_text not in LONG_TEXT_MODES:
        raise DataError(f"long_text must be one of {list(LONG_TEXT_MODES)}, got {long_text!r}")
    if head_tokens is not None and (not _is_int(head_tokens) or head_tokens < 0):
        raise DataError(f"head_tokens must be an integer >= 0 (or null: a quarter of the tokens), got {head_tokens!r}")
    if chunk_stride is not None and (not _is_int(chunk_stride) or chunk_stride < 1):
        raise DataError(
            f"chunk_stride must be an integer >= 1 (or null: half the tokens of a window), got {chunk_stride!r}"
        )
    if max_chunks is not None and (not _is_int(max_chunks) or max_chunks < 1):
        raise DataError(f"max_chunks must be an integer >= 1 (or null: every window), got {max_chunks!r}")


def check_content_budget(
    budget: int, max_length: int, specials: int, head_tokens: int | None, chunk_stride: int | None
) -> None:
    """Refuse ``head_tokens`` / ``chunk_stride`` that do not fit the ``budget`` text tokens of one sequence
    (``max_length`` minus the tokenizer's ``specials``)."""
    where = f"the {budget} text tokens of a sequence (max_length {max_length} minus {specials} special tokens)"
    if budget < 1:
        raise DataError(
            f"max_length {max_length} leaves no room for text after the tokenizer's {specials} special tokens; "
            f"raise max_length"
        )
    if head_tokens is not None and head_tokens >= budget:
        raise DataError(
            f"head_tokens {head_tokens} leaves no room for the tail in {where}; give head_tokens below {budget}"
        )
    if chunk_stride is not None and chunk_stride > budget:
        raise DataError(
            f"chunk_stride {chunk_stride} is longer than a window ({where}): windows would skip tokens; "
            f"give chunk_stride of {budget} or less"
        )


def default_head_tokens(budget: int) -> int:
    """A quarter of the text tokens, rounded (128 of 510: Sun et al.'s head 128 + tail 382)."""
    return (budget + 2) // 4


def default_chunk_stride(budget: int) -> int:
    """Half a window: every token is in two windows (one at the ends)."""
    return max(1, budget // 2)


def head_tail_tokens(ids: Sequence[int], budget: int, head_tokens: int) -> list[int]:
    """The first ``head_tokens`` and the last ``budget - head_tokens`` of ``ids`` (all of them when they fit)."""
    if len(ids) <= budget:
        return list(ids)
    tail = budget - head_tokens
    return list(ids[:head_tokens]) + list(ids[len(ids) - tail :])


def window_starts(length: int, budget: int, stride: int, max_chunks: int | None = None) -> list[int]:
    """Where the windows of ``budget`` tokens over ``length`` tokens start: ``0, stride, 2 * stride, ...`` until
    a window reaches the end (the last may be shorter); one window when the tokens fit. With ``max_chunks``
    below the number of windows, ``max_chunks`` evenly spaced windows are kept, the first and the last among
    them (``max_chunks=1``: the first)."""
    if length <= budget:
        return [0]
    count = 1 + math.ceil((length - budget) / stride)
    starts = [k * stride for k in range(count)]
    if max_chunks is not None and count > max_chunks:
        if max_chunks == 1:
            return starts[:1]
        keep = [round(i * (count - 1) / (max_chunks - 1)) for i in range(max_chunks)]
        starts = [starts[i] for i in keep]
    return starts


@dataclass(frozen=True)
class SpecialTokens:
    """Where a tokenizer puts its special tokens around one sequence (``[CLS] text [SEP]``, ``<s> text </s>``),
    with their token types and the text's, read off one of its own encodings."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    prefix_types: tuple[int, ...] | None = None
    suffix_types: tuple[int, ...] | None = None
    text_type: int = 0

    @classmethod
    def read(cls, encoded: dict[str, list[int]], text_ids: Sequence[int], specials: int) -> SpecialTokens | None:
        """The layout of ``encoded`` (the tokenizer's own encoding, special tokens included) around ``text_ids``
        (its text tokens, all of them), or ``None`` when ``encoded`` is not ``prefix + text_ids + suffix``."""
        ids, types = encoded["input_ids"], encoded.get("token_type_ids")
        n = len(text_ids)
        if len(ids) != n + specials:
            return None
        for p in range(specials + 1):
            if list(ids[p : p + n]) == list(text_ids):
                if types is None:
                    return cls(tuple(ids[:p]), tuple(ids[p + n :]))
                text_type = types[p] if n else 0
                if any(t != text_type for t in types[p : p + n]):
                    return None
                return cls(tuple(ids[:p]), tuple(ids[p + n :]), tuple(types[:p]), tuple(types[p + n :]), text_type)
        return None

    def wrap(self, text_ids: Sequence[int]) -> dict[str, list[int]]:
        """``text_ids`` with the special tokens placed as the tokenizer places them."""
        out = {"input_ids": [*self.prefix, *text_ids, *self.suffix]}
        if self.prefix_types is not None and self.suffix_types is not None:
            out["token_type_ids"] = [*self.prefix_types, *[self.text_type] * len(text_ids), *self.suffix_types]
        return out


def encode_texts(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    long_text: LongText = "truncate",
    head_tokens: int | None = None,
    chunk_stride: int | None = None,
    max_chunks: int | None = None,
) -> dict[str, list[Any]]:
    """``input_ids`` (and ``token_type_ids`` where the tokenizer makes them) of every text.

    A text of ``max_length`` tokens or fewer (special tokens included) is the tokenizer's own encoding under
    every ``long_text``. A longer one: ``truncate`` keeps its first ``max_length`` tokens (the tokenizer's
    truncation); ``head_tail`` its first ``head_tokens`` and last ``budget - head_tokens`` text tokens, ``budget``
    being ``max_length`` minus the special tokens; ``chunks`` windows of ``budget`` text tokens starting
    ``chunk_stride`` apart (:func:`window_starts`). The special tokens go where the tokenizer puts them
    (:class:`SpecialTokens`). Under ``chunks`` every text's value is a list of windows (one for a short text).
    """
    encodings = tokenizer(list(texts), truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids") if k in encodings]
    out: dict[str, list[Any]] = {k: list(encodings[k]) for k in keys}
    if long_text == "truncate":
        return out
    specials = tokenizer.num_special_tokens_to_add()
    budget = max_length - specials
    check_content_budget(budget, max_length, specials, head_tokens, chunk_stride)
    head = default_head_tokens(budget) if head_tokens is None else head_tokens
    stride = default_chunk_stride(budget) if chunk_stride is None else chunk_stride
    maybe_long = [i for i, ids in enumerate(out["input_ids"]) if len(ids) >= max_length]
    if not maybe_long:
        return {k: [[v] for v in values] for k, values in out.items()} if long_text == "chunks" else out
    text_ids = tokenizer([texts[i] for i in maybe_long], add_special_tokens=False, verbose=False)["input_ids"]
    long = {i: list(ids) for i, ids in zip(maybe_long, text_ids) if len(ids) > budget}
    if long_text == "chunks":
        out = {k: [[v] for v in values] for k, values in out.items()}
    layout: SpecialTokens | None = None
    for i, ids in long.items():
        truncated = {k: encodings[k][i] for k in keys}
        if layout is None or layout.wrap(ids[:budget]) != truncated:
            layout = SpecialTokens.read(truncated, ids[:budget], specials)
        if layout is None:
            raise DataError(
                f"the tokenizer's encoding of text {i + 1} is not its text tokens between special tokens, so "
                f"long_text={long_text!r} cannot place them; use long_text='truncate'"
            )
        if long_text == "head_tail":
            pieces = layout.wrap(head_tail_tokens(ids, budget, head))
            for k in keys:
                out[k][i] = pieces[k]
        else:
            windows = [layout.wrap(ids[s : s + budget]) for s in window_starts(len(ids), budget, stride, max_chunks)]
            for k in keys:
                out[k][i] = [w[k] for w in windows]
    return out
