"""Atomic file writes: an output is complete or untouched, never half-written.

Every writer of ctsynth (volumes, DICOM folders, checkpoints, reports, geometry files, previews) writes to a
temporary name in the target's folder, flushes it to disk and renames it over the target (``os.replace`` is
atomic on one file system). A failure (a full disk, a crash, a refused value) leaves the previous file as it
was, removes the temporary one, and raises :class:`OutputWriteError` naming the file and the fix.

Example::

    atomic_write_json({"psnr": 31.2}, "eval/metrics.json")
    atomic_write(lambda tmp: fig.savefig(tmp), "eval/curves.png")
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["OutputWriteError", "output_write_error", "atomic_write", "atomic_write_text", "atomic_write_json"]


class OutputWriteError(OSError):
    """An output could not be written (disk full, no permission, ...); nothing partial was left behind."""


def output_write_error(path: str | Path, error: OSError) -> OutputWriteError:
    """The error to raise when writing ``path`` failed with ``error``: names the file, says that nothing was
    left half-written (an existing file is unchanged) and what to do."""
    reason = error.strerror or str(error)
    return OutputWriteError(error.errno, f"{path}: could not be written ({reason}); nothing partial was left and any "
                                         "previous file there is unchanged. Free disk space or write elsewhere (--out)")


def atomic_write(write: Callable[[Path], Any], path: str | Path, suffix: str | None = None) -> Path:
    """Calls ``write(tmp)`` for a temporary file beside ``path`` (same suffix, so writers that go by the name,
    such as nibabel's ``.nii.gz`` compression or matplotlib's format, do the same), then renames it to ``path``.

    Raises:
        OutputWriteError: ``path`` (or its folder) could not be written; the previous file is unchanged.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputWriteError(21, f"{path}: is a folder; give a file name for this output")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        name_suffix = suffix if suffix is not None else "".join(path.suffixes[-2:]) or ".tmp"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=name_suffix, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise output_write_error(path, e) from None
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputWriteError):
            raise output_write_error(path, e) from None
        raise
    return path


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(lambda tmp: tmp.write_text(text, encoding="utf-8"), path)


def atomic_write_json(obj: Any, path: str | Path, indent: int = 2) -> Path:
    """Writes ``obj`` as JSON to ``path`` atomically (serialised first: a value JSON cannot hold changes nothing)."""
    return atomic_write_text(json.dumps(obj, indent=indent) + "\n", path)
