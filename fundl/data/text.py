"""Character-level text: a corpus, its vocabulary, and next-character windows.

The vocabulary is the sorted set of characters in the corpus (65 symbols for
Tiny Shakespeare), so ids are stable for a given text. Windows are the usual
char-RNN training pairs: ``y`` is ``x`` shifted one character to the left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from fundl.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Maps characters to int32 ids (their rank in ``chars``) and back.

    Examples:
        >>> from fundl.data import Vocabulary
        >>> vocab = Vocabulary.from_text("hello")
        >>> vocab.chars, vocab.size, vocab.encode("hole"), vocab.decode([3, 1])
        ('ehlo', 4, array([1, 3, 2, 0], dtype=int32), 'oh')
    """

    chars: str

    @classmethod
    def from_text(cls, text: str) -> "Vocabulary":
        """The sorted distinct characters of ``text``."""
        return cls("".join(sorted(set(text))))

    def __post_init__(self):
        if not self.chars:
            raise ValueError("vocabulary: expected at least one character, got none")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError(f"vocabulary: expected distinct characters, got duplicates in {self.chars!r}")

    @property
    def size(self) -> int:
        """The number of characters (the language model's number of classes)."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of ``text``; a character outside the vocabulary is an error naming it."""
        lut = np.full(max(map(ord, self.chars)) + 1, -1, np.int32)
        lut[[ord(c) for c in self.chars]] = np.arange(self.size, dtype=np.int32)
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        ids = np.where(codes < lut.size, lut[np.minimum(codes, lut.size - 1)], -1).astype(np.int32)
        if (bad := np.flatnonzero(ids < 0)).size:
            i = int(bad[0])
            raise ValueError(f"vocabulary: character {text[i]!r} at position {i} is not in the {self.size}-symbol vocabulary")
        return ids

    def decode(self, ids) -> str:
        """The text for a sequence of ids; ids outside ``[0, size)`` are an error."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"vocabulary: expected ids in [0, {self.size}), got range [{ids.min()}, {ids.max()}]")
        return "".join(self.chars[i] for i in ids.tolist())


@dataclasses.dataclass(frozen=True)
class CharCorpus:
    """A text and its vocabulary; ``source`` names where it came from for error messages.

    Examples:
        >>> from fundl.data import CharCorpus, windows
        >>> corpus = CharCorpus.from_text("to be or not to be")
        >>> train_ids, val_ids = corpus.split(val_fraction=0.25)
        >>> x, y = windows(train_ids, seq_len=4)           # next-character pairs
        >>> corpus.vocab.size, len(train_ids), x.shape, corpus.vocab.decode(x[0]), corpus.vocab.decode(y[0])
        (7, 14, (3, 4), 'to b', 'o be')
    """

    text: str
    vocab: Vocabulary
    source: str = "<string>"

    @classmethod
    def from_text(cls, text: str, source: str = "<string>") -> "CharCorpus":
        """The corpus of ``text``, with the vocabulary of its characters."""
        if not text:
            raise DataError(f"{source}: expected a non-empty text corpus, got 0 characters")
        return cls(text, Vocabulary.from_text(text), source)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, encoding: str = "utf-8",
                  sha256: str | None = None) -> "CharCorpus":
        """Read a corpus; ``sha256`` (of the file's bytes) is verified when given."""
        path = Path(path)
        raw = path.read_bytes()
        if sha256 is not None and (got := hashlib.sha256(raw).hexdigest()) != sha256:
            raise DataError(f"{path}: checksum mismatch: expected sha256 {sha256}, got {got}")
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: expected {encoding} text, got undecodable bytes: {e}") from None
        return cls.from_text(text, str(path))

    def encode(self) -> np.ndarray:
        """The whole text as int32 ids, shape ``(len(text),)``."""
        return self.vocab.encode(self.text)

    def split(self, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        """(train ids, validation ids): the first ``1 - val_fraction`` of the text, then the rest.

        A contiguous split, so no validation window overlaps training text.
        """
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"{self.source}: expected 0 <= val_fraction < 1, got {val_fraction}")
        ids = self.encode()
        cut = len(ids) - int(round(len(ids) * val_fraction))
        return ids[:cut], ids[cut:]


def windows(ids: np.ndarray, seq_len: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Next-character pairs ``(x, y)``, each ``(N, seq_len)`` int32, with ``y[i, t] == ids[s_i + t + 1]``.

    Window ``i`` starts at ``s_i = i * stride`` (default ``stride = seq_len``: no
    overlap). A sequence too short for one window is an error.

    Examples:
        >>> from fundl.data import windows
        >>> x, y = windows(np.arange(10), seq_len=4)
        >>> x, y
        (array([[0, 1, 2, 3],
               [4, 5, 6, 7]], dtype=int32), array([[1, 2, 3, 4],
               [5, 6, 7, 8]], dtype=int32))
    """
    ids = np.asarray(ids, dtype=np.int32).reshape(-1)
    stride = seq_len if stride is None else stride
    if seq_len < 1 or stride < 1:
        raise ValueError(f"windows: expected seq_len >= 1 and stride >= 1, got seq_len={seq_len}, stride={stride}")
    if len(ids) < seq_len + 1:
        raise ValueError(f"windows: expected at least seq_len + 1 = {seq_len + 1} ids, got {len(ids)}")
    n = (len(ids) - seq_len - 1) // stride + 1
    view = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)[: (n - 1) * stride + 1: stride]
    return np.ascontiguousarray(view[:, :-1]), np.ascontiguousarray(view[:, 1:])
