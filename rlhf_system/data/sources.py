"""Reading raw datasets: .jsonl / .json / .parquet files and `save_to_disk` folders, through `datasets`.

Map-style loading converts each file once into an Arrow cache that is memory-mapped, so a source of
millions of rows never has to fit in Python memory; `streaming=True` iterates the files lazily
instead. Several sources are mixed by weight with `datasets.interleave_datasets`.

This file only reads and checks raw rows. Format detection is in formats.py, tokenisation in
tokenize.py.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets

from rlhf_system.config import DataSource
from rlhf_system.errors import UserError


class DataError(UserError):
    """Bad input data, phrased for a user: it names the file, line, key or sample."""


@dataclass
class LoadedSource:
    """One raw source and how to name its rows in errors."""

    source: DataSource
    dataset: datasets.Dataset | datasets.IterableDataset
    columns: list[str]

    def where(self, row: int) -> str:
        """`file.jsonl:18` for a row of a JSONL file without blank lines, `path row 17` otherwise."""
        if self.source.path.endswith(".jsonl"):
            return f"{self.source.path}:{row + 1}"
        return f"{self.source.path} row {row}"


def check_jsonl(path: Path) -> int:
    """Parse every line once so a malformed one is reported as file:line before any heavy work.

    The Arrow JSON reader would only say that *some* block failed. Returns the row count.
    """
    rows = 0
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            parse_jsonl_line(path, lineno, line)
            rows += 1
    return rows


def _jsonl_rows(paths: list[str]):
    """JSONL rows read lazily, for streaming: a bad line is a DataError naming file:line when the stream
    reaches it (a whole-file check first would read a large source twice before training starts)."""
    for path in paths:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                yield parse_jsonl_line(path, lineno, line)


def parse_jsonl_line(path, lineno: int, line: bytes) -> dict:
    """One JSONL line as a JSON object, or a DataError naming path:lineno (blank, malformed, not an object)."""
    if not line.strip():
        raise DataError(f"{path}:{lineno}: blank line in JSONL (one JSON object per line expected)")
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}:{lineno}: malformed JSON line: {getattr(e, 'msg', str(e))}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def load_source(src: DataSource, streaming: bool = False, cache_dir: str = "") -> LoadedSource:
    path = Path(src.path)
    if not path.exists():
        raise DataError(f"{src.path}: no such file or folder (data source)")
    if path.is_dir():
        if not any((path / marker).is_file() for marker in ("dataset_dict.json", "state.json")):
            found = sorted(p.name for p in path.iterdir())[:5]
            raise DataError(f"{src.path}: a folder but not a saved dataset (no dataset_dict.json or state.json; "
                            f"found {found or 'nothing'}). Fix: point at the .jsonl/.json/.parquet file, or save "
                            "the folder with datasets' save_to_disk")
        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as e:  # a damaged save: name the folder, keep the first line
            raise DataError(f"{src.path}: could not load the saved dataset: {str(e).splitlines()[0]}") from None
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DataError(f"{src.path}: split '{src.split}' not found; splits: {sorted(ds)}")
            ds = ds[src.split]
        if streaming:
            ds = ds.to_iterable_dataset()
    elif path.suffix.lower() == ".jsonl" and streaming:
        ds = datasets.IterableDataset.from_generator(_jsonl_rows, gen_kwargs={"paths": [str(path)]})
    else:
        ds = _read_file(path, streaming, cache_dir or None)
    if src.max_samples is not None:
        ds = ds.take(src.max_samples) if streaming else ds.select(range(min(src.max_samples, len(ds))))
    columns = list(ds.column_names or (ds.features or {}).keys()) if not streaming else _stream_columns(ds)
    if not columns or (not streaming and len(ds) == 0):
        raise DataError(f"{src.path}: no rows")
    return LoadedSource(src, ds, columns)


def _read_file(path: Path, streaming: bool, cache: str | None) -> datasets.Dataset | datasets.IterableDataset:
    """A .jsonl / .json / .parquet file through the `datasets` builders (map-style: an Arrow cache)."""
    suffix = path.suffix.lower()
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
    if builder is None:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json, .parquet or a save_to_disk "
                        "folder)")
    if suffix == ".jsonl" and check_jsonl(path) == 0:
        raise DataError(f"{path}: empty file")
    quiet = logging.getLogger("datasets.packaged_modules")  # it logs the failure we report below
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming,
                                     cache_dir=cache)
    except Exception as e:  # the Arrow readers raise many types: name the file, keep the first line
        raise DataError(f"{path}: could not be read as {builder}: {str(e).splitlines()[0]}") from None
    finally:
        quiet.setLevel(level)


def _stream_columns(ds: datasets.IterableDataset) -> list[str]:
    if ds.column_names:
        return list(ds.column_names)
    first = next(iter(ds), None)  # reads only the first row
    return list(first) if first else []


def mix(parts: list[datasets.Dataset | datasets.IterableDataset], weights: list[float], seed: int,
        stopping: str) -> datasets.Dataset | datasets.IterableDataset:
    """Interleave sources with probabilities proportional to their weights."""
    if len(parts) == 1:
        return parts[0]
    total = sum(weights)
    return datasets.interleave_datasets(parts, probabilities=[w / total for w in weights], seed=seed,
                                        stopping_strategy=stopping)
