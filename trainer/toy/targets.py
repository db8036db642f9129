"""Issue 4's targets, the DMD2 paper's claim in miniature, as checks on scored rows (dicts with ``toy_fid`` and
``accuracy``): a few-step student at most 1.1x the teacher-50 row's toy FID and within 2 points of its prompt accuracy,
a 1-step student at most 1.5x, and each better than the teacher at its own step count. The demo's report and the
quality table (``benchmarks/toy/make_table.py``) both judge their rows with these."""
from __future__ import annotations

from typing import NamedTuple

FEW_STEP_FID_RATIO = 1.1
ONE_STEP_FID_RATIO = 1.5
ACCURACY_POINTS = 0.02


class Check(NamedTuple):
    target: str
    measured: str
    met: bool


def few_step_checks(student: dict, teacher_50: dict, teacher_same_steps: dict, name: str = "student 4-step",
                    steps: int = 4) -> list[Check]:
    """The few-step student's three targets; ``name`` says which student (and recipe) in the target's words."""
    fid, t50, tn = student["toy_fid"], teacher_50["toy_fid"], teacher_same_steps["toy_fid"]
    accuracy, t50_accuracy = student["accuracy"], teacher_50["accuracy"]
    return [
        Check(f"{name} FID <= {FEW_STEP_FID_RATIO}x teacher-50 ({FEW_STEP_FID_RATIO * t50:.2f})", f"{fid:.2f} ({fid / t50:.2f}x)",
              fid <= FEW_STEP_FID_RATIO * t50),
        Check(f"{name} accuracy within {100 * ACCURACY_POINTS:.0f} points of teacher-50 ({t50_accuracy:.3f})",
              f"{accuracy:.3f} ({100 * (accuracy - t50_accuracy):+.1f} points)", accuracy >= t50_accuracy - ACCURACY_POINTS),
        Check(f"{name} better than teacher {steps} steps ({tn:.2f})", f"{fid:.2f}", fid < tn),
    ]


def one_step_checks(student: dict, teacher_50: dict, teacher_1: dict) -> list[Check]:
    """The 1-step student's two targets."""
    fid, t50, t1 = student["toy_fid"], teacher_50["toy_fid"], teacher_1["toy_fid"]
    return [
        Check(f"student 1-step FID <= {ONE_STEP_FID_RATIO}x teacher-50 ({ONE_STEP_FID_RATIO * t50:.2f})", f"{fid:.2f} ({fid / t50:.2f}x)",
              fid <= ONE_STEP_FID_RATIO * t50),
        Check(f"student 1-step better than teacher 1 step ({t1:.2f})", f"{fid:.2f}", fid < t1),
    ]


def checks_table(checks: list[Check]) -> list[str]:
    """Markdown rows: target | measured | met."""
    return ["| target | measured | met |", "|---|---|---|",
            *(f"| {c.target} | {c.measured} | {'yes' if c.met else 'no'} |" for c in checks)]
