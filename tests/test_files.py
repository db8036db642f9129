"""All-or-nothing output files (trainer/files.py): the old file survives a failed write, and no temp file stays."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from trainer import export
from trainer.checkpoint import save_checkpoint
from trainer.export import save_safetensors_atomic
from trainer.files import atomic_write, write_text_atomic
from trainer.generate import save_png_atomic


def test_write_text_atomic_replaces_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "sub" / "report.md"  # the folder is made on the way
    write_text_atomic(target, "first ü\n")
    write_text_atomic(target, "second\n")
    assert target.read_text(encoding="utf-8") == "second\n"
    assert [p.name for p in target.parent.iterdir()] == ["report.md"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path, error):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(type(error)):
        with atomic_write(target) as tmp:
            tmp.write_text("half of the new")
            raise error
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_png_and_safetensors_writers_are_all_or_nothing(tmp_path, monkeypatch):
    png, lora = tmp_path / "grid.png", tmp_path / "lora.safetensors"
    save_png_atomic(Image.new("RGB", (4, 4), "white"), png)
    save_safetensors_atomic({"w": torch.ones(2)}, lora, {"k": "v"})
    before = png.read_bytes(), lora.read_bytes()

    def torn_save(self, fp, *args, **kwargs):  # writes a few bytes, then the disk fills up
        with open(fp, "wb") as f:
            f.write(b"\x89PNG")
        raise OSError("No space left on device")

    def torn_save_file(tensors, filename, metadata=None):  # the same for safetensors' writer
        with open(filename, "wb") as f:
            f.write(b"\x08\x00")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", torn_save)
    monkeypatch.setattr(export, "save_file", torn_save_file)
    with pytest.raises(OSError, match="No space"):
        save_png_atomic(Image.new("RGB", (4, 4), "black"), png)
    with pytest.raises(OSError, match="No space"):
        save_safetensors_atomic({"w": torch.zeros(2)}, lora)
    assert (png.read_bytes(), lora.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "lora.safetensors"]


def test_finished_files_get_the_mode_open_would_give_whatever_the_writer_chose(tmp_path):
    # safetensors creates its files 0o600: a LoRA must be as readable as any other file the user writes
    old = os.umask(0o022)
    try:
        lora = save_safetensors_atomic({"w": torch.ones(2)}, tmp_path / "a.safetensors")
        text = write_text_atomic(tmp_path / "a.md", "x")
        weights = {"student": {"w": torch.ones(2)}}
        folder = save_checkpoint(tmp_path / "run", 1, weights=weights, training_state={}, info={})
        os.umask(0o027)
        private = save_safetensors_atomic({"w": torch.ones(2)}, tmp_path / "b.safetensors")
        os.chmod(text, 0o600)  # an existing file keeps its own mode, as with open(path, "w")
        write_text_atomic(text, "y")
    finally:
        os.umask(old)
    files = [lora, text, folder / "student.safetensors", private]
    assert [p.stat().st_mode & 0o777 for p in files] == [0o644, 0o600, 0o644, 0o640]
