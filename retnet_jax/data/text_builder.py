"""A TFDS builder for local text files, prepared once into ArrayRecord under the cache directory.

Documents are whole files or single lines; blank ones are skipped. Each document goes to the
validation split when a hash of its key (its file's path relative to the corpus root, plus the line
number for line documents) falls in 1 of 100 buckets, so the split depends only on names, not on
the machine, the order of listing or the other files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from retnet_jax.data.cache import publish_dir

_log = logging.getLogger(__name__)

VALIDATION_BUCKETS = 100  # 1 bucket in 100 is validation: about 1% of the documents
FORMAT = "retnet_jax_text/1.0.0"  # bump when what a prepared folder holds changes


def split_of(key: str) -> str:
    """"validation" for about 1% of keys, "train" for the rest: a hash, not the key's position."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return "validation" if bucket % VALIDATION_BUCKETS == 0 else "train"


def read_text(path: Path) -> str:
    """A file's text as UTF-8; bytes that are not UTF-8 become U+FFFD rather than an error."""
    return path.read_bytes().decode("utf-8", errors="replace")


def documents(root: Path, files: Sequence[str], per_line: bool,
              split: str | None = None) -> Iterator[tuple[str, str]]:
    """`(key, text)` of every non-blank document of `files` (relative to `root`) in `split` (None:
    all), in order. Whole-file documents are split by name, so only that split's files are read."""
    for relative in files:
        if not per_line:
            if split in (None, split_of(relative)) and (text := read_text(root / relative)).strip():
                yield relative, text
            continue
        for number, line in enumerate(read_text(root / relative).split("\n")):
            key = f"{relative}:{number}"
            if split in (None, split_of(key)) and line.strip():
                yield key, line


def fingerprint(root: Path, files: Sequence[str], per_line: bool) -> str:
    """Names the inputs as they are now: the files' paths, sizes and modification times."""
    stats = [(root / f).stat() for f in files]
    listing = [(f, st.st_size, st.st_mtime_ns) for f, st in zip(files, stats)]
    blob = json.dumps([FORMAT, str(root), per_line, listing]).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


class RetnetJaxText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One document per file or per line of local text files: the single feature "text".

    Not registered by name: `tfds.builder("retnet_jax_text", data_dir=...)` reads a prepared
    folder from its files instead of constructing this class without its inputs.
    """

    VERSION = tfds.core.Version("1.0.0")
    # TFDS finds a builder's file through importlib_resources, absent on Python >= 3.9 (it is not a
    # dependency there) for a package installed from a folder: this is the file.
    code_path = Path(__file__)

    def __init__(self, *, root: Path, files: Sequence[str], per_line: bool, data_dir: Path):
        self._root, self._files, self._per_line = root, tuple(files), per_line
        super().__init__(data_dir=str(data_dir), file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text files, one document per file or per line (retnet_jax.data).",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        del dl_manager
        # TFDS refuses to write an empty split, so only splits that hold a document are declared.
        seen: set[str] = set()
        for key, _ in documents(self._root, self._files, self._per_line):
            seen.add(split_of(key))
            if len(seen) == 2:
                break
        if not seen:
            raise ValueError(f"source: the files under {str(self._root)!r} hold no text "
                             f"(every one is empty or blank)")
        return {split: self._generate_examples(split) for split in sorted(seen)}

    def _generate_examples(self, split: str):
        for key, text in documents(self._root, self._files, self._per_line, split):
            yield key, {"text": text}

    # TFDS prints "Downloading and preparing ..." banners to stdout; a library call logs instead.
    def _log_download_bytes(self) -> None:
        _log.info("preparing the text under %s into %s", self._root, self.data_dir)

    def _log_download_done(self) -> None:
        _log.info("prepared %s", self.data_dir)


def prepare_text(root: Path, files: Sequence[str], per_line: bool, cache: Path) -> Path:
    """The prepared ArrayRecord folder of these files (`tfds.builder_from_directory` reads it).

    Prepared once per fingerprint of the inputs; a second call with unchanged files only lists them.
    """
    key = fingerprint(root, files, per_line)
    data_dir = cache / "text" / key[:32]

    def build(tmp: Path) -> None:
        builder = RetnetJaxText(root=root, files=files, per_line=per_line, data_dir=tmp)
        with _no_progress_bars():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        shutil.rmtree(tmp / "downloads", ignore_errors=True)  # TFDS makes it; nothing is downloaded

    publish_dir(data_dir, build)
    return data_dir / RetnetJaxText.name / str(RetnetJaxText.VERSION)


@contextlib.contextmanager
def _no_progress_bars():
    from tensorflow_datasets.core.utils import tqdm_utils

    shown = getattr(tqdm_utils, "_active", True)  # private, but the public switch cannot restore
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(shown)
