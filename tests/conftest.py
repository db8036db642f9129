"""Shared fixtures. Models are tiny and built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Keep content-hash caches out of the real ~/.cache during tests (subprocesses inherit the variable)."""
    old = os.environ.get("DMD2_CACHE_DIR")
    os.environ["DMD2_CACHE_DIR"] = str(tmp_path_factory.mktemp("dmd2-cache"))
    yield
    if old is None:
        os.environ.pop("DMD2_CACHE_DIR", None)
    else:
        os.environ["DMD2_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_sdxl_paths(tmp_path_factory) -> dict[str, Path]:
    """A tiny random SDXL written both ways: {"diffusers": folder, "single_file": .safetensors} (seed 0, epsilon)."""
    from trainer.testing.tiny_sdxl import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"), seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_file(tiny_sdxl_paths) -> Path:
    return tiny_sdxl_paths["single_file"]


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tiny_sdxl_paths) -> Path:
    return tiny_sdxl_paths["diffusers"]
