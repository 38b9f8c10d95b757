"""Run files on a local path or at a URL (`gs://bucket/...`): one set of helpers for workdirs, exports and shards.

A local path keeps local-file semantics: `write_atomically` writes a temporary file beside the target, flushes
it to disk and `os.replace`s it. A URL goes through `etils.epath` (fsspec; `gcsfs` for gs://), where one object
write is already atomic (readers see the old object or the new one, never a mix), and there is no rename to
lean on (a "rename" on an object store is a copy and a delete): such files are written in one request.

Which URLs work where:
- a training workdir (`--workdir`): `gs://` only. Orbax writes arrays with TensorStore, whose object-store
  driver Orbax 0.12 picks for `gs://` alone; other schemes are refused (`check_url`) rather than misread as
  local relative paths.
- shards (`config.data.shards`): `gs://` only; ArrayRecord's reader opens local files and `gs://` objects.
- exports (`encoder.save`, `load_encoder`) and the run files (metrics, config, summary): any epath URL.
Reaching gs:// through epath needs `gcsfs` (`pip install 'audiojepa[gcs]'`), unless TensorFlow is installed
(epath then uses tf.io.gfile).
"""

from __future__ import annotations

import contextlib
import glob as glob_lib
import importlib.util
import os
import re
import shutil

from etils import epath

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def url_scheme(path) -> str | None:
    """"gs" for "gs://bucket/x", None for a local path."""
    found = _URL.match(os.fspath(path))
    return found.group(1).lower() if found else None


def is_url(path) -> bool:
    return url_scheme(path) is not None


def check_url(path, *, what: str, schemes: tuple[str, ...] = ("gs",)) -> None:
    """Raises ValueError naming `what` (e.g. "--workdir") when `path` is a URL of a scheme other than `schemes`,
    or a gs:// URL without the client epath needs (gcsfs, or TensorFlow). Local paths pass."""
    scheme = url_scheme(path)
    if scheme is None:
        return
    if scheme not in schemes:
        raise ValueError(f"{what}={path}: {scheme}:// is not supported here; use a local path (or a mount) or "
                         f"{' or '.join(s + '://' for s in schemes)}")
    if scheme == "gs" and not any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")):
        raise ValueError(f"{what}={path}: reading and writing gs:// needs gcsfs (pip install 'audiojepa[gcs]' or "
                         "pip install gcsfs)")


def join(path, *parts: str) -> str:
    """os.path.join that keeps a URL's "scheme://" (also on paths given as epath.Path)."""
    return os.path.join(os.fspath(path), *parts)


def absolute(path) -> str:
    """A local path made absolute; a URL as it is (os.path.abspath would turn gs://b into ./gs:/b)."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def exists(path) -> bool:
    return epath.Path(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path) -> bool:
    """On an object store: whether any object lies under `path/`."""
    return epath.Path(path).is_dir() if is_url(path) else os.path.isdir(path)


def makedirs(path) -> None:
    """os.makedirs(exist_ok=True); on an object store folders need no creating, so nothing is written."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def read_bytes(path) -> bytes:
    if is_url(path):
        return epath.Path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode()


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob pattern; on an object store `*` and `?` within one level (no `**`)."""
    if not is_url(pattern):
        return sorted(glob_lib.glob(pattern))
    root = pattern
    while any(c in root for c in "*?["):
        root = os.path.dirname(root)
    relative = pattern[len(root):].lstrip("/")
    return sorted(os.fspath(p) for p in epath.Path(root).glob(relative)) if relative else (
        [pattern] if exists(pattern) else [])


def write_atomically(path, data: bytes | str) -> None:
    """Writes `data` to `path` so that a reader (or a crash) never sees a partial file.

    Local: through a temporary file beside it (`<path>.<pid>.tmp`, flushed to disk), then os.replace. URL: one
    object write, which the store commits whole.
    """
    data = data.encode() if isinstance(data, str) else data
    if is_url(path):
        epath.Path(path).write_bytes(data)
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def copy_file(src, dst) -> None:
    """Copies one file (local or URL) to `dst` (local or URL), replacing it."""
    if is_url(src) or is_url(dst):
        epath.Path(dst).write_bytes(read_bytes(src))
    else:
        shutil.copyfile(src, dst)


def remove_tree(path) -> None:
    """Removes a folder and everything under it (nothing if it is missing)."""
    if is_url(path):
        with contextlib.suppress(FileNotFoundError):
            if epath.Path(path).exists():
                epath.Path(path).rmtree()
        return
    shutil.rmtree(path, ignore_errors=True)


def move(src, dst) -> None:
    """Moves a file or folder to `dst` (whose parent must exist, locally); an object store copies and deletes."""
    if is_url(src) or is_url(dst):
        epath.Path(src).rename(dst)
    else:
        os.replace(src, dst)
