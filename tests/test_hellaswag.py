"""HellaSwag scoring: rendering, the acc_norm pick, evaluate() and offline errors (no network)."""

import urllib.error
from pathlib import Path

import numpy as np
import pytest

from nanomoe import hellaswag as hs
from nanomoe.errors import NanoMoeError
from nanomoe.tokenizer import get_tokenizer

TINY = Path(__file__).parent / "data" / "hellaswag_tiny.jsonl"
V = 256


def _example(ctx="The cat", endings=("sat.", "ran away fast.", "slept.", "ate fish.")):
    return {"ctx": ctx, "endings": list(endings), "label": 1}


def _logits_for(tokens, probs):
    """Logits (log-probabilities) that give each row's next token the probability probs[row];
    the rest of the mass is spread evenly over the other ids."""
    B, T = tokens.shape
    logits = np.empty((B, T, V))
    for b in range(B):
        p = probs[b]
        logits[b] = np.log((1 - p) / (V - 1))
        logits[b, np.arange(T - 1), tokens[b, 1:]] = np.log(p)
    return logits


def test_iterate_examples_reads_the_tiny_file():
    exs = list(hs.iterate_examples(TINY))
    assert len(exs) == 4 and [e["label"] for e in exs] == [0, 2, 1, 3]
    assert all(len(e["endings"]) == 4 for e in exs)
    assert len(list(hs.iterate_examples(TINY, limit=2))) == 2


def test_iterate_examples_names_a_bad_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(TINY.read_text().splitlines()[0] + "\n{\"ctx\": \"x\"}\n")
    with pytest.raises(hs.HellaSwagError, match="line 2"):
        list(hs.iterate_examples(bad))


def test_render_example_shapes_masks_and_padding():
    tok = get_tokenizer("byte")
    ex = _example()
    tokens, mask, label = hs.render_example(ex, tok, max_len=1024)
    ctx = list(b"The cat")
    ends = [list((" " + e).encode()) for e in ex["endings"]]
    T = len(ctx) + max(len(e) for e in ends)
    assert label == 1
    assert tokens.shape == mask.shape == (4, T)
    assert tokens.dtype == mask.dtype == np.int32
    for i, end in enumerate(ends):
        n = len(ctx) + len(end)
        assert tokens[i, :n].tolist() == ctx + end
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (T - n)
        assert not tokens[i, n:].any()  # padded with 0


def test_render_example_truncates_context_from_the_left_keeping_the_ending():
    tok = get_tokenizer("byte")
    ex = _example(ctx="0123456789", endings=("ab", "abcdef", "a", "abc"))
    tokens, mask, _ = hs.render_example(ex, tok, max_len=8)
    assert tokens.shape == (4, 8)
    # Row 1: " abcdef" is 7 tokens, so only the last context token "9" is kept.
    assert bytes(tokens[1].tolist()) == b"9 abcdef"
    assert mask[1].tolist() == [0] + [1] * 7
    # Row 0 fits 5 context tokens: the tail of the context.
    assert bytes(tokens[0, :8].tolist()) == b"56789 ab"
    with pytest.raises(hs.HellaSwagError, match="block"):
        hs.render_example(ex, tok, max_len=7)  # " abcdef" leaves no room for context


def test_pick_ending_picks_the_row_the_logits_favour():
    tokens, mask, _ = hs.render_example(_example(), get_tokenizer("byte"), 64)
    for want in range(4):
        probs = [0.9 if b == want else 0.1 for b in range(4)]
        assert hs.pick_ending(_logits_for(tokens, probs), tokens, mask) == want


def test_pick_ending_uses_the_mean_loss_not_the_sum():
    tokens = np.array([[7, 1, 0, 0, 0], [7, 1, 2, 3, 4], [7, 1, 0, 0, 0], [7, 1, 0, 0, 0]],
                      dtype=np.int32)
    mask = np.array([[0, 1, 0, 0, 0], [0, 1, 1, 1, 1], [0, 1, 0, 0, 0], [0, 1, 0, 0, 0]],
                    dtype=np.int32)
    # Row 0: one ending token, loss 1.0 (total 1.0). Row 1: four tokens at 0.5 (total 2.0,
    # mean 0.5). Rows 2, 3: one token at loss 3.0. The sum would pick row 0; the mean picks 1.
    probs = np.exp(-np.array([1.0, 0.5, 3.0, 3.0]))
    logits = _logits_for(tokens, probs).astype(np.float32)
    losses = hs.ending_losses(logits, tokens, mask)
    np.testing.assert_allclose(losses, [1.0, 0.5, 3.0, 3.0], rtol=1e-5)
    assert hs.pick_ending(logits, tokens, mask) == 1


def test_pick_ending_is_stable_for_huge_logits():
    tokens, mask, _ = hs.render_example(_example(), get_tokenizer("byte"), 64)
    logits = _logits_for(tokens, [0.1, 0.1, 0.9, 0.1]) + 1e4  # naive exp() would overflow
    assert hs.pick_ending(logits.astype(np.float32), tokens, mask) == 2


def test_evaluate_with_an_oracle_and_with_uniform_logits():
    tok = get_tokenizer("byte")
    labels = iter([ex["label"] for ex in hs.iterate_examples(TINY)])
    calls = []

    def oracle(tokens):
        calls.append(tokens.shape)
        assert tokens.dtype == np.int32 and tokens.shape[0] == 4
        right = next(labels)
        return _logits_for(tokens, [0.9 if b == right else 0.01 for b in range(4)])

    assert hs.evaluate(oracle, TINY, tok, max_len=1024) == {"acc_norm": 1.0, "n": 4}
    assert len(calls) == 4

    def uniform(tokens):
        return np.zeros((*tokens.shape, V), dtype=np.float32)

    # Every ending scores log(V): the tie goes to ending 0, the label of 1 example in 4.
    assert hs.evaluate(uniform, TINY, tok, max_len=1024) == {"acc_norm": 0.25, "n": 4}
    assert hs.evaluate(uniform, TINY, tok, max_len=1024, limit=2) == {"acc_norm": 0.5, "n": 2}


def test_download_offline_says_to_pass_a_local_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(hs.urllib.request, "urlopen", offline)
    with pytest.raises(hs.HellaSwagError, match="--hellaswag_file PATH") as e:
        hs.download(tmp_path / "cache")
    assert isinstance(e.value, NanoMoeError)
    assert not (tmp_path / "cache" / hs.FILENAME).exists()
    with pytest.raises(hs.HellaSwagError, match="--hellaswag_file PATH"):
        hs.find_or_download(None, tmp_path / "cache")


def test_download_and_find_use_a_present_file_without_the_network(tmp_path, monkeypatch):
    monkeypatch.setattr(hs.urllib.request, "urlopen", None)  # any call would fail loudly
    (tmp_path / hs.FILENAME).write_text(TINY.read_text())
    assert hs.download(tmp_path) == tmp_path / hs.FILENAME
    assert hs.find_or_download(None, tmp_path) == tmp_path / hs.FILENAME
    assert hs.find_or_download(str(TINY), tmp_path / "unused") == TINY


def test_find_or_download_names_a_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(hs.HellaSwagError, match="nope.jsonl does not exist"):
        hs.find_or_download(missing, tmp_path)
