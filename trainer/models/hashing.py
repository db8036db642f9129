"""Content hashes of model files, cached so a multi-GB checkpoint is read once.

The hash is the sha256 of the file's bytes (a folder: of its weight files' bytes, in sorted relative-path order).
The cache is a small JSON file keyed by absolute path + size + mtime, so an edited or replaced file is re-hashed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from trainer.files import write_text_atomic

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_CHUNK = 8 << 20


def cache_dir() -> Path:
    return Path(os.environ.get("DMD2_CACHE_DIR") or Path.home() / ".cache" / "comfy-dmd2")


def weight_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)),
                  key=lambda p: p.relative_to(folder).as_posix())


def _fingerprint(path: Path) -> str:
    files = weight_files(path) if path.is_dir() else [path]
    stats = [(f.relative_to(path).as_posix() if path.is_dir() else "", f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return json.dumps([os.fspath(path.resolve()), stats])


def _load_cache(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a missing or damaged cache only costs a re-hash


def _save_cache(file: Path, cache: dict) -> None:
    try:
        write_text_atomic(file, json.dumps(cache))
    except OSError:
        pass  # a read-only home must not stop a load


def file_sha256(path: str | os.PathLike, digest=None) -> str:
    """sha256 hex digest of one file's bytes, read in chunks (uncached; ``digest`` continues an existing hash)."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(path: str | os.PathLike) -> str:
    """sha256 hex digest of a weight file, or of a folder's weight files concatenated in sorted order."""
    path = Path(path)
    key = _fingerprint(path)
    cache_file = cache_dir() / "hashes.json"
    cache = _load_cache(cache_file)
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    for f in weight_files(path) if path.is_dir() else [path]:
        file_sha256(f, digest)
    cache[key] = digest.hexdigest()
    _save_cache(cache_file, cache)
    return cache[key]
