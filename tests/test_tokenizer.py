"""server.tokenizer.ClipTokenizer against open_clip.tokenize, plus errors and isolation."""

from __future__ import annotations

import gzip
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.tokenizer import (
    NUM_MERGES,
    ClipTokenizer,
    VocabFileError,
    bytes_to_unicode,
    default_vocab_path,
)

ROOT = Path(__file__).resolve().parents[1]

# fmt: off
WORDS = "a photo of the cat dog tabby golden retriever airplane Zebra NASA iPhone xylophone".split()
WORDS += "don't it's they're we've I'm you'll he'd O'Neil rock'n'roll e-mail U.S.A.".split()
PUNCT = [*"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "...", "?!", "--", "''", "**", "«»", "“”"]
UNICODE = [
    "café", "naïve", "Ångström", "ñandú", "façade", "Straße", "ǅemal", "İstanbul", "ſtrong",
    "cafe\u0301", "n\u0303", "a\u0308\u0304", "Z\u0336a\u0337l\u0338g\u0335o",
    "東京タワー", "猫と犬", "中文字符", "한국어", "Привет", "МИР", "ёлка", "مرحبا", "العربية",
    "שלום", "हिन्दी", "ภาษาไทย", "Ελληνικά", "ΣΊΣΥΦΟΣ", "\u212a\u212b", "ﬁne ﬂour", "①②③",
    "٣٤٥", "१२३", "Ⅻ", "½", "²³", "\u200b\u200czero\u200dwidth", "\ufeffbom", "\u00adsoft",
]
EMOJI = [
    "😀", "🐈", "👍🏽", "👋🏿", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "❤️", "🇯🇵", "🇺🇸🇬🇧",
    "🧑🏻\u200d💻", "✌🏾", "1️⃣", "©️", "🫠", "👩\u200d❤️\u200d💋\u200d👨",
]
ENTITIES = ["&amp;", "&#39;", "&lt;b&gt;", "&quot;hi&quot;", "&nbsp;", "&amp;amp;", "&#x1F600;",
            "&eacute;", "&copy;", "&#8217;", "&hellip;", "&bogus;", "& amp;", "&amp"]
MOJIBAKE_SRC = ["café", "naïve façade", "“quoted”", "it’s", "déjà vu", "Ünïcödé", "—dash—"]
MOJIBAKE = [s.encode("utf-8").decode("cp1252", errors="replace") for s in MOJIBAKE_SRC]
MOJIBAKE += [s.encode("utf-8").decode("latin-1") for s in MOJIBAKE_SRC]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "   \t\n ", "\u00a0", "\u3000", "\u2028", "\x0b", "\x1c"]
SPECIAL = ["<start_of_text>", "<END_OF_TEXT>", "<end_of_text>x", "<ſtart_of_text>"]
FIXED = [
    "", " ", "     ", "\t\n\r ", "\n\n\n", "a photo of a cat.", "A PHOTO OF A CAT.",
    "x" * 500, "supercalifragilisticexpialidocious " * 20, "1234567890" * 10, "!!!???...",
    "a\ud800b", "\udcff", "<start_of_text><end_of_text>", "'s's's", "IT'S THEY'RE",
]


def _piece(rng: random.Random) -> str:
    pool = rng.choice([WORDS, WORDS, PUNCT, UNICODE, EMOJI, ENTITIES, MOJIBAKE, SPECIAL])
    piece = rng.choice(pool)
    roll = rng.random()
    if roll < 0.15:
        piece = piece.upper()
    elif roll < 0.3:
        piece = "".join(c.upper() if rng.random() < 0.5 else c for c in piece)
    elif roll < 0.4:
        piece = str(rng.randrange(10 ** rng.randrange(1, 8)))
    elif roll < 0.45:
        piece = "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(1, 6)))
    return piece


def make_texts(n: int = 1200, seed: int = 20240607) -> list[str]:
    """``n`` distinct, deterministic, varied test strings (pools above); every 10th is long."""
    rng = random.Random(seed)
    texts = list(FIXED)
    while len(texts) < n:
        count = rng.randrange(60, 140) if len(texts) % 10 == 0 else rng.randrange(1, 12)
        parts = []
        for _ in range(count):
            parts.append(_piece(rng))
            parts.append(rng.choice([" ", " ", " ", "", rng.choice(SPACES)]))
        if rng.random() < 0.2:
            parts.insert(0, rng.choice(SPACES))
        text = "".join(parts)
        if text not in texts:
            texts.append(text)
    return texts


TEXTS = make_texts()


@pytest.fixture(scope="module")
def open_clip():  # type: ignore[no-untyped-def]
    return pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def real_vocab() -> Path:
    path = default_vocab_path()
    if path is None:
        pytest.skip("open_clip (and its bundled vocabulary) is not installed")
    return path


@pytest.fixture(scope="module")
def tok(real_vocab: Path) -> ClipTokenizer:
    return ClipTokenizer(real_vocab)


@pytest.fixture(scope="module")
def synthetic_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A well-formed merges file with made-up merges: needs neither open_clip nor the real file."""
    symbols = list(bytes_to_unicode().values())
    ends = symbols + [s + "</w>" for s in symbols]
    merges = [f"{a} {b}" for a in symbols for b in ends][:NUM_MERGES]
    path = tmp_path_factory.mktemp("vocab") / "bpe_simple_vocab_16e6.txt.gz"
    path.write_bytes(gzip.compress("\n".join(["#version: 0.2", *merges, ""]).encode("utf-8")))
    return path


def _assert_same(ours: np.ndarray, theirs: np.ndarray, texts: list[str]) -> None:
    assert ours.dtype == np.int64
    assert ours.shape == theirs.shape
    bad = np.flatnonzero((ours != theirs).any(axis=1))
    if bad.size:
        i = int(bad[0])
        pytest.fail(f"{bad.size} rows differ; first text {texts[i]!r}:\n{ours[i]}\n{theirs[i]}")


def test_corpus_is_varied() -> None:
    assert len(TEXTS) >= 1000
    assert len(set(TEXTS)) == len(TEXTS)
    assert "" in TEXTS and " " in TEXTS


def test_matches_open_clip_tokenize(tok: ClipTokenizer, open_clip) -> None:  # type: ignore[no-untyped-def]
    theirs = open_clip.tokenize(TEXTS).numpy()
    _assert_same(tok(TEXTS), theirs, TEXTS)
    assert (theirs[:, -1] == tok.eot_token_id).sum() > 50, "corpus should exercise truncation"


@pytest.mark.parametrize("context_length", [32, 5, 2, 1])
def test_matches_open_clip_other_context_length(  # type: ignore[no-untyped-def]
    real_vocab: Path, open_clip, context_length: int
) -> None:
    theirs = open_clip.tokenize(TEXTS, context_length=context_length).numpy()
    ours = ClipTokenizer(real_vocab, context_length=context_length)
    _assert_same(ours(TEXTS), theirs, TEXTS)
    _assert_same(ClipTokenizer(real_vocab)(TEXTS, context_length), theirs, TEXTS)


def test_encode_matches_open_clip(tok: ClipTokenizer, open_clip) -> None:  # type: ignore[no-untyped-def]
    reference = open_clip.tokenizer._tokenizer
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text), text
        assert tok.clean_text(text) == reference.clean_fn(text), text


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize"])
def test_other_clean_modes_match(real_vocab: Path, open_clip, clean: str) -> None:  # type: ignore[no-untyped-def]
    texts = TEXTS[:300]
    theirs = open_clip.tokenizer.SimpleTokenizer(clean=clean)(texts).numpy()
    _assert_same(ClipTokenizer(real_vocab, clean=clean)(texts), theirs, texts)


def test_vocab_matches_open_clip(tok: ClipTokenizer, open_clip) -> None:  # type: ignore[no-untyped-def]
    reference = open_clip.tokenizer._tokenizer
    assert tok.encoder == reference.encoder
    assert tok.vocab_size == 49408
    assert (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)


def test_layout_and_cache(synthetic_vocab: Path) -> None:
    t = ClipTokenizer(synthetic_vocab, context_length=8)
    one = t("hi")
    assert one.shape == (1, 8) and one.dtype == np.int64
    assert one[0, 0] == t.sot_token_id and t.eot_token_id in one[0]
    empty = t(["", "   \t\n"])
    assert empty.tolist() == [[t.sot_token_id, t.eot_token_id] + [0] * 6] * 2
    long = t(["word " * 50])
    assert long[0, 0] == t.sot_token_id and long[0, -1] == t.eot_token_id and (long[0] != 0).all()
    assert t([]).shape == (0, 8)
    assert (t(["hello hello world"] * 3) == t("hello hello world")).all()
    assert t.vocab_path == synthetic_vocab


def test_missing_vocab_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(VocabFileError, match="nope.txt.gz") as info:
        ClipTokenizer(missing)
    assert info.value.path == str(missing)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not gzip at all", "gzip"),
        (gzip.compress(b"\xff\xfe\x00bad"), "UTF-8"),
        (gzip.compress(b"#version: 0.2\na b\n"), "expected at least"),
        (gzip.compress(b"#version\n" + b"a b c\n" * (NUM_MERGES + 1)), "line 2"),
        (gzip.compress(b"#version\n" + "\u4e00 \u4e01\n".encode() * (NUM_MERGES + 1)), "earlier"),
    ],
)
def test_corrupt_vocab_file(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.txt.gz"
    path.write_bytes(content)
    with pytest.raises(VocabFileError, match=reason) as info:
        ClipTokenizer(path)
    assert str(path) in str(info.value)


def test_out_of_order_merges(tmp_path: Path, synthetic_vocab: Path) -> None:
    lines = gzip.decompress(synthetic_vocab.read_bytes()).decode("utf-8").split("\n")
    assert "x y" in lines[1 : NUM_MERGES + 1]
    lines[1] = "xy z"  # "xy" is only made by a later merge
    path = tmp_path / "order.txt.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode("utf-8")))
    with pytest.raises(VocabFileError, match="merge 0 .* no earlier merge"):
        ClipTokenizer(path)


def test_truncated_gzip(tmp_path: Path, synthetic_vocab: Path) -> None:
    path = tmp_path / "cut.txt.gz"
    path.write_bytes(synthetic_vocab.read_bytes()[:5000])
    with pytest.raises(VocabFileError, match="cut.txt.gz"):
        ClipTokenizer(path)


def test_bad_inputs(synthetic_vocab: Path) -> None:
    t = ClipTokenizer(synthetic_vocab)
    with pytest.raises(TypeError, match=r"texts\[2\].*int"):
        t(["a", "b", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"texts\[0\].*bytes"):
        t([b"a"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="sequence of str"):
        t(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="context_length"):
        t("a", context_length=0)
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(synthetic_vocab, context_length=0)
    with pytest.raises(TypeError, match="context_length"):
        ClipTokenizer(synthetic_vocab, context_length=7.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clean mode"):
        ClipTokenizer(synthetic_vocab, clean="upper")


def test_import_does_not_pull_torch() -> None:
    code = (
        "import server.tokenizer, server.prompts, sys; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'open_clip' not in sys.modules, 'open_clip imported'; "
        "server.tokenizer.default_vocab_path(); "
        "assert 'torch' not in sys.modules, 'torch imported by default_vocab_path'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
