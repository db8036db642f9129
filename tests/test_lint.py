"""The source tree stays free of what pyflakes finds: unused imports, undefined names, shadowed loop variables."""
from __future__ import annotations

from pathlib import Path

from pyflakes.api import checkRecursive
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parents[1]


class _Collect(Reporter):
    def __init__(self):
        self.lines: list[str] = []

    def unexpectedError(self, filename, message):
        self.lines.append(f"{filename}: {message}")

    def syntaxError(self, filename, msg, lineno, offset, text):
        self.lines.append(f"{filename}:{lineno}: {msg}")

    def flake(self, message):
        self.lines.append(str(message))


def test_pyflakes_finds_nothing():
    paths = [str(ROOT / p) for p in ("trainer", "comfy_dmd2", "gradio_app", "benchmarks", "tests", "__init__.py")]
    report = _Collect()
    checkRecursive(paths, report)
    assert report.lines == [], "\n".join(report.lines)
