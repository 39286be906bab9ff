"""The one base class for problems the user can fix; the CLI prints these without a traceback.

Also the small helpers that turn file-system problems into such errors before any work starts.
"""

from __future__ import annotations

import errno
import os
import tempfile


class UserError(ValueError):
    """Bad input or configuration. The message names the file/line, field or config key, and what to do."""


def describe_os_error(e: OSError) -> str:
    """One line for an OSError that names its path and says what to do (used by cli.main)."""
    path = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        path = f"{path} -> {e.filename2}"
    reason = e.strerror or str(e)
    hint = {
        errno.EROFS: "the file system is read-only; choose a writable location",
        errno.EACCES: "permission denied; choose a location you can write or fix its permissions",
        errno.EPERM: "operation not permitted here; choose a writable location",
        errno.ENOTDIR: "a part of this path is a file, not a directory; fix the path",
        errno.EISDIR: "this is a directory; give a file",
        errno.ENOSPC: "the disk is full; free space or choose another location",
        errno.ENOENT: "no such file or directory; check the path",
    }.get(e.errno)
    return f"{path}: {reason}" + (f" ({hint})" if hint else "")


def require_writable_dir(path: str, flag: str) -> None:
    """Raises UserError unless files can be created at directory ``path`` (created later by the caller).

    Checks the nearest existing ancestor by creating (and removing) a probe directory in it, so a
    parent that is a file, a read-only file system or a virtual one such as /proc or /sys is
    reported up front, naming ``flag``, and nothing is left behind. (Permission bits alone do not
    stop root, so only a real attempt tells.)
    """
    from alignjax import fs
    path = fs.without_file_scheme(path)
    if "://" in path:
        return _require_writable_url(path, flag)
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        target = path
    else:
        if os.path.exists(path):
            raise UserError(f"{flag} {path}: exists and is not a directory; choose a directory path")
        target = os.path.dirname(path)
        while not os.path.exists(target):
            target = os.path.dirname(target)
        if not os.path.isdir(target):
            raise UserError(f"{flag} {path}: {target} is a file, not a directory; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".alignjax-write-check-", dir=target))
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno == errno.ENOENT:  # mkdir in /proc and the like: not a place for files
            reason = "it does not accept new files (a virtual file system such as /proc?)"
        raise UserError(f"{flag} {path}: cannot create files in {target}: {reason}; choose a "
                        "writable directory") from None


def _require_writable_url(url: str, flag: str) -> None:
    """A bucket folder (gs://...): writes and deletes a probe object, so missing credentials, a
    missing bucket or a missing filesystem package are said up front, naming ``flag``."""
    import logging
    from alignjax import fs
    probe = fs.join(url, f".alignjax-write-check-{os.getpid()}")
    quiet = logging.getLogger("gcsfs")  # it logs each failed request's whole traceback
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        fs.write_text(probe, "")
        fs.as_path(probe).unlink()
    except ImportError as e:
        raise UserError(f"{flag} {url}: {e}; install the filesystem package for this URL "
                        "(gs://: pip install 'alignjax[gcs]', which brings gcsfs)") from None
    except Exception as e:  # gcsfs/s3fs raise their own types for credentials, buckets, ...
        raise UserError(f"{flag} {url}: cannot write there ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); check the bucket name "
                        "and your credentials (gcloud auth application-default login)") from None
    finally:
        quiet.setLevel(level)


def require_writable_file(path: str, flag: str) -> None:
    """Like ``require_writable_dir`` for an output file: its directory must accept new files."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a directory; give a file name")
    require_writable_dir(os.path.dirname(path), flag)
