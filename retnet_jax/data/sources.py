"""Where documents come from: the default corpus, local text files, or a prepared TFDS dataset.

A source is named by a string (`"default"`, a path or glob, `"tfds:NAME[/CONFIG][:VERSION][#FEATURE]"`)
or by one of the frozen dataclasses below, and resolves to the random-access `Documents` of a split.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from retnet_jax.data.cache import cache_root
from retnet_jax.data.default_corpus import stdlib_files, stdlib_root
from retnet_jax.data.text_builder import prepare_text

LOCAL_SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class DefaultCorpus:
    """The running Python's standard library `.py` files (`site-packages` excluded), one per document."""


@dataclasses.dataclass(frozen=True)
class TextFiles:
    """A text file, a folder (every file below it; hidden ones skipped) or a glob (`**` recurses).

    `per_line`: each non-blank line is a document, instead of each file.
    """

    path: str
    per_line: bool = False


@dataclasses.dataclass(frozen=True)
class TfdsDataset:
    """A TFDS dataset prepared as ArrayRecord in `data_dir` (TFDS's default data dir when None).

    `name` as TFDS spells it (`NAME`, `NAME/CONFIG`, `NAME/CONFIG:VERSION`); `feature` the text
    feature to read: when None, the one named "text", else the dataset's only text feature.
    """

    name: str
    feature: str | None = None
    data_dir: str | None = None


Source = DefaultCorpus | TextFiles | TfdsDataset


@dataclasses.dataclass(frozen=True)
class Documents:
    """One split's documents, random access; `fingerprint` changes whenever the text may have."""

    data_source: Any  # a TFDS data source: a sequence of feature dicts
    feature: str
    fingerprint: str

    def __len__(self) -> int:
        return len(self.data_source)

    def texts(self, start: int, stop: int) -> list[str]:
        # ArrayRecord gives text features as UTF-8 bytes (tfds.testing.mock_data gives str).
        return [_as_str(self.data_source[i][self.feature]) for i in range(start, stop)]


def parse_source(source: str | os.PathLike | Source) -> Source:
    """The dataclass a source string names: "default", "tfds:...", else a path or glob."""
    if isinstance(source, (DefaultCorpus, TextFiles, TfdsDataset)):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a string, a path or a source dataclass; got "
                        f"{type(source).__name__}")
    source = os.fspath(source)
    if source == "default":
        return DefaultCorpus()
    if source.startswith("tfds:"):
        name, _, feature = source.removeprefix("tfds:").partition("#")
        if not name:
            raise ValueError(f"source {source!r} names no dataset: write tfds:NAME[/CONFIG][#FEATURE]")
        return TfdsDataset(name, feature or None)
    return TextFiles(source)


def list_text_files(spec: TextFiles) -> tuple[Path, list[str]]:
    """`(root, files relative to root)`; a clear error when the path names no file."""
    path = Path(os.path.abspath(os.path.expanduser(spec.path)))
    if path.is_file():
        return path.parent, [path.name]
    if path.is_dir():
        files = _walk_visible(path)
        if not files:
            raise ValueError(f"source: the folder {spec.path!r} holds no files")
        return path, files
    if glob.has_magic(spec.path):
        root = _glob_root(path)
        matches = sorted(m for m in glob.glob(str(path), recursive=True) if os.path.isfile(m))
        if not matches:
            raise FileNotFoundError(f"source: the glob {spec.path!r} matches no file")
        return root, [Path(m).relative_to(root).as_posix() for m in matches]
    raise FileNotFoundError(f"source: no file or folder at {spec.path!r}")


def check_split(spec: Source, split: str) -> None:
    if not isinstance(split, str):
        raise TypeError(f"split must be a string, got {type(split).__name__}")
    if not isinstance(spec, TfdsDataset) and split not in LOCAL_SPLITS:
        raise ValueError(f"split must be one of {LOCAL_SPLITS} for local text, got {split!r}")


def open_documents(source: str | os.PathLike | Source, split: str,
                   cache_dir: str | os.PathLike | None = None) -> Documents:
    """The documents of `split`, preparing local text into the cache first if it has changed."""
    spec = parse_source(source)
    check_split(spec, split)
    if isinstance(spec, TfdsDataset):
        return _tfds_documents(spec, split)
    if isinstance(spec, DefaultCorpus):
        root, files, per_line, name = stdlib_root(), stdlib_files(), False, "the default corpus"
    else:
        (root, files), per_line, name = list_text_files(spec), spec.per_line, repr(spec.path)
    builder_dir = prepare_text(root, files, per_line, cache_root(cache_dir))
    builder = tfds.builder_from_directory(str(builder_dir))
    if split not in builder.info.splits:
        raise ValueError(f"split={split!r}: {name} holds no {split} documents (a document is in "
                         f"validation when a hash of its path falls in 1 bucket of 100)")
    fingerprint = f"{builder_dir.parent.parent.name}/{split}"  # the prepared folder names its inputs
    return Documents(builder.as_data_source(split=split), "text", fingerprint)


def _tfds_documents(spec: TfdsDataset, split: str) -> Documents:
    try:
        builder = tfds.builder(spec.name, data_dir=spec.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"source: unknown TFDS dataset {spec.name!r} (not in the TFDS catalogue, "
                         f"nor prepared in the data dir)") from None
    feature = _text_feature(builder.info.features, spec)
    try:
        data_source = builder.as_data_source(split=split)
    except Exception as err:  # TFDS says "not supported for TFRECORD" of a dataset never prepared
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"source: TFDS dataset {spec.name!r} is not prepared: its files were expected in "
                f"{builder.data_dir} (nothing is downloaded; prepare it there with `tfds build "
                f"--file_format=array_record`, or point $TFDS_DATA_DIR at a copy)") from None
        raise ValueError(f"source {spec.name!r}, split={split!r}: {err}") from None
    files = sorted(Path(builder.data_dir).glob(f"*-{split}.*")) if builder.is_prepared() else []
    listing = [builder.data_dir, split, len(data_source), feature,
               [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]
    fingerprint = hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()
    return Documents(data_source, feature, fingerprint)


def _text_feature(features, spec: TfdsDataset) -> str:
    text_features = sorted(k for k, f in features.items() if isinstance(f, tfds.features.Text))
    if spec.feature is not None:
        if spec.feature not in text_features:
            raise ValueError(f"source: TFDS dataset {spec.name!r} has no text feature "
                             f"{spec.feature!r}; its text features: {text_features}")
        return spec.feature
    if "text" in text_features:
        return "text"
    if len(text_features) == 1:
        return text_features[0]
    raise ValueError(f"source: name the text feature of TFDS dataset {spec.name!r} "
                     f"(tfds:{spec.name}#FEATURE); its text features: {text_features}")


def _walk_visible(folder: Path) -> list[str]:
    files = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        relative = Path(parent).relative_to(folder)
        files += [(relative / n).as_posix() for n in names
                  if not n.startswith(".") and os.path.isfile(os.path.join(parent, n))]
    return sorted(files)


def _glob_root(pattern: Path) -> Path:
    """The folder a glob searches: its leading parts without wildcards (`pattern` is absolute)."""
    return Path(*itertools.takewhile(lambda part: not glob.has_magic(part), pattern.parts))


def _as_str(text: bytes | str) -> str:
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)
