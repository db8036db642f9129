"""Writing output files so that none is ever half-written: the bytes go to a temp file beside the target, which is
renamed into place only once complete (``os.replace`` is atomic within one file system). A crash, a full disk or
Ctrl-C leaves the previous file or none, never a torn one; an error or Ctrl-C also deletes the temp file (a killed
process can leave a hidden ``.NAME.*.tmp`` beside it)."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write the whole file to; it replaces ``path`` when the block succeeds and is
    deleted when it raises. The temp name is unique, so parallel writers of one file never share a temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # same folder: a rename never crosses disks
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``Path.write_text`` (UTF-8), but all or nothing."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
