"""How many tokens a Hugging Face text model can read, found offline from its folder (no weights loaded).

A ``max_length`` above this limit is accepted by the tokenizer but fails inside the model at the first text
that long, mid-run; datamodules look the limit up when they learn their tokenizer and refuse such a value.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# model types whose position ids start after the padding index (``padding_idx + 1``, RoBERTa's scheme), so
# ``max_position_embeddings`` (514 for roberta-base) holds ``pad_token_id + 1`` more rows than tokens (512)
PADDING_OFFSET_MODEL_TYPES = frozenset(
    {
        "camembert",
        "data2vec-text",
        "esm",
        "ibert",
        "layoutlmv3",
        "lilt",
        "longformer",
        "luke",
        "markuplm",
        "mpnet",
        "roberta",
        "roberta-prelayernorm",
        "xlm-roberta",
        "xlm-roberta-xl",
        "xmod",
    }
)
# tokenizers that know no limit store a huge sentinel (transformers' VERY_LARGE_INTEGER, int(1e30))
NO_TOKENIZER_LIMIT = 10**12


def position_limit(source: str | Path) -> int | None:
    """The most tokens (special tokens included) the model at ``source`` (a folder or a cached hub id) reads.

    From its config: ``max_position_embeddings`` (``n_positions`` and other names through ``AutoConfig``'s
    attribute map), less RoBERTa's padding offset; else the tokenizer's ``model_max_length`` when it is a
    real number. ``None`` when neither says (the files are not there, or the model has no absolute positions
    and its tokenizer names no limit). Reads only JSON files, never the network.
    """
    config = _config(source)
    limit = None if config is None else config_position_limit(config)
    return limit if limit is not None else _tokenizer_limit(source)


def config_position_limit(config: Any) -> int | None:
    """Tokens a model of ``config`` (a ``PretrainedConfig``, or any object with its attributes) can read."""
    if getattr(config, "position_biased_input", True) is False:  # DeBERTa-v3: relative positions only
        return None
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or isinstance(positions, bool) or positions <= 0:
        return None
    if getattr(config, "model_type", None) in PADDING_OFFSET_MODEL_TYPES:
        pad = getattr(config, "pad_token_id", None)
        positions -= (pad if isinstance(pad, int) else 1) + 1
    return positions if positions > 0 else None


def _config(source: str | Path) -> Any:
    """The model's config from ``config.json``: through ``AutoConfig`` (defaults and attribute names filled
    in), else the plain JSON (a model type this transformers does not know, or one that needs remote code)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError, KeyError):
        raw = _json_file(source, "config.json")
        return None if raw is None else SimpleNamespace(**raw)


def _tokenizer_limit(source: str | Path) -> int | None:
    raw = _json_file(source, "tokenizer_config.json") or {}
    limit = raw.get("model_max_length")
    if isinstance(limit, (int, float)) and not isinstance(limit, bool) and 0 < limit < NO_TOKENIZER_LIMIT:
        return int(limit)
    return None


def _json_file(source: str | Path, name: str) -> dict[str, Any] | None:
    """``name`` of a model folder or of a hub id already in the local cache, as a dict; ``None`` if absent."""
    path = Path(source) / name
    if not path.is_file():
        from transformers.utils import cached_file

        try:
            found = cached_file(str(source), name, local_files_only=True, _raise_exceptions_for_missing_entries=False)
        except (OSError, ValueError):
            return None
        if found is None:
            return None
        path = Path(found)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
