"""The toy students' recipes: config overrides on top of ``trainer/toy/demo.yaml``, shared by ``dmd2 demo --recipe``
and the quality table (``benchmarks/toy/make_table.py``), so the demo trains what the table's rows train: the default
recipe's 4-step student is the "student 4-step" row's, and ``--recipe long``'s two students are the "student 4-step,
long recipe" and "student 1-step" rows'."""
from __future__ import annotations

# DMD2's 1-step recipe (pure noise in, one step), with the noise read at t = 599 rather than DMD2's 399. On the small
# teachers 599 trains faster and ends level or far better (benchmarks/toy/NOTES.md points 13, 51 and 52); the LoRA
# records it, so `dmd2 generate` and the nodes' "from LoRA" choice sample it there.
ONE_STEP = ["student.timesteps=[599]"]

# DMD2 trains its 1-step generators far longer than its few-step ones. The table's 1-step student gets 9x the demo's
# iterations: from 3x to 6x it still improves on both toy teachers (bundled, three seeds: mean FID 1.63 -> 1.27;
# NOTES.md points 53-54), and from 6x to 9x the bundled one drifts around that level (1.15-1.56 per checkpoint, point
# 55). The mean of its weights over those last 3,600 iterations beats every checkpoint, at three training seeds and on
# the second teacher too (point 56), so that mean is its LoRA.
ONE_STEP_LONG = ["steps=10800", "checkpoint_every=1200", "student.average_from=7200"]

# The 4-step student trained 6x the demo's iterations: its first step's pure noise read at t = 799, a cosine LR (at
# demo.yaml's constant LR a run this long sharpens and at some training seeds collapses past 3,600 iterations, NOTES.md
# points 57, 59-60), the mean of its weights over the last third of the run, as the 1-step student's, and a student
# update that draws 64 samples (student.batch_size=64, the critic's 16): 0.94-0.96x the teacher-50 row at three
# training seeds against batch 16's 1.04-1.12x, for 1.4x the training time (NOTES.md points 77, 80).
LONG_RECIPE = ["student.timesteps=[799,599,399,199]", "steps=7200", "checkpoint_every=1200", "optim.lr_schedule=cosine",
               "student.average_from=4800", "student.batch_size=64"]
# ... and a critic that weighs its GAN loss 4x demo.yaml's 0.05 (gan.critic_weight=0.2, as much as the student does;
# DMD2 weighs the critic's twice the student's): on the second teacher that holds the student's prompt accuracy at
# three training seeds, where 0.05 loses 3.5 points on average, and on the bundled one it keeps the FID level
# (1.04-1.12x the teacher-50 row at three training seeds, 0.05: 1.06-1.12x; NOTES.md points 61, 68).
LONG_FOUR_STEP = [*LONG_RECIPE, "gan.critic_weight=0.2"]

# `dmd2 demo --recipe NAME`: (the 4-step student's overrides, the 1-step student's besides ONE_STEP)
DEMO_RECIPES = {
    "demo": ([], []),  # demo.yaml as it is: both students in about 5 minutes on a 2-core CPU
    "long": (LONG_FOUR_STEP, ONE_STEP_LONG),  # the table's "student 4-step, long recipe" and "student 1-step" rows
}


def override(overrides: list[str], key: str) -> str | None:
    """The value a list of ``key=value`` overrides sets for ``key`` (the last one wins, as in ``load_config``), or None."""
    return dict(o.split("=", 1) for o in overrides).get(key)
