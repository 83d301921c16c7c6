"""The label value that means "no label"."""

from __future__ import annotations

IGNORE_INDEX = -100
"""The label of a sample or token that has none: cross-entropy's ``ignore_index``. Such a position is neither
trained on nor scored. It marks a missing multiclass label, a token that is not the first sub-token of a word
(special tokens, later sub-tokens, padding), and every sample of an unlabelled (predict) set; token-level
batches say where words start in ``word_starts``, not through their labels."""
