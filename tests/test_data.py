"""Data layer: every format reads back what was written, the original's batch order, errors."""

import sys

import numpy as np
import pytest

from nanomoe import data
from nanomoe.data import (LLMC_MAGIC, DataError, DataLoader, Prefetcher, check_token_range,
                          data_format, default_tokenizer, embedded_corpus, open_dataset)
from nanomoe.tokenizer import ByteTokenizer, TiktokenGPT2, TokenizerError, get_tokenizer

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


# ------------------------------------------------------------------------------- formats


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


# ------------------------------------------------------------------------------- batch order


def _starts(shards, B, T, rank, nproc, steps):
    """(shard, start) of each step's x window, read off the token values (shard i = i*1000+k)."""
    loader = DataLoader(shards, B, T, rank, nproc)
    out = []
    for _ in range(steps):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int32
        np.testing.assert_array_equal(x.reshape(-1)[1:], y.reshape(-1)[:-1])
        assert y.reshape(-1)[-1] == x.reshape(-1)[-1] + 1
        np.testing.assert_array_equal(np.diff(x.reshape(-1)), 1)  # one contiguous window
        out.append(divmod(int(x[0, 0]), 1000))
    return out


SHARDS = [np.arange(25, dtype=np.uint16), np.arange(1000, 1040, dtype=np.uint16)]


def test_batch_order_single_process_switches_shards_and_wraps():
    # B*T = 6: shard 0 (25 tokens) gives windows at 0, 6, 12, 18 (18 + 7 = 25 still fits),
    # shard 1 (40 tokens) at 0..30, then back to shard 0.
    expected = [(0, 0), (0, 6), (0, 12), (0, 18)] + [(1, s) for s in range(0, 31, 6)]
    assert _starts(SHARDS, 2, 3, 0, 1, 2 * len(expected)) == expected * 2


def test_batch_order_two_ranks():
    # Each rank starts at B*T*rank and strides B*T*2 = 12; it changes shard when its own next
    # window would not fit, so (as in the original) rank 1 changes shard one step early.
    rank0 = [(0, 0), (0, 12), (1, 0), (1, 12), (1, 24)]
    rank1 = [(0, 6), (1, 6), (1, 18)]
    got0 = _starts(SHARDS, 2, 3, 0, 2, 15)
    got1 = _starts(SHARDS, 2, 3, 1, 2, 15)
    assert got0 == rank0 * 3 and got1 == rank1 * 5
    for (s0, p0), (s1, p1) in zip(got0, got1):  # same step: never the same tokens
        assert s0 != s1 or abs(p0 - p1) >= 6


def _reference(shards, B, T, rank, nproc, steps):
    """The original's loader (docs/original.md, Training loop: its data.py#L25-L47), written
    out independently."""
    shard, pos, out = 0, B * T * rank, []
    for _ in range(steps):
        out.append(np.asarray(shards[shard][pos:pos + B * T + 1]))
        pos += B * T * nproc
        if pos + B * T * nproc + 1 > len(shards[shard]):
            shard, pos = (shard + 1) % len(shards), B * T * rank
    return out


@pytest.mark.parametrize("B,T,nproc", [(1, 1, 1), (2, 5, 1), (3, 4, 2), (1, 7, 3)])
def test_batch_order_matches_reference(B, T, nproc):
    shards = [_tokens(n) for n in (97, 64, 150)]
    for rank in range(nproc):
        loader = DataLoader(shards, B, T, rank, nproc)
        for buf in _reference(shards, B, T, rank, nproc, 60):
            x, y = loader.next_batch()
            np.testing.assert_array_equal(x, buf[:-1].reshape(B, T))
            np.testing.assert_array_equal(y, buf[1:].reshape(B, T))


def test_batches_are_int32_copies_not_views(tmp_path):
    np.save(tmp_path / "d_train_1.npy", np.arange(100, dtype=np.uint16))
    split = open_dataset(tmp_path, split="train")
    x, y = DataLoader(split, 2, 4).next_batch()
    assert not np.shares_memory(x, split[0]) and not np.shares_memory(x, y)
    x[:] = 0  # writable, and the memmap is untouched
    assert split[0][1] == 1 and y[0, 0] == 1


def test_state_dict_resumes_exactly():
    shards = [_tokens(97), _tokens(64)]
    loader = DataLoader(shards, 2, 5, 1, 2)
    for _ in range(7):
        loader.next_batch()
    state = loader.state_dict()
    assert set(state) == {"shard", "position"}
    expected = [loader.next_batch() for _ in range(10)]
    fresh = DataLoader(shards, 2, 5, 1, 2)
    fresh.load_state_dict(state)
    for x, y in expected:
        x2, y2 = fresh.next_batch()
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    fresh.reset()
    first = DataLoader(shards, 2, 5, 1, 2).next_batch()[0]
    np.testing.assert_array_equal(fresh.next_batch()[0], first)
    with pytest.raises(DataError, match="does not fit"):
        fresh.load_state_dict({"shard": 5, "position": 0})


# ------------------------------------------------------------------------------- errors


def test_shard_shorter_than_one_batch(tmp_path):
    np.save(tmp_path / "x_train_000001.npy", _tokens(1000))
    np.save(tmp_path / "x_train_000002.npy", _tokens(20))
    split = open_dataset(tmp_path, split="train")
    with pytest.raises(DataError) as e:
        DataLoader(split, 4, 8, 0, 2)
    msg = str(e.value)
    assert "x_train_000002.npy" in msg and "20 tokens" in msg and "65" in msg and "--B/--T" in msg


@pytest.mark.parametrize("kwargs", [dict(B=0), dict(T=-1), dict(B=1.5), dict(process_rank=2),
                                    dict(process_rank=-1), dict(num_processes=0)])
def test_loader_validates_arguments(kwargs):
    args = dict(B=1, T=4, process_rank=0, num_processes=2) | kwargs
    with pytest.raises(DataError):
        DataLoader([_tokens(100)], **args)


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


def test_token_ids_out_of_range():
    check_token_range(np.array([0, 255]), 256)
    with pytest.raises(DataError, match="token id 50300 in shard.npy is >= vocab_size 256"):
        check_token_range(np.array([1, 50300]), 256, "shard.npy")
    with pytest.raises(DataError, match="negative"):
        check_token_range(np.array([-1, 3]), 256)
    loader = DataLoader([np.array([1, 2, 3, 300, 4, 5, 6, 7, 8], np.uint16)], 1, 2,
                        vocab_size=256)
    loader.next_batch()
    with pytest.raises(DataError, match="token id 300 in shard 0 at position 2"):
        loader.next_batch()


# ------------------------------------------------------------------------------- embedded corpus


def test_embedded_corpus():
    text = embedded_corpus()
    assert len(text.encode()) > 2**20 and text == embedded_corpus()
    assert "def " in text and len(embedded_corpus(1000).encode()) <= 1000
    train = open_dataset(None, split="train")
    val = open_dataset(None, "byte", "val")
    assert train.format == "embedded" and data_format(None) == "embedded"
    total = train.num_tokens + val.num_tokens
    assert train.num_tokens == int(0.9 * total) and val.num_tokens > 0
    ids = np.concatenate([_concat(train), _concat(val)])
    assert ids.max() < 256
    np.testing.assert_array_equal(ids, np.frombuffer(text.encode(), np.uint8))


# ------------------------------------------------------------------------------- prefetching


def test_prefetcher_yields_the_loader_sequence_and_consumed_state():
    shards = [_tokens(97), _tokens(64), _tokens(150)]
    expected = DataLoader(shards, 2, 5, 1, 2)
    states = []
    with Prefetcher(DataLoader(shards, 2, 5, 1, 2), depth=3) as pf:
        assert pf.state_dict() == {"shard": 0, "position": 10}
        for _ in range(25):
            x, y = pf.next_batch()
            ex, ey = expected.next_batch()
            np.testing.assert_array_equal(x, ex)
            np.testing.assert_array_equal(y, ey)
            assert pf.state_dict() == expected.state_dict()  # not the read-ahead position
            states.append(pf.state_dict())
        # resume from the state after batch 10: the next batch is batch 11
        resumed = DataLoader(shards, 2, 5, 1, 2)
        resumed.load_state_dict(states[9])
        ref = DataLoader(shards, 2, 5, 1, 2)
        for _ in range(10):
            ref.next_batch()
        np.testing.assert_array_equal(resumed.next_batch()[0], ref.next_batch()[0])
        pf.load_state_dict(states[9])
        np.testing.assert_array_equal(pf.next_batch()[0],
                                      _reference(shards, 2, 5, 1, 2, 11)[10][:-1].reshape(2, 5))
    # closing rewinds the loader to what was consumed
    assert pf.loader.state_dict() == pf.state_dict()
    with pytest.raises(RuntimeError, match="closed"):
        pf.next_batch()


def test_prefetcher_raises_the_threads_error():
    bad = np.arange(0, 40, dtype=np.uint16)
    bad[20] = 999
    pf = Prefetcher(DataLoader([bad], 2, 4, vocab_size=256))
    pf.next_batch()
    pf.next_batch()
    with pytest.raises(DataError, match="token id 999"):
        pf.next_batch()
    assert pf.state_dict() == {"shard": 0, "position": 16}
    pf.close()


# ------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("byte")
    text = "naïve ☃ text\n"
    ids = tok.encode(text)
    assert (tok.name, tok.vocab_size, tok.eot) == ("byte", 256, None)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.decode(ids[:3]) == "na\ufffd"  # a split character becomes U+FFFD
    assert tok.decode(np.array(ids + [300])) == text  # padded-vocab ids are dropped


def test_unknown_tokenizer_names_the_choices():
    with pytest.raises(TokenizerError, match="byte.*gpt2"):
        get_tokenizer("sentencepiece")
    with pytest.raises(TokenizerError, match="does not exist"):
        get_tokenizer("missing/tokenizer.json")


def test_gpt2_without_tiktoken(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken -> ImportError
    with pytest.raises(TokenizerError, match="pip install tiktoken"):
        get_tokenizer("gpt2")


def test_gpt2_offline(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError, match="network.*--tokenizer byte"):
        TiktokenGPT2()


def test_gpt2_wrapper(monkeypatch):
    """Our wrapper around tiktoken (whose BPE files need a download): the GPT-2 encoding is
    asked for, documents are encoded with encode_ordinary (no special tokens parsed) and ids
    past the vocabulary (padding rows of the model) are dropped when decoding."""
    import tiktoken

    class FakeEncoding:
        def encode_ordinary(self, text):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    asked = []
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: asked.append(name) or FakeEncoding())
    tok = get_tokenizer("gpt2")
    assert asked == ["gpt2"] and tok.name == "gpt2"
    assert (tok.vocab_size, tok.eot) == (50257, 50256)
    assert tok.encode("Hi<|endoftext|>") == [ord(c) for c in "Hi<|endoftext|>"]
    assert tok.decode([72, 105, 50300]) == "Hi"
