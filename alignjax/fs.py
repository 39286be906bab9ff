"""Run folders that may be local or remote (`gs://bucket/run`, `s3://...`), through one layer:
etils epath, which uses fsspec (gcsfs, s3fs) for URLs and which orbax uses for checkpoints too.

Local paths keep their old behaviour: writes are atomic (a temporary file, then a rename) and
metrics are appended. Object stores have neither rename nor append, but an object upload is
atomic, so remote files are written whole.

`file:///abs/path` is the local filesystem as a URL (what `--workdir file:///...` means).
"""

from __future__ import annotations

import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_url(path: PathLike) -> bool:
    return "://" in os.fspath(path)


def is_remote(path: PathLike) -> bool:
    """A URL other than file://: a bucket reached over the network."""
    s = os.fspath(path)
    return is_url(s) and not s.startswith("file://")


def without_file_scheme(path: PathLike) -> str:
    """file:///abs/path -> /abs/path; any other path or URL as it is."""
    s = os.fspath(path)
    return s[len("file://"):] if s.startswith("file://") else s


def as_path(path: PathLike) -> epath.Path:
    """`path` as an epath.Path: a URL through its fsspec filesystem, a local path made absolute."""
    s = without_file_scheme(path)
    return epath.Path(s) if is_url(s) else epath.Path(os.path.abspath(s))


def canonical(path: PathLike) -> str:
    """An absolute local path (file:// URLs included), or a bucket URL as it is."""
    return os.fspath(as_path(path))


def join(base: PathLike, *parts: str) -> str:
    """`base`/`parts` as a string; keeps a URL's scheme ("gs://b/run" + "tb" -> "gs://b/run/tb")."""
    return os.fspath(as_path(base).joinpath(*parts))


def exists(path: PathLike) -> bool:
    return as_path(path).exists()


def isdir(path: PathLike) -> bool:
    return as_path(path).is_dir()


def listdir(path: PathLike) -> list[str]:
    """The names in folder `path`; [] if it does not exist."""
    p = as_path(path)
    return sorted(child.name for child in p.iterdir()) if p.is_dir() else []


def makedirs(path: PathLike) -> None:
    as_path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: PathLike) -> str:
    return as_path(path).read_text(encoding="utf-8")


def write_text(path: PathLike, text: str) -> None:
    """Writes the whole file so that a reader never sees half of it."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: PathLike, data: bytes) -> None:
    p = as_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        p.write_bytes(data)  # one object upload: atomic on GCS and S3
        return
    tmp = p.parent / f".{p.name}.tmp{os.getpid()}"
    tmp.write_bytes(data)
    os.replace(tmp, p)


def append_text(path: PathLike, text: str) -> None:
    """Appends `text`. An object store cannot append: the object is rewritten whole (metrics files
    are small; a run logging every 10 steps for 100k steps writes about 3 MB)."""
    p = as_path(path)
    if not is_remote(path):
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a", encoding="utf-8") as f:
            f.write(text)
        return
    old = p.read_text(encoding="utf-8") if p.exists() else ""
    write_text(path, old + text)


def rename(src: PathLike, dst: PathLike) -> None:
    """Moves a file or folder (on an object store: copies each object, then deletes the old)."""
    s, d = as_path(src), as_path(dst)
    if not is_remote(src):
        os.rename(s, d)
        return
    for rel in _files(s):
        target = d / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        (s / rel).copy(target)
    s.rmtree()


def put_dir(local_dir: str, dest: PathLike) -> None:
    """Copies the files of local folder `local_dir` into `dest` (for writers that only take a local
    folder, such as transformers' save_pretrained). A local `dest` is the folder itself."""
    d = as_path(dest)
    for root, _, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local_dir)
            target = d / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            epath.Path(os.path.join(root, name)).copy(target, overwrite=True)


def temp_dir(prefix: str) -> str:
    """A new local temporary folder, removed when this process exits: for downloads that a
    reader needs for the whole run (a bucket's tokenizer, say), so none piles up in /tmp."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def get_dir(src: PathLike, local_dir: str) -> str:
    """Copies remote folder `src` into `local_dir` (for readers that only take a local folder);
    returns `local_dir`."""
    s = as_path(src)
    for rel in _files(s):
        target = epath.Path(local_dir) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        (s / rel).copy(target, overwrite=True)
    return local_dir


def _files(folder: epath.Path, prefix: str = "") -> list[str]:
    """The files under `folder`, as paths relative to it (epath refuses `**` globs on buckets)."""
    out = []
    for child in folder.iterdir():
        rel = f"{prefix}{child.name}"
        out.extend(_files(child, rel + "/") if child.is_dir() else [rel])
    return sorted(out)
