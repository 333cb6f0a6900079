"""Caption text: tokenisation and the vocabulary, the same rules at training and at evaluation.

Words are lowercase runs of letters and digits: "A red Star." and "a red star" are one caption to the model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0..3: padding is 0, as the exported decoder expects
_APOSTROPHES = re.compile(r"['\u2019]")  # "don't" -> "dont", not "don t"
_PUNCTUATION = re.compile(r"[^\w\s]|_")


def tokenize(text: str) -> list[str]:
    """Lowercase, punctuation removed (apostrophes joined, everything else a word break), split on whitespace."""
    return _PUNCTUATION.sub(" ", _APOSTROPHES.sub("", text.lower())).split()


def build_vocab(captions: Iterable[str], min_count: int = 2) -> tuple[str, ...]:
    """Specials first, then every word seen at least ``min_count`` times, most frequent first (ties
    alphabetical), so the same captions give the same token ids on every machine. Rarer words become ``<unk>``."""
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    counts = Counter(word for caption in captions for word in tokenize(caption))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return SPECIALS + tuple(words)


def encode(caption: str, index: Mapping[str, int]) -> list[int]:
    """``<bos>`` + token ids + ``<eos>``; words outside the vocabulary become ``<unk>``.
    ``index`` is ``{word: id}`` (``{w: i for i, w in enumerate(vocab)}``), built once rather than per caption."""
    unk = index[UNK]
    return [index[BOS], *(index.get(w, unk) for w in tokenize(caption)), index[EOS]]
