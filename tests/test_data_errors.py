"""Each bad input is refused with an error naming the argument, before any work is done.

"Before any work": the cache directory, where preparation would write first, is never created.
"""

from __future__ import annotations

import pytest
import tensorflow_datasets as tfds

from retnet_jax.data import TfdsDataset, lm_dataset
from test_data_sources import write_corpus


@pytest.fixture
def folder(tmp_path):
    return str(write_corpus(tmp_path / "corpus", n_files=5))


def refused(tmp_path, error, match, source, split="train", **kwargs):
    kwargs = {"seq_len": 8, "batch_size": 2, **kwargs}
    with pytest.raises(error, match=match):
        lm_dataset(source, split, cache_dir=tmp_path / "cache", **kwargs)
    assert not (tmp_path / "cache").exists()


def test_missing_path(tmp_path):
    refused(tmp_path, FileNotFoundError, "source: no file or folder at", str(tmp_path / "nope"))


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    refused(tmp_path, ValueError, "source: the folder .* holds no files", str(tmp_path / "empty"))


def test_glob_matching_nothing(tmp_path, folder):
    refused(tmp_path, FileNotFoundError, "source: the glob .* matches no file", folder + "/*.md")


def test_unknown_tfds_name(tmp_path):
    refused(tmp_path, ValueError, "source: unknown TFDS dataset 'no_such_dataset'",
            "tfds:no_such_dataset")


def test_tfds_dataset_not_prepared_names_the_directory(tmp_path):
    refused(tmp_path, FileNotFoundError,
            f"source: TFDS dataset 'lm1b' is not prepared: .* {tmp_path / 'tfds' / 'lm1b'}",
            TfdsDataset("lm1b", data_dir=str(tmp_path / "tfds")))


@pytest.mark.parametrize("seq_len", [0, -3])
def test_sequence_length_below_one(tmp_path, folder, seq_len):
    refused(tmp_path, ValueError, "seq_len must be >= 1", folder, seq_len=seq_len)


def test_batch_that_the_process_count_does_not_divide(tmp_path, folder):
    refused(tmp_path, ValueError, "batch_size=6 .* divisible by process_count=4", folder,
            batch_size=6, process_count=4)


def test_process_index_out_of_range(tmp_path, folder):
    refused(tmp_path, ValueError, "process_index must be in", folder, process_index=2,
            process_count=2)


def test_unknown_split(tmp_path, folder):
    refused(tmp_path, ValueError, "split must be one of", folder, split="test")


@pytest.mark.parametrize("content", [b"this is not a SentencePiece model", b""])
def test_tokenizer_file_that_is_not_sentencepiece(tmp_path, folder, content):
    bad = tmp_path / "bad.model"
    bad.write_bytes(content)
    refused(tmp_path, ValueError, "tokenizer: .*bad.model' is not a SentencePiece model", folder,
            tokenizer=bad)


def test_missing_tokenizer_file(tmp_path, folder):
    refused(tmp_path, FileNotFoundError, "tokenizer: no SentencePiece model file", folder,
            tokenizer=tmp_path / "missing.model")


def test_split_too_small_for_one_window(tmp_path):
    (tmp_path / "tiny.txt").write_text("tiny")
    with pytest.raises(ValueError, match="seq_len=64: the train split holds 5 tokens"):
        lm_dataset(str(tmp_path / "tiny.txt"), "train", seq_len=64, batch_size=1,
                   cache_dir=tmp_path / "cache")


def test_validation_split_smaller_than_a_batch(tmp_path):
    with tfds.testing.mock_data(num_examples=3):
        with pytest.raises(ValueError, match="batch_size=64: the test split holds"):
            lm_dataset("tfds:lm1b", "test", seq_len=4, batch_size=64, cache_dir=tmp_path)
