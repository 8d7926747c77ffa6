"""Data sources: every shard format and text reads back what was written, the embedded corpus,
and the one-sentence errors for missing, empty, corrupt or unreadable data."""

import numpy as np
import pytest

from nanomoe import data
from nanomoe.data import data_format, default_tokenizer, open_dataset
from nanomoe.errors import DataError
from nanomoe.shard_formats import LLMC_MAGIC
from nanomoe.text_corpus import embedded_corpus
from nanomoe.tokenizer import ByteTokenizer, get_tokenizer

rng = np.random.default_rng(0)


def _tokens(n, hi=50257):
    return rng.integers(0, hi, size=n, dtype=np.uint16)


def _write_llmc(path, tokens, magic=LLMC_MAGIC, ntok=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, 1, len(tokens) if ntok is None else ntok
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, "<u2").tobytes())


def _concat(split):
    return np.concatenate([np.asarray(s) for s in split])


def test_npy_shards_read_back(tmp_path):
    val, tr1, tr2 = _tokens(100), _tokens(200), _tokens(150)
    np.save(tmp_path / "edufineweb_train_000002.npy", tr2)  # written out of order on purpose
    np.save(tmp_path / "edufineweb_val_000000.npy", val)
    np.save(tmp_path / "edufineweb_train_000001.npy", tr1)
    train = open_dataset(tmp_path, split="train")
    assert train.format == "npy" and len(train) == 2
    assert isinstance(train[0], np.memmap)  # memory-mapped, not loaded
    np.testing.assert_array_equal(train[0], tr1)
    np.testing.assert_array_equal(train[1], tr2)
    np.testing.assert_array_equal(_concat(open_dataset(tmp_path, split="val")), val)
    assert data_format(str(tmp_path)) == "npy" and default_tokenizer(str(tmp_path)) == "gpt2"


def test_nanogpt_bin_reads_back(tmp_path):
    train, val = _tokens(300), _tokens(60)
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    (tmp_path / "meta.pkl").write_bytes(b"ignored")
    got = open_dataset(str(tmp_path), split="train")
    assert got.format == "nanogpt"
    np.testing.assert_array_equal(_concat(got), train)
    np.testing.assert_array_equal(_concat(open_dataset(str(tmp_path), split="val")), val)


def test_llmc_bin_reads_back(tmp_path):
    shards = {"fineweb_val_000000.bin": _tokens(80), "fineweb_train_000001.bin": _tokens(90),
              "fineweb_train_000002.bin": _tokens(70)}
    for name, toks in shards.items():
        _write_llmc(tmp_path / name, toks)
    train = open_dataset(str(tmp_path), split="train")
    assert train.format == "llmc" and len(train) == 2
    np.testing.assert_array_equal(train[0], shards["fineweb_train_000001.bin"])
    np.testing.assert_array_equal(train[1], shards["fineweb_train_000002.bin"])
    np.testing.assert_array_equal(_concat(open_dataset(str(tmp_path), split="val")),
                                  shards["fineweb_val_000000.bin"])
    # modded-nanogpt's glob patterns are not expanded: its folder is what to give
    with pytest.raises(DataError, match="not expanded as patterns"):
        open_dataset(str(tmp_path / "fineweb_train_*.bin"), split="train")


def test_a_path_with_pattern_characters_is_read_as_written(tmp_path):
    """--data 'book[1].txt' reads that file, never book1.txt, which the pattern matches."""
    (tmp_path / "book1.txt").write_text("wrong " * 200)
    (tmp_path / "book[1].txt").write_text("right " * 200)
    tokens = _concat(open_dataset(str(tmp_path / "book[1].txt"), "byte", "train"))
    assert bytes(tokens[:6].astype(np.uint8)) == b"right "


def test_text_file_and_folder_with_byte_tokenizer(tmp_path):
    text = "héllo wörld\n" * 500
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    raw = np.frombuffer(text.encode(), np.uint8)
    train = open_dataset(str(tmp_path / "a.txt"), "byte", "train")
    val = open_dataset(str(tmp_path / "a.txt"), ByteTokenizer(), "val")
    assert train.format == "text"
    cut = int(len(raw) * 0.9)  # the first 90% is train, the last 10% val
    np.testing.assert_array_equal(_concat(train), raw[:cut])
    np.testing.assert_array_equal(_concat(val), raw[cut:])
    assert default_tokenizer(str(tmp_path / "a.txt")) == "byte"

    (tmp_path / "b.txt").write_text("second file", encoding="utf-8")
    both = np.concatenate([_concat(open_dataset(str(tmp_path), None, s)) for s in ("train", "val")])
    np.testing.assert_array_equal(both, np.frombuffer((text + "second file").encode(), np.uint8))


def test_text_with_a_tokenizer_json(tmp_path):
    import tokenizers
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "a": 2, "b": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    jt = get_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (jt.vocab_size, jt.eot, jt.name) == (4, 0, str(tmp_path / "tokenizer.json"))
    assert jt.encode("a b c") == [2, 3, 1]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "1.txt").write_text("a b " * 10)
    (tmp_path / "docs" / "2.txt").write_text("b a " * 10)
    tokens = np.concatenate([_concat(open_dataset(str(tmp_path / "docs"), jt, s))
                             for s in ("train", "val")])
    np.testing.assert_array_equal(tokens, [2, 3] * 10 + [0] + [3, 2] * 10)  # joined by eot


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        open_dataset(str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("x")
    with pytest.raises(DataError, match="no recognised data files.*notes.md"):
        open_dataset(str(tmp_path / "other"))
    with pytest.raises(DataError, match="unknown split"):
        open_dataset(None, split="test")


def test_no_shard_for_the_split_names_what_was_found(tmp_path):
    np.save(tmp_path / "edufineweb_train_000001.npy", _tokens(100))
    with pytest.raises(DataError, match="no val shard.*edufineweb_train_000001.npy"):
        open_dataset(tmp_path, split="val")
    (tmp_path / "nano").mkdir()
    _tokens(100).tofile(tmp_path / "nano" / "train.bin")
    with pytest.raises(DataError, match="val.bin"):
        open_dataset(tmp_path / "nano", split="val")


def test_bad_llmc_files(tmp_path):
    _write_llmc(tmp_path / "fw_train_000001.bin", _tokens(50), magic=12345)
    with pytest.raises(DataError, match="magic 12345"):
        open_dataset(tmp_path)
    _write_llmc(tmp_path / "fw_train_000001.bin", _tokens(50), ntok=60)
    with pytest.raises(DataError, match="promises 60 tokens"):
        open_dataset(tmp_path)
    (tmp_path / "fw_train_000001.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="shorter than the header"):
        open_dataset(tmp_path)


def test_corrupt_npy_and_odd_bin(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "d_train_1.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="corrupt"):
        open_dataset(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="3 bytes"):
        open_dataset(tmp_path / "b")


def test_unreadable_file(tmp_path, monkeypatch):
    np.save(tmp_path / "d_train_1.npy", _tokens(10))

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data, "read_npy", denied)  # tests run as root: chmod would not stop us
    with pytest.raises(DataError, match="cannot read .*d_train_1.npy \\(Permission denied\\)"):
        open_dataset(tmp_path)


def test_embedded_corpus():
    text = embedded_corpus()
    assert len(text.encode()) > 2**20 and text == embedded_corpus()
    assert "ROMEO:" in text and len(embedded_corpus(1000).encode()) <= 1000
    train = open_dataset(None, split="train")
    val = open_dataset(None, "byte", "val")
    assert train.format == "embedded" and data_format(None) == "embedded"
    total = train.num_tokens + val.num_tokens
    assert train.num_tokens == int(0.9 * total) and val.num_tokens > 0
    ids = np.concatenate([_concat(train), _concat(val)])
    assert ids.max() < 256
    np.testing.assert_array_equal(ids, np.frombuffer(text.encode(), np.uint8))
