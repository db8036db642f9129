"""Writing output files so that none is ever half-written: the bytes go to a temp file beside the target, which is
renamed into place only once complete (``os.replace`` is atomic within one file system). A crash, a full disk or
Ctrl-C leaves the previous file or none, never a torn one; an error or Ctrl-C also deletes the temp file (a killed
process can leave a hidden ``.NAME.*.tmp`` beside it). The finished file gets the permissions a plain ``open`` would
give it (0o666 less the umask; a file it replaces keeps its own), whatever the writer chose: safetensors writes its
files readable by their owner only, and a LoRA that a ComfyUI running as another user cannot read is no use."""
from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only read it by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open`` gives a file it creates: 0o666 less the umask."""
    return 0o666 & ~_umask()


def plain_mode(path: str | os.PathLike) -> int:
    """The mode ``open(path, "w")`` would leave: an existing file's own, else a new file's."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return new_file_mode()


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write the whole file to; it replaces ``path`` when the block succeeds and is
    deleted when it raises. The temp name is unique, so parallel writers of one file never share a temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # same folder: a rename never crosses disks
    try:
        yield tmp
        os.chmod(tmp, plain_mode(path))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``Path.write_text`` (UTF-8), but all or nothing."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
