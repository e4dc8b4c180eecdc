"""The pipeline: packing, shuffling, per-process split and exact resumption.

Oracle: the split's documents tokenized here, one by one with `Tokenizer.encode`, each followed by
the end-of-document id, and cut into windows of `seq_len + 1` tokens every `seq_len` tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from retnet_jax.data import ByteTokenizer, TextFiles, corpus_stats, lm_dataset
from retnet_jax.data.sources import open_documents
from test_data_sources import write_corpus

SEQ_LEN = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder, cache): 120 small files, 3 of them in validation, prepared once for the module."""
    root = tmp_path_factory.mktemp("pipeline")
    folder = write_corpus(root / "corpus")
    return str(folder), root / "cache"


def oracle_stream(folder, split, cache) -> np.ndarray:
    docs = open_documents(folder, split, cache)
    tokenizer = ByteTokenizer()
    return np.asarray([t for text in docs.texts(0, len(docs))
                       for t in [*tokenizer.encode(text), tokenizer.eod_id]])


def windows_of(stream: np.ndarray, seq_len: int) -> np.ndarray:
    n = (len(stream) - 1) // seq_len
    return np.stack([stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])


def draw(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def rows(batches) -> np.ndarray:
    """Each row's window (inputs then the last target): [N, seq_len + 1]."""
    return np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
                           for b in batches])


def test_batches_are_int32_and_targets_are_inputs_shifted_by_one(corpus):
    folder, cache = corpus
    batch = next(lm_dataset(folder, "train", seq_len=SEQ_LEN, batch_size=4, cache_dir=cache))
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert batch["inputs"].shape == batch["targets"].shape == (4, SEQ_LEN)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_validation_windows_concatenate_to_the_tokenized_split(corpus):
    """Unshuffled, one pass: the windows are the stream in order, up to the final remainder."""
    folder, cache = corpus
    stream = oracle_stream(folder, "validation", cache)
    it = lm_dataset(folder, "validation", seq_len=SEQ_LEN, batch_size=1, cache_dir=cache)
    batches = list(it)
    n = (len(stream) - 1) // SEQ_LEN
    assert len(batches) == it.batches_per_epoch == n > 10
    np.testing.assert_array_equal(np.concatenate([b["inputs"][0] for b in batches]),
                                  stream[: n * SEQ_LEN])
    np.testing.assert_array_equal(batches[-1]["targets"][0, -1], stream[n * SEQ_LEN])


def test_validation_is_deterministic_and_drops_the_last_partial_batch(corpus):
    folder, cache = corpus
    first, second = (list(lm_dataset(folder, "validation", seq_len=SEQ_LEN, batch_size=4, seed=s,
                                     cache_dir=cache)) for s in (0, 1))
    n = (len(oracle_stream(folder, "validation", cache)) - 1) // SEQ_LEN
    assert len(first) == len(second) == n // 4
    np.testing.assert_array_equal(rows(first), rows(second))


def test_one_training_epoch_is_a_permutation_of_the_windows(corpus):
    """Shuffling reorders windows, never changes them: no token lost or duplicated in an epoch."""
    folder, cache = corpus
    expected = windows_of(oracle_stream(folder, "train", cache), SEQ_LEN)
    it = lm_dataset(folder, "train", seq_len=SEQ_LEN, batch_size=1, seed=5, cache_dir=cache)
    assert it.num_windows == len(expected)
    epoch1, epoch2 = rows(draw(it, len(expected))), rows(draw(it, len(expected)))
    for epoch in (epoch1, epoch2):
        assert sorted(map(bytes, epoch.astype(np.int32))) == \
            sorted(map(bytes, expected.astype(np.int32)))
    assert not np.array_equal(epoch1, expected)  # shuffled...
    assert not np.array_equal(epoch1, epoch2)  # ... afresh each epoch


def test_the_seed_chooses_the_order(corpus):
    folder, cache = corpus
    a, b, c = (rows(draw(lm_dataset(folder, "train", seq_len=SEQ_LEN, batch_size=4, seed=s,
                                    cache_dir=cache), 5)) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_two_processes_read_disjoint_halves_of_the_global_batch(tmp_path):
    # Numbered lines: every window holds a whole number, so equal rows mean the same window.
    path = tmp_path / "numbered.txt"
    path.write_text("".join(f"{i:06d}\n" for i in range(2000)))
    source, cache = TextFiles(str(path), per_line=True), tmp_path / "cache"
    kwargs = dict(seq_len=SEQ_LEN, batch_size=4, seed=2, cache_dir=cache)
    steps = lm_dataset(source, "train", **kwargs).num_windows // 4  # one epoch
    single = rows(draw(lm_dataset(source, "train", **kwargs), steps))
    halves = [draw(lm_dataset(source, "train", process_index=p, process_count=2, **kwargs), steps)
              for p in (0, 1)]
    assert halves[0][0]["inputs"].shape == (2, SEQ_LEN)
    np.testing.assert_array_equal(np.concatenate([rows([a, b]) for a, b in zip(*halves)]), single)
    seen = [set(map(bytes, rows(h))) for h in halves]
    assert len(seen[0]) == len(seen[1]) == 2 * steps and not seen[0] & seen[1]


def test_state_restores_the_same_batches(corpus):
    folder, cache = corpus
    kwargs = dict(seq_len=SEQ_LEN, batch_size=4, seed=7, cache_dir=cache)
    it = lm_dataset(folder, "train", **kwargs)
    draw(it, 13)
    state = it.get_state()
    assert json.loads(json.dumps(state)) == state
    expected = draw(it, 40)  # past the end of the first epoch
    restored = lm_dataset(folder, "train", **kwargs)
    restored.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(rows(draw(restored, 40)), rows(expected))


def test_state_restores_the_same_batches_in_a_fresh_process(corpus, tmp_path):
    folder, cache = corpus
    kwargs = dict(seq_len=SEQ_LEN, batch_size=4, seed=7, cache_dir=str(cache))
    it = lm_dataset(folder, "train", **kwargs)
    draw(it, 9)
    (tmp_path / "state.json").write_text(json.dumps(it.get_state()))
    expected = rows(draw(it, 12))
    script = textwrap.dedent(f"""
        import json, numpy as np
        from retnet_jax.data import lm_dataset
        it = lm_dataset({folder!r}, "train", **{kwargs!r})
        it.set_state(json.loads(open({str(tmp_path / "state.json")!r}).read()))
        batches = [next(it) for _ in range(12)]
        np.save({str(tmp_path / "rows.npy")!r}, np.concatenate(
            [np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in batches]))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    np.testing.assert_array_equal(np.load(tmp_path / "rows.npy"), expected)


def test_state_resumes_over_the_same_text_prepared_elsewhere(corpus, tmp_path):
    """Another host: its own copy of the files and its own cache, the same tokens."""
    folder, cache = corpus
    copy = write_corpus(tmp_path / "elsewhere")  # same names and text, new paths and file times
    kwargs = dict(seq_len=SEQ_LEN, batch_size=4, seed=4)
    it = lm_dataset(folder, "train", cache_dir=cache, **kwargs)
    draw(it, 5)
    state = it.get_state()
    expected = rows(draw(it, 5))
    restored = lm_dataset(str(copy), "train", cache_dir=tmp_path / "cache", **kwargs)
    restored.set_state(state)
    np.testing.assert_array_equal(rows(draw(restored, 5)), expected)


def test_state_of_a_different_pipeline_is_refused(corpus):
    folder, cache = corpus
    state = lm_dataset(folder, "train", seq_len=SEQ_LEN, batch_size=4, cache_dir=cache).get_state()
    other = lm_dataset(folder, "train", seq_len=SEQ_LEN, batch_size=8, cache_dir=cache)
    with pytest.raises(ValueError, match="batch_size"):
        other.set_state(state)


def test_worker_processes_deliver_the_same_batches(corpus):
    folder, cache = corpus
    kwargs = dict(seq_len=SEQ_LEN, batch_size=4, seed=1, cache_dir=cache)
    expected = rows(draw(lm_dataset(folder, "train", **kwargs), 6))
    it = lm_dataset(folder, "train", worker_count=1, **kwargs)
    np.testing.assert_array_equal(rows(draw(it, 6)), expected)


def test_sentencepiece_windows_hold_the_tokenized_split(corpus, tmp_path):
    from retnet_jax.data import train_on_source

    folder, cache = corpus
    tokenizer = train_on_source(folder, tmp_path / "sp.model", vocab_size=300, cache_dir=cache)
    docs = open_documents(folder, "validation", cache)
    stream = np.asarray([t for text in docs.texts(0, len(docs))
                         for t in [*tokenizer.encode(text), tokenizer.eod_id]])
    batches = list(lm_dataset(folder, "validation", seq_len=8, batch_size=1,
                              tokenizer=tmp_path / "sp.model", cache_dir=cache))
    np.testing.assert_array_equal(np.concatenate([b["inputs"][0] for b in batches]),
                                  stream[: len(batches) * 8])


def test_corpus_stats_count_documents_bytes_tokens_and_byte_entropy(corpus):
    folder, cache = corpus
    docs = open_documents(folder, "train", cache)
    data = b"".join(text.encode("utf-8") for text in docs.texts(0, len(docs)))
    counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256)
    p = counts[counts > 0] / len(data)
    stats = corpus_stats(folder, "train", cache_dir=cache)
    assert (stats.documents, stats.bytes, stats.tokens) == (len(docs), len(data),
                                                            len(data) + len(docs))
    assert stats.byte_entropy_nats == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
