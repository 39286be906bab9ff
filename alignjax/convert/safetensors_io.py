"""Memory-mapped safetensors reading and streaming writing (bfloat16 included, via ml_dtypes).

The `safetensors` package's numpy backend has no bfloat16, and its framework backends load
whole tensors onto a default device; the format is simple enough to map it directly.
"""

from __future__ import annotations

from alignjax.errors import UserError

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype("float64"), "F32": np.dtype("float32"), "F16": np.dtype("float16"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("int64"), "I32": np.dtype("int32"),
    "I16": np.dtype("int16"), "I8": np.dtype("int8"), "U8": np.dtype("uint8"), "BOOL": np.dtype("bool"),
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class WeightsError(UserError):
    """Missing, unexpected or malformed weights; the message names the tensor and file."""


_DAMAGED = "re-download or re-export it"


def _read_header(path: str):
    """(tensor table, data start); a truncated or damaged header is a WeightsError naming the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated ({size} bytes, not even a header); {_DAMAGED}")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise WeightsError(f"{path}: truncated or not a safetensors file (the header claims "
                               f"{n} bytes, the file has {size}); {_DAMAGED}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{path}: damaged header ({e}); {_DAMAGED}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: damaged header (not a JSON object); {_DAMAGED}")
    header.pop("__metadata__", None)
    for key, info in header.items():
        try:
            start, end = info["data_offsets"]
            count = int(np.prod(info["shape"], dtype=np.int64))
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: damaged header entry for tensor {key}; {_DAMAGED}") from None
        if dtype not in DTYPES:
            raise WeightsError(f"{path}: tensor {key} has unsupported dtype {dtype}")
        if end - start != count * DTYPES[dtype].itemsize or start < 0:
            raise WeightsError(f"{path}: damaged header: tensor {key} {info['shape']} {dtype} "
                               f"spans bytes {start}..{end}; {_DAMAGED}")
        if 8 + n + end > size:
            raise WeightsError(f"{path}: truncated: tensor {key} needs bytes up to {8 + n + end}, "
                               f"the file has {size}; {_DAMAGED}")
    return header, 8 + n


class SafetensorsReader:
    """All tensors of an HF directory (single file or sharded with an index), memory-mapped."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise WeightsError(f"{index_path}: damaged index ({type(e).__name__}: {e}); "
                                   f"{_DAMAGED}") from None
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not found:
                raise WeightsError(f"{directory}: no *.safetensors files (and no {INDEX_FILE}); "
                                   "convert .bin checkpoints to safetensors first")
            files = found
        self._where = {}  # tensor name -> (file, dtype, shape, start, end)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                raise WeightsError(f"{index_path} lists {name}, which does not exist")
            header, base = _read_header(path)
            for key, info in header.items():
                start, end = info["data_offsets"]
                self._where[key] = (path, DTYPES[info["dtype"]], tuple(info["shape"]),
                                    base + start, base + end)
        self._maps = {}

    def keys(self):
        return self._where.keys()

    def shape(self, key):
        return self._where[key][2]

    def get(self, key: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor (no copy until used)."""
        if key not in self._where:
            raise WeightsError(f"{self.directory}: tensor {key!r} is missing from the checkpoint")
        path, dtype, shape, start, end = self._where[key]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        raw = self._maps[path][start:end]
        return raw.view(dtype).reshape(shape)


class ShardedSafetensorsWriter:
    """Writes tensors in order into model-0000i-of-0000n.safetensors files plus the index."""

    def __init__(self, directory: str, max_shard_bytes: int = 2 * 1024**3):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._shards = [[]]  # lists of (name, array)
        self._bytes = 0
        os.makedirs(directory, exist_ok=True)

    def add(self, name: str, array: np.ndarray):
        array = np.ascontiguousarray(array)
        if self._bytes and self._bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._shards[-1].append((name, array))
        self._bytes += array.nbytes

    def _flush(self):
        # Stream finished shards to temp files so only one shard is held in host memory.
        idx = len(self._shards) - 1
        self._write(os.path.join(self.directory, f".shard{idx}.tmp"), self._shards[-1])
        self._shards[-1] = [(n, None, a.shape, a.dtype) for n, a in self._shards[-1]]
        self._shards.append([])
        self._bytes = 0

    @staticmethod
    def _write(path, tensors):
        header, offset = {}, 0
        for name, a in tensors:
            header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape),
                            "data_offsets": [offset, offset + a.nbytes]}
            offset += a.nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for _, a in tensors:
                f.write(a.tobytes())

    def close(self) -> list:
        if self._shards[-1] or len(self._shards) == 1:
            self._flush()
        shards = [s for s in self._shards if s]
        n = len(shards)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.directory, f".shard{i}.tmp"),
                       os.path.join(self.directory, final))
            for name, _, shape, dtype in shard:
                weight_map[name] = final
                total += int(np.prod(shape)) * dtype.itemsize
        with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        return sorted(set(weight_map.values()))
