"""Sources: the default corpus, local text files and TFDS datasets, prepared once, read back exactly.

Oracle: the files themselves (read and decoded here, not by the library) and the split rule as the
library documents it (a hash of each document's relative path).
"""

from __future__ import annotations

import collections
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from retnet_jax.data import TextFiles, TfdsDataset, corpus_stats, lm_dataset
from retnet_jax.data.cache import publish_dir
from retnet_jax.data.default_corpus import stdlib_files, stdlib_root
from retnet_jax.data.sources import open_documents
from retnet_jax.data.text_builder import split_of


def write_corpus(folder: Path, n_files: int = 120, seed: int = 0) -> Path:
    """`n_files` small text files of random words (some non-ASCII); 3 of the 120 are validation."""
    rng = np.random.default_rng(seed)
    words = ["retention", "decay", "chunk", "state", "token", "héllo", "naïve", "日本語", "λ", "x"]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(rng.integers(1, 6))]
        (folder / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def all_texts(source, cache_dir) -> dict[str, list[str]]:
    out = {}
    for split in ("train", "validation"):
        docs = open_documents(source, split, cache_dir)
        out[split] = docs.texts(0, len(docs))
    return out


# ----------------------------------------------------------------------------------------------
# The default corpus (the running Python's standard library)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_default_preparations(tmp_path_factory):
    """The default corpus prepared from scratch into two separate caches (about 1 s each)."""
    return [tmp_path_factory.mktemp(f"cache{i}") for i in range(2)]


def test_default_corpus_is_the_stdlib_without_site_packages():
    files = stdlib_files()
    assert len(files) > 500 and all(f.endswith(".py") for f in files)
    assert "os.py" in files and "json/decoder.py" in files
    assert not any("site-packages" in f.split("/") for f in files)


def test_default_corpus_preparations_are_identical_files_and_batches(two_default_preparations):
    batches = []
    for cache in two_default_preparations:
        it = lm_dataset("default", "train", seq_len=64, batch_size=4, seed=3, cache_dir=cache)
        batches.append([next(it) for _ in range(3)])
    shards = [sorted((cache / "text").rglob("*.array_record-*")) for cache in two_default_preparations]
    assert [p.name for p in shards[0]] == [p.name for p in shards[1]] and len(shards[0]) == 2
    for a, b in zip(*shards):
        assert a.read_bytes() == b.read_bytes(), a.name
    for a, b in zip(*batches):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_default_corpus_split_is_disjoint_covering_and_about_one_percent(two_default_preparations):
    texts = all_texts("default", two_default_preparations[0])
    root = stdlib_root()
    expected = collections.defaultdict(collections.Counter)
    for f in stdlib_files():
        text = (root / f).read_bytes().decode("utf-8", errors="replace")
        if text.strip():  # blank files (empty __init__.py) are not documents
            expected[split_of(f)][text] += 1
    for split in ("train", "validation"):
        assert collections.Counter(texts[split]) == expected[split], split
    fraction = len(texts["validation"]) / (len(texts["train"]) + len(texts["validation"]))
    assert 0.003 < fraction < 0.03


def test_split_rule_depends_only_on_the_path():
    assert split_of("json/decoder.py") == split_of("json/decoder.py")
    names = [f"doc{i:05d}" for i in range(20_000)]
    assert 0.008 < sum(split_of(n) == "validation" for n in names) / len(names) < 0.012


# ----------------------------------------------------------------------------------------------
# Local text: a folder, a glob, a file of lines
# ----------------------------------------------------------------------------------------------


def test_local_folder_documents_are_its_files(tmp_path):
    folder = write_corpus(tmp_path / "corpus")
    (folder / ".hidden.txt").write_text("never read")
    (folder / "empty.txt").write_text("  \n")
    (folder / "sub").mkdir()
    (folder / "sub" / "nested.txt").write_text("a nested file", encoding="utf-8")
    texts = all_texts(str(folder), tmp_path / "cache")
    expected = collections.defaultdict(collections.Counter)
    for path in sorted(folder.rglob("*.txt")):
        relative = path.relative_to(folder).as_posix()
        if not relative.startswith(".") and path.read_text(encoding="utf-8").strip():
            expected[split_of(relative)][path.read_text(encoding="utf-8")] += 1
    for split in ("train", "validation"):
        assert collections.Counter(texts[split]) == expected[split]
    assert len(texts["validation"]) == 3


def test_glob_selects_only_its_matches(tmp_path):
    folder = write_corpus(tmp_path / "corpus", n_files=10)
    (folder / "notes.md").write_text("markdown, not matched")
    docs = open_documents(TextFiles(str(folder / "*.txt")), "train", tmp_path / "cache")
    texts = docs.texts(0, len(docs))
    assert "markdown, not matched" not in texts
    assert len(texts) == sum(split_of(f"doc{i:03d}.txt") == "train" for i in range(10))


def test_one_document_per_line(tmp_path):
    lines = [f"line {i} of one file" for i in range(400)]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines[:200]) + "\n\n   \n" + "\n".join(lines[200:]) + "\n")
    texts = all_texts(TextFiles(str(path), per_line=True), tmp_path / "cache")
    assert sorted(texts["train"] + texts["validation"]) == sorted(lines)  # blank lines skipped
    assert 0 < len(texts["validation"]) < 20


def test_preparation_is_skipped_when_inputs_are_unchanged(tmp_path):
    folder = write_corpus(tmp_path / "corpus", n_files=10)
    cache = tmp_path / "cache"
    open_documents(str(folder), "train", cache)
    prepared = sorted((cache / "text").iterdir())
    shard = next((cache / "text").rglob("*-train.array_record-*"))
    written = shard.stat().st_mtime_ns
    open_documents(str(folder), "train", cache)
    assert sorted((cache / "text").iterdir()) == prepared and shard.stat().st_mtime_ns == written

    (folder / "doc000.txt").write_text("changed text", encoding="utf-8")
    docs = open_documents(str(folder), "train", cache)
    assert len(list((cache / "text").iterdir())) == 2
    assert "changed text" in docs.texts(0, len(docs))


def test_publishing_tolerates_a_process_that_won_the_race(tmp_path):
    """Two processes preparing the same inputs: the loser's rename fails, it uses the winner's."""
    final = tmp_path / "prepared"

    def build(tmp: Path) -> None:
        (tmp / "data").write_text("ours")
        final.mkdir()  # another process finished first, while we were building
        (final / "data").write_text("theirs")

    assert publish_dir(final, build) == final
    assert (final / "data").read_text() == "theirs"
    assert os.listdir(tmp_path) == ["prepared"]  # no temporary folder left behind


def test_concurrent_preparations_agree(tmp_path):
    folder = write_corpus(tmp_path / "corpus", n_files=30)
    results, errors = [], []

    def prepare():
        try:
            docs = open_documents(str(folder), "train", tmp_path / "cache")
            results.append(docs.texts(0, len(docs)))
        except Exception as err:  # noqa: BLE001 -- reported below
            errors.append(err)

    threads = [threading.Thread(target=prepare) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results[0] == results[1] == results[2]
    assert not [p for p in (tmp_path / "cache" / "text").iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------
# TFDS datasets by name: mocked (nothing downloaded) and read from prepared files
# ----------------------------------------------------------------------------------------------


def test_named_tfds_dataset_through_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=40):
        expected = [tfds.data_source("lm1b", split="train")[i]["text"] for i in range(40)]
        it = lm_dataset("tfds:lm1b", "test", seq_len=8, batch_size=2, cache_dir=tmp_path)
        stats = corpus_stats("tfds:lm1b", "train", cache_dir=tmp_path)
        batch = next(it)
    stream = [t for text in expected for t in [*text.encode("utf-8"), 256]]
    assert stats.documents == 40 and stats.tokens == len(stream)
    np.testing.assert_array_equal(batch["inputs"].ravel(), stream[:16])


def test_tfds_dataset_read_from_prepared_files(tmp_path):
    """A prepared folder in a TFDS data dir is found by name, without its builder's code."""
    folder = write_corpus(tmp_path / "corpus", n_files=20)
    docs = open_documents(str(folder), "train", tmp_path / "cache")
    data_dir = next((tmp_path / "cache" / "text").iterdir())
    named = open_documents(TfdsDataset("retnet_jax_text", data_dir=str(data_dir)), "train")
    assert named.texts(0, len(named)) == docs.texts(0, len(docs))


def test_text_feature_is_named_or_found(tmp_path):
    with tfds.testing.mock_data(num_examples=3):
        assert open_documents(TfdsDataset("lm1b"), "train").feature == "text"
        assert open_documents(TfdsDataset("lm1b", feature="text"), "train").feature == "text"
        with pytest.raises(ValueError, match="no text feature 'label'"):
            open_documents(TfdsDataset("lm1b", feature="label"), "train")
