"""prepare: local text -> the original's shards, read back by open_dataset; bad input exits 2."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanomoe import prepare
from nanomoe.data import open_dataset

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["first document\n" * 30, "zweites Dokument ü\n" * 20, "third"]


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(DOCS[0], encoding="utf-8")
    with open(tmp_path / "in" / "b.jsonl", "w", encoding="utf-8") as f:
        for doc in DOCS[1:]:
            f.write(json.dumps({"text": doc, "id": 1}) + "\n")
    return tmp_path / "in"


def _all_tokens(out):
    return np.concatenate([np.concatenate(open_dataset(out, split=s)) for s in ("val", "train")])


def _expected_bytes():
    return np.frombuffer("".join(DOCS).encode(), np.uint8)


@pytest.mark.parametrize("workers", [1, 2])
def test_txt_and_jsonl_to_shards(inputs, tmp_path, workers):
    out = tmp_path / "out"
    rc = prepare.main([str(inputs / "a.txt"), str(inputs / "b.jsonl"), "--out", str(out),
                       "--tokenizer", "byte", "--shard_size", "200", "--prefix", "tiny",
                       "--workers", str(workers), "--quiet"])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    n = len(_expected_bytes())
    assert names[-1] == "tiny_val_000000.npy" and len(names) == -(-n // 200)
    assert names[0] == "tiny_train_000001.npy"
    val = np.load(out / "tiny_val_000000.npy")
    assert val.dtype == np.uint16 and len(val) == 200
    np.testing.assert_array_equal(_all_tokens(out), _expected_bytes())


def test_folder_input_and_bin_format(inputs, tmp_path):
    out = tmp_path / "bin"
    assert prepare.main([str(inputs), "--out", str(out), "--tokenizer", "byte", "--format",
                         "bin", "--shard_size", "100", "--workers", "1", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["train.bin", "val.bin"]
    assert open_dataset(out, split="val").format == "nanogpt"
    np.testing.assert_array_equal(_all_tokens(out), _expected_bytes())


class _EotTokenizer:
    """Bytes shifted by one, with id 0 as end-of-text; ``big`` makes an id out of range."""

    name, vocab_size, eot = "eot-bytes", 257, 0

    def __init__(self, big=False):
        self.big = big

    def encode(self, text):
        ids = [b + 1 for b in text.encode()]
        return ids + [70000] if self.big else ids


def test_documents_are_preceded_by_eot(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "get_tokenizer", lambda name: _EotTokenizer())
    out = tmp_path / "out"
    assert prepare.main([str(inputs), "--out", str(out), "--shard_size", "64", "--workers",
                         "1", "--quiet"]) == 0
    expected = np.concatenate([np.r_[0, np.frombuffer(d.encode(), np.uint8) + 1] for d in DOCS])
    np.testing.assert_array_equal(_all_tokens(out), expected)


def test_token_ids_out_of_range(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "get_tokenizer", lambda name: _EotTokenizer(big=True))
    rc = prepare.main([str(inputs), "--out", str(tmp_path / "out"), "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "token id 70000" in err and "Traceback" not in err


def test_refuses_non_empty_output_without_force(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    old = out / "old_train_000001.npy"
    np.save(old, np.arange(5, dtype=np.uint16))
    before = old.read_bytes()
    args = [str(inputs), "--out", str(out), "--tokenizer", "byte", "--workers", "1", "--quiet",
            "--shard_size", "300"]
    assert prepare.main(args) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == [old.name] and old.read_bytes() == before
    # --force replaces the old shards, which would otherwise mix into the new data
    assert prepare.main(args + ["--force"]) == 0
    assert not old.exists()
    np.testing.assert_array_equal(_all_tokens(out), _expected_bytes())


@pytest.mark.parametrize("setup,args,message", [
    (None, ["missing.txt"], "does not exist"),
    ("notes.md", ["notes.md"], "not a .txt/.jsonl/.parquet file"),
    ("bad.jsonl", ["bad.jsonl"], "bad.jsonl:2 is not a JSON object"),
    ("empty.txt", ["empty.txt"], "no text"),
])
def test_bad_input_exits_2(tmp_path, capsys, monkeypatch, setup, args, message):
    monkeypatch.chdir(tmp_path)
    if setup == "bad.jsonl":
        Path(setup).write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    elif setup:
        Path(setup).write_text("x" if setup == "notes.md" else "")
    rc = prepare.main(args + ["--out", "out", "--tokenizer", "byte", "--workers", "1",
                              "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_fineweb_without_datasets(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    rc = prepare.main(["--fineweb", "--out", str(tmp_path / "fw"), "--tokenizer", "byte"])
    assert rc == 2 and "pip install datasets" in capsys.readouterr().err
    assert not (tmp_path / "fw").exists()


def test_cli_subprocess(inputs, tmp_path):
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "nanomoe.prepare", str(inputs), "--out", str(out),
                          "--tokenizer", "byte", "--shard_size", "500", "--workers", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    np.testing.assert_array_equal(_all_tokens(out), _expected_bytes())
    bad = subprocess.run([sys.executable, "-m", "nanomoe.prepare", str(inputs), "--out", str(out),
                          "--tokenizer", "byte"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("prepare: error:")
