"""Atomic file output: write beside the target, then rename, so no reader ever sees a partial file.

Temporary files and directories (`mkstemp`, `mkdtemp`) are created private (0600/0700); everything
published here gets the permissions a plain `open()` or `mkdir()` would give under the process umask.
Every OS failure becomes a one-line `UserError` naming the path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lc_onnx.errors import UserError


def umask() -> int:
    """The process umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_public(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a directory tree) the permissions `open()`/`mkdir()` would have given."""
    mask = umask()
    root = Path(path)
    if not root.is_dir():
        os.chmod(root, 0o666 & ~mask)
        return
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


def writable_parent(path: Path) -> Path:
    """The directory `path` will be written into, checked to exist and be writable."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"{path}: is a directory")
    if not parent.is_dir():
        raise UserError(f"{path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{path}: directory {parent} is not writable")
    return parent


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (an exporter, a serializer);
    it replaces `path`, with the permissions a plain `open()` gives, only if the block succeeds.

    This is the one atomic writer: `atomic_open`, `write_text` and model saving build on it.
    """
    out = Path(path)
    parent = writable_parent(out)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        yield Path(tmp)
        make_public(tmp)
        os.replace(tmp, out)
        tmp = None
    except OSError as exc:
        raise UserError(f"{out}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; it replaces `path` only if the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes ('w' or 'wb'), got mode {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The parsed JSON file at `path`; a missing or unreadable one is a one-line `UserError` that calls
    it `what` ("fits file", "JSON report", ...)."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{p}: not a readable {what} ({exc})") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically replace `path` by `text`."""
    with atomic_open(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def staging_dir(parent: str | os.PathLike | None, prefix: str = ".lc-onnx-") -> Iterator[Path]:
    """A private temporary directory in `parent` (same filesystem as the target), removed afterwards."""
    try:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as exc:
        raise UserError(f"cannot write to {parent or tempfile.gettempdir()}: {exc.strerror or exc}") from None
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
