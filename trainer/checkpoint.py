"""Training checkpoints: both adapters (or the full critic), the GAN head, optimiser and LR-scheduler states, RNG
states, the step and the config. Each checkpoint is a folder ``checkpoints/step-00001000`` written under a temporary
name and renamed into place, so a crash or Ctrl-C never leaves a half-written checkpoint behind."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer.errors import ConfigError
from trainer.files import new_file_mode

STATE_FILE = "state.json"


def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def find_checkpoint(output_dir: Path, which: str) -> Path:
    """``latest`` -> the newest complete checkpoint in ``output_dir``; otherwise a checkpoint folder path."""
    if which == "latest":
        found = _checkpoint_dirs(output_dir)
        if not found:
            raise ConfigError(f"--resume latest: no checkpoint in {output_dir / 'checkpoints'}: start without --resume")
        return found[-1]
    path = Path(which)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"--resume {which}: not a checkpoint folder (no {STATE_FILE}): pass `latest` or a checkpoints/step-N folder")
    return path


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, step: int, *, weights: dict[str, dict[str, torch.Tensor]], training_state: dict,
                    info: dict, keep: int = 2) -> Path:
    """``weights``: file stem -> state dict (saved as safetensors); ``training_state``: optimiser/scheduler/RNG state
    (torch.save, read back with ``weights_only=True``); ``info``: JSON (step, config, ...)."""
    root = output_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for stem, state in weights.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / f"{stem}.safetensors")
        os.chmod(tmp / f"{stem}.safetensors", new_file_mode())  # safetensors writes 0o600
    torch.save(training_state, tmp / "training_state.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **info}, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """(weights by file stem, training state, info) of a checkpoint folder."""
    weights = {p.stem: load_file(p) for p in sorted(path.glob("*.safetensors"))}
    # Our own file, holding only tensors and plain containers: the restricted (weights-only) unpickler suffices.
    training_state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    info = json.loads((path / STATE_FILE).read_text())
    return weights, training_state, info
