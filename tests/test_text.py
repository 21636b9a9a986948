"""The character-level standard-library corpus (hbpc.data.text): deterministic, capped, split, batched."""
import sysconfig
from pathlib import Path

import pytest
import torch

from hbpc.data import DatasetMissing
from hbpc.data.text import VOCABULARY, decode, encode, load_stdlib_text, stdlib_files, token_batches


def test_vocabulary_is_fixed_and_round_trips_ascii_source():
    assert len(VOCABULARY) == 97 and len(set(VOCABULARY)) == 97
    text = "def f(x):\n    return x ** 2  # ~`{}|\n"
    assert decode(encode(text)) == text
    assert encode("\tä").tolist() == [0, 0]  # outside the vocabulary: UNKNOWN


def test_corpus_is_the_sorted_stdlib_sources_capped_and_split():
    corpus = load_stdlib_text(max_chars=50_000, val_fraction=0.2)
    assert len(corpus.train) + len(corpus.val) == 50_000
    assert len(corpus.val) == 10_000
    assert list(corpus.files) == sorted(corpus.files)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    first = (stdlib / corpus.files[0]).read_text(encoding="utf-8", errors="replace")
    assert decode(corpus.train[:200]) == "".join(c if c in VOCABULARY else "\x00" for c in first[:200])
    again = load_stdlib_text(max_chars=50_000, val_fraction=0.2)
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.val, again.val)


def test_corpus_reads_a_given_folder_and_says_when_it_is_empty(tmp_path):
    (tmp_path / "b.py").write_text("bb\n")
    (tmp_path / "a.py").write_text("aa\n")
    corpus = load_stdlib_text(max_chars=100, val_fraction=0.5, root=tmp_path)
    assert corpus.files == ("a.py", "b.py")
    assert decode(torch.cat([corpus.train, corpus.val])) == "aa\n\nbb\n\n"
    assert [p.name for p in stdlib_files(tmp_path)] == ["a.py", "b.py"]
    with pytest.raises(DatasetMissing, match="no \\*.py files"):
        load_stdlib_text(root=tmp_path / "missing")
    with pytest.raises(ValueError, match="val_fraction"):
        load_stdlib_text(val_fraction=1.0, root=tmp_path)


def test_batches_are_windows_and_their_next_characters():
    tokens = torch.arange(50)
    batches = list(token_batches(tokens, 4, 8, steps=3, generator=torch.Generator().manual_seed(0)))
    assert len(batches) == 3
    for x, y in batches:
        assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
        assert torch.equal(y, x + 1)  # tokens are consecutive integers: the targets are the next ones
        assert torch.equal(x[:, 1:], x[:, :-1] + 1)
    again = list(token_batches(tokens, 4, 8, steps=3, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="too few"):
        next(token_batches(tokens[:8], 2, 8, steps=1))
