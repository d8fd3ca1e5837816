"""CLIP text tokenizer for exported open_clip text towers, without torch.

Reproduces ``open_clip.tokenizer.SimpleTokenizer`` (and so ``open_clip.tokenize``) id for id:

* text cleaning in Python, exactly as open_clip does it: ``ftfy.fix_text``, ``html.unescape``
  twice, strip, whitespace runs collapsed to one space, then lower-casing (open_clip's default
  ``clean="lower"``; ``"whitespace"`` and ``"canonicalize"`` are also available);
* pre-tokenisation with open_clip's own ``regex`` pattern (case-insensitive, special tokens
  first), each piece mapped to GPT-2 style byte symbols;
* byte-level BPE with the ``</w>`` end-of-word suffix, done by the Rust ``tokenizers`` BPE model
  built from the merges in ``bpe_simple_vocab_16e6.txt.gz``;
* ``<start_of_text>`` + ids + ``<end_of_text>``, cut to ``context_length`` with the last id forced
  to ``<end_of_text>``, zero padded, as an ``int64`` array ``[N, context_length]``.

A piece that is literally ``<start_of_text>`` or ``<end_of_text>`` in the cleaned text maps to
the special id, as in open_clip.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import string
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import ftfy
import numpy as np
import numpy.typing as npt
import regex
from tokenizers.models import BPE

__all__ = ["ClipTokenizer", "VocabFileError", "default_vocab_path"]

SOT = "<start_of_text>"
EOT = "<end_of_text>"
DEFAULT_CONTEXT_LENGTH = 77
VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# open_clip keeps lines [1, 49152 - 256 - 2 + 1) of the file: 48,894 merges.
NUM_MERGES = 49152 - 256 - 2
_WORD_CACHE_LIMIT = 200_000
_CACHEABLE_WORD_CHARS = 64
_PATTERN = (
    regex.escape(SOT)
    + "|"
    + regex.escape(EOT)
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class VocabFileError(Exception):
    """The BPE vocabulary file is missing, unreadable or not a CLIP merges file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"CLIP BPE vocabulary file {self.path!r}: {reason}")


def default_vocab_path() -> Path | None:
    """open_clip's bundled vocabulary file, or ``None`` when open_clip is not installed.

    For tests and model export only; the server reads the copy inside each model folder.
    The package is located without importing it (importing open_clip imports torch).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / VOCAB_FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map from each byte value to a printable, non-space character."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _basic_clean(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _clean_whitespace(text: str) -> str:
    return " ".join(_basic_clean(text).split()).strip()


def _clean_lower(text: str) -> str:
    return _clean_whitespace(text).lower()


def _clean_canonicalize(text: str) -> str:
    text = _basic_clean(text).replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split()).strip()


CLEANERS: dict[str, Callable[[str], str]] = {
    "lower": _clean_lower,
    "whitespace": _clean_whitespace,
    "canonicalize": _clean_canonicalize,
}


def read_merges(path: str | Path) -> list[tuple[str, str]]:
    """The 48,894 BPE merges open_clip uses from ``path`` (a gzip text file)."""
    try:
        with gzip.open(path, "rb") as fh:
            lines = fh.read().decode("utf-8").split("\n")
    except FileNotFoundError as exc:
        raise VocabFileError(path, "file not found") from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise VocabFileError(path, f"cannot read gzip data ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise VocabFileError(path, f"not UTF-8 text ({exc})") from exc
    if len(lines) < NUM_MERGES + 1:
        raise VocabFileError(path, f"{len(lines) - 1} merge lines, expected at least {NUM_MERGES}")
    merges: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines[1 : NUM_MERGES + 1], start=2):
        parts = line.split()
        if len(parts) != 2:
            raise VocabFileError(path, f"line {lineno} is not a merge pair: {line!r}")
        merges.append((parts[0], parts[1]))
    _check_merge_order(path, merges)
    return merges


def _check_merge_order(path: str | Path, merges: Sequence[tuple[str, str]]) -> None:
    """Each merge may only use byte symbols or tokens made by earlier merges.

    open_clip merges every occurrence of the best pair per pass; ``tokenizers`` merges one
    occurrence at a time from a (rank, position) heap. The two give the same ids exactly when
    no merge can create a pair that outranks the merge that created it, which this ensures.
    """
    known = set(bytes_to_unicode().values())
    known |= {s + "</w>" for s in known}
    for rank, (first, second) in enumerate(merges):
        if first not in known or second not in known:
            pair = f"({first!r}, {second!r})"
            raise VocabFileError(path, f"merge {rank} {pair} uses a token no earlier merge makes")
        known.add(first + second)


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Token -> id exactly as open_clip builds it: bytes, bytes + ``</w>``, merges, specials."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [SOT, EOT]
    return {tok: i for i, tok in enumerate(tokens)}


class ClipTokenizer:
    """Text -> CLIP token ids, identical to ``open_clip.tokenize``.

    Args:
        vocab_path: the model folder's ``bpe_simple_vocab_16e6.txt.gz``.
        context_length: ids per text (the text tower's positional length, 77 for most models).
        clean: open_clip's cleaning mode; ``"lower"`` is its default and what
            ``open_clip.tokenize`` uses.

    Safe to call from several threads: the word cache is a plain dict (atomic updates under
    the GIL) and the BPE model is immutable Rust state.
    """

    def __init__(
        self,
        vocab_path: str | Path,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        *,
        clean: str = "lower",
    ) -> None:
        if isinstance(context_length, bool) or not isinstance(context_length, int):
            raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        if clean not in CLEANERS:
            raise ValueError(f"unknown clean mode {clean!r}; expected one of {sorted(CLEANERS)}")
        merges = read_merges(vocab_path)
        self.encoder = build_vocab(merges)
        try:
            self._bpe = BPE(self.encoder, merges, end_of_word_suffix="</w>")
        except Exception as exc:  # tokenizers raises a bare Exception for bad merges
            raise VocabFileError(vocab_path, f"merges do not form a BPE model ({exc})") from exc
        self.vocab_path = Path(vocab_path)
        self.context_length = context_length
        self.clean_mode = clean
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder[SOT]
        self.eot_token_id = self.encoder[EOT]
        self._clean = CLEANERS[clean]
        self._pattern = regex.compile(_PATTERN, regex.IGNORECASE)
        byte_map = bytes_to_unicode()
        # str.translate table taking latin-1 decoded bytes to CLIP's byte symbols.
        self._byte_table = {b: byte_map[b] for b in range(256)}
        self._cache: dict[str, tuple[int, ...]] = {
            SOT: (self.sot_token_id,),
            EOT: (self.eot_token_id,),
        }

    def clean_text(self, text: str) -> str:
        """The cleaned text open_clip hands to its pre-tokeniser."""
        return self._clean(text)

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            symbols = word.encode("utf-8").decode("latin-1").translate(self._byte_table)
            ids = tuple(tok.id for tok in self._bpe.tokenize(symbols))
            if len(word) <= _CACHEABLE_WORD_CHARS:
                if len(self._cache) >= _WORD_CACHE_LIMIT:
                    self._cache = {SOT: (self.sot_token_id,), EOT: (self.eot_token_id,)}
                self._cache[word] = ids
        return ids

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """BPE ids of ``text`` (no start/end tokens); stops once ``limit`` ids are known."""
        ids: list[int] = []
        for match in self._pattern.finditer(self._clean(text)):
            ids.extend(self._word_ids(match.group()))
            if limit is not None and len(ids) >= limit:
                break
        return ids

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> npt.NDArray[np.int64]:
        """Token ids ``[len(texts), context_length]`` (``[1, ...]`` for a single string)."""
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be str, got {type(text).__name__}")
        length = self.context_length if context_length is None else context_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"context_length must be an int >= 1, got {length!r}")
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            # Only the first length - 1 ids can survive truncation; stop the pre-tokeniser there.
            tokens = [self.sot_token_id, *self.encode(text, limit=length - 1), self.eot_token_id]
            if len(tokens) > length:
                tokens = tokens[:length]
                tokens[-1] = self.eot_token_id
            out[row, : len(tokens)] = tokens
        return out

    tokenize = __call__
