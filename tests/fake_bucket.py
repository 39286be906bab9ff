"""A gs:// bucket on the local disk, for tests that cannot reach GCS.

`install(root)` makes `gs://bucket/path` mean `root/bucket/path` for the layers alignjax's remote
workdirs go through: fsspec's "gs" filesystem (what etils epath uses for gs://, in place of
gcsfs) and, for orbax's array data, tensorstore's file driver in place of its GCS driver. Every
alignjax code path stays the gs:// one: URL joins, no rename, no append, uploads.

Run commands against it (`--and` separates them; all run in one process):
    python tests/fake_bucket.py ROOT alignjax train --workdir gs://b/run ... --and convert ...
"""

from __future__ import annotations

import os
import sys


def install(root: str) -> None:
    import fsspec
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem
    from orbax.checkpoint._src.path import gcs_utils

    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)

    class LocalBucket(DirFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, **kwargs):  # epath passes gcsfs options (finalize_on_close)
            super().__init__(path=root, fs=LocalFileSystem())

        def _join(self, path):
            if isinstance(path, (list, tuple)):
                return [self._join(p) for p in path]
            if isinstance(path, str):
                path = path.split("://", 1)[-1]
            return super()._join(path)

    fsspec.register_implementation("gs", LocalBucket, clobber=True)
    fsspec.register_implementation("gcs", LocalBucket, clobber=True)
    gcs_utils.get_kvstore_for_gcs = lambda path: {
        "driver": "file", "path": os.path.join(root, path.split("://", 1)[1])}
    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False  # would ask GCS's API


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[2] != "alignjax":
        sys.exit("usage: python tests/fake_bucket.py ROOT alignjax COMMAND ... [--and COMMAND ...]")
    install(sys.argv[1])
    from alignjax.cli import main
    command = []
    for arg in sys.argv[3:] + ["--and"]:
        if arg == "--and":
            main(command)
            command = []
        else:
            command.append(arg)
