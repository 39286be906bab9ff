"""Record sources: random-access (len + getitem) views over JSONL, Parquet and HF datasets.

Every source returns plain ``dict`` records and can describe where record ``i`` lives
(``where(i)``, e.g. ``data.jsonl:17``) so that errors raised far downstream (formatting,
tokenisation) still point at the offending line. They satisfy grain's
``RandomAccessDataSource`` protocol and go straight into ``grain.MapDataset.source``.

Sources are read from grain's prefetch threads, so reads are thread-safe (``os.pread`` for
JSONL, immutable Arrow tables otherwise) and nothing is opened until first use, which also
keeps them picklable for grain worker processes.
"""
from __future__ import annotations

import bisect
import glob
import json
import os
from typing import Any, Sequence

import numpy as np

Record = dict[str, Any]

_CHUNK_BYTES = 1 << 24


try:  # the project-wide base the CLI prints without a traceback (still a ValueError)
    from alignjax.errors import UserError as _UserError
except ImportError:  # pragma: no cover - keeps this module usable on its own
    _UserError = ValueError


class DataError(_UserError):
    """A problem with the user's data or data config (bad file, bad record, bad option)."""


# ----------------------------------------------------------------------------- JSONL


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte offsets, byte lengths and 1-based line numbers of the non-empty lines of a file."""
    newline_pos = []
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            newline_pos.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + size)
            size += len(chunk)
    ends_n = np.concatenate(newline_pos + [np.array([size], np.int64)]).astype(np.int64)
    starts_n = np.concatenate([[0], ends_n[:-1] + 1]).astype(np.int64)
    lengths_n = ends_n - starts_n
    linenos_n = np.arange(1, len(starts_n) + 1, dtype=np.int64)
    keep = lengths_n > 0  # blank lines (and the empty tail after a final newline) are not records
    return starts_n[keep], lengths_n[keep], linenos_n[keep]


class JsonlSource:
    """One JSON object per line. Line offsets are indexed once; lines are parsed lazily."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such JSONL file")
        self._starts, self._lengths, self._linenos = _index_lines(path)
        if len(self._starts) == 0:
            raise DataError(f"{path}: dataset is empty (no non-blank lines)")
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._starts)

    def where(self, index: int) -> str:
        return f"{self.path}:{int(self._linenos[index])}"

    def _read_line(self, index: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self._fd, int(self._lengths[index]), int(self._starts[index]))

    def __getitem__(self, index: int) -> Record:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: record {index} out of range [0, {len(self)})")
        line = self._read_line(index).strip()
        if not line:
            raise DataError(f"{self.where(index)}: line holds only whitespace, expected a JSON object")
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.where(index)}: malformed JSON ({e})") from None
        if not isinstance(record, dict):
            raise DataError(
                f"{self.where(index)}: expected a JSON object, got {type(record).__name__}"
            )
        return record

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}  # file descriptors do not cross processes

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, n={len(self)})"


# ----------------------------------------------------------------------------- Arrow-backed


class ArrowTableSource:
    """Rows of an in-memory (often memory-mapped) ``pyarrow.Table``."""

    def __init__(self, table, name: str):
        self.name = name
        self._table = table
        if table.num_rows == 0:
            raise DataError(f"{name}: dataset is empty (0 rows)")

    def __len__(self) -> int:
        return self._table.num_rows

    def where(self, index: int) -> str:
        return f"{self.name} record {int(index)}"

    def __getitem__(self, index: int) -> Record:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: record {index} out of range [0, {len(self)})")
        return self._table.slice(index, 1).to_pylist()[0]

    def __repr__(self) -> str:
        return f"ArrowTableSource({self.name!r}, n={len(self)})"


def parquet_source(path: str) -> ArrowTableSource:
    """A Parquet file, memory-mapped (columns are decoded once, rows sliced lazily)."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise DataError(f"{path}: no such Parquet file")
    try:
        table = pq.read_table(path, memory_map=True)
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: cannot read Parquet file ({e})") from None
    return ArrowTableSource(table, path)


class HFDatasetSource:
    """A ``datasets.Dataset`` (Arrow-backed, memory-mapped, random access)."""

    def __init__(self, dataset, name: str):
        self.name = name
        self._ds = dataset
        if len(dataset) == 0:
            raise DataError(f"{name}: dataset is empty (0 rows)")

    def __len__(self) -> int:
        return len(self._ds)

    def where(self, index: int) -> str:
        return f"{self.name} record {int(index)}"

    def __getitem__(self, index: int) -> Record:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: record {index} out of range [0, {len(self)})")
        return dict(self._ds[index])

    def __repr__(self) -> str:
        return f"HFDatasetSource({self.name!r}, n={len(self)})"


def _pick_split(dataset_dict, split: str | None, name: str):
    splits = list(dataset_dict.keys())
    split = split or ("train" if "train" in splits else None)
    if split not in dataset_dict:
        raise DataError(f"{name}: choose a split with '{name}:<split>'; available: {splits}")
    return dataset_dict[split], split


def disk_source(path: str, split: str | None = None) -> HFDatasetSource:
    """A directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    import datasets

    state = os.path.join(path, "state.json")
    if os.path.isfile(state):
        with open(state) as f:
            if not json.load(f).get("_data_files", True):
                raise DataError(f"{path}: dataset is empty (no data files)")
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises assorted types for missing/corrupt directories
        raise DataError(f"{path}: cannot load a datasets.save_to_disk directory "
                        f"({type(e).__name__}: {e})") from e
    name = path
    if isinstance(ds, datasets.DatasetDict):
        ds, split = _pick_split(ds, split, path)
        name = f"{path}:{split}"
    elif split is not None:
        raise DataError(f"{path}: holds a single Dataset, no split {split!r}")
    return HFDatasetSource(ds, name)


def hub_source(name: str, split: str = "train") -> HFDatasetSource:
    """A dataset from the Hugging Face hub (or its local cache); needs network on first use."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, auth, unknown name: all user-facing
        raise DataError(f"hf://{name}:{split}: cannot load from the hub ({e})") from e
    return HFDatasetSource(ds, f"hf://{name}:{split}")


# ----------------------------------------------------------------------------- concatenation


class ConcatSource:
    """Several sources one after the other; ``where`` names the original file and line."""

    def __init__(self, sources: Sequence[Any]):
        if not sources:
            raise DataError("no data sources given")
        self.sources = list(sources)
        self._ends = np.cumsum([len(s) for s in self.sources]).tolist()

    def __len__(self) -> int:
        return self._ends[-1]

    def _locate(self, index: int) -> tuple[Any, int]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        k = bisect.bisect_right(self._ends, index)
        return self.sources[k], index - (self._ends[k - 1] if k else 0)

    def __getitem__(self, index: int) -> Record:
        src, local = self._locate(index)
        return src[local]

    def where(self, index: int) -> str:
        src, local = self._locate(index)
        return src.where(local) if hasattr(src, "where") else f"{src!r} record {local}"

    def __repr__(self) -> str:
        return f"ConcatSource({self.sources!r})"


def where(source: Any, index: int) -> str:
    """Human-readable location of record ``index`` of any source."""
    return source.where(index) if hasattr(source, "where") else f"record {int(index)}"


# ----------------------------------------------------------------------------- dispatch


def _split_suffix(spec: str) -> tuple[str, str | None]:
    """'dir:split' -> ('dir', 'split') when 'dir' exists and 'dir:split' does not."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    base, split = spec.rsplit(":", 1)
    return (base, split) if os.path.exists(base) and split else (spec, None)


def _open_one(path: str) -> Any:
    path, split = _split_suffix(path)
    lower = path.lower()
    if lower.endswith(".jsonl"):
        return JsonlSource(path)
    if lower.endswith(".parquet"):
        return parquet_source(path)
    if os.path.isdir(path):
        markers = ("dataset_info.json", "dataset_dict.json", "state.json")
        if any(os.path.isfile(os.path.join(path, m)) for m in markers):
            return disk_source(path, split)
        raise DataError(
            f"{path}: directory is not a datasets.save_to_disk dataset (no dataset_info.json "
            "or dataset_dict.json)"
        )
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    raise DataError(f"{path}: unknown data format; expected .jsonl, .parquet, a "
                    "save_to_disk directory or hf://name[:split]")


def open_source(spec: str) -> Any:
    """Open a record source from a spec string.

    ``x.jsonl`` | ``x.parquet`` | ``dir`` (save_to_disk, ``dir:split`` for a DatasetDict) |
    ``hf://name[:split]`` (hub, split defaults to train) | a glob such as ``data/*.jsonl``
    (files concatenated in sorted order).
    """
    spec = str(spec)
    if spec.startswith("hf://"):
        name, _, split = spec[len("hf://"):].partition(":")
        if not name:
            raise DataError(f"{spec}: missing dataset name after hf://")
        return hub_source(name, split or "train")
    if any(c in spec for c in "*?[") and not os.path.exists(spec):
        paths = sorted(glob.glob(spec))
        if not paths:
            raise DataError(f"{spec}: glob matches no files")
        return ConcatSource([_open_one(p) for p in paths]) if len(paths) > 1 else _open_one(paths[0])
    return _open_one(spec)


def open_sources(specs: str | Any | Sequence[str | Any]) -> Any:
    """Specs and/or already-open sources -> one source (concatenated when several)."""
    if not isinstance(specs, (list, tuple)):
        specs = [specs]
    opened = [open_source(s) if isinstance(s, (str, os.PathLike)) else s for s in specs]
    for s in opened:
        if len(s) == 0:
            raise DataError(f"{s!r}: dataset is empty")
    return opened[0] if len(opened) == 1 else ConcatSource(opened)
