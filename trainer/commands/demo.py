"""``dmd2 demo``: the bundled default run (toy digits teacher -> 4-step and 1-step LoRAs -> grid and report in outputs/demo/)."""
from __future__ import annotations

import argparse

from trainer.toy.recipes import DEMO_RECIPES  # plain lists: the command modules load without torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an option of the demo config (trainer/toy/demo.yaml), e.g. --set steps=200")
    parser.add_argument("--recipe", choices=tuple(DEMO_RECIPES), default="demo",
                        help="demo: demo.yaml as it is, both students in about 5 minutes on a 2-core CPU (default); long: "
                        "the quality table's long 4-step and 1-step rows (6x and 9x the iterations, 52 minutes on a 2-core "
                        "CPU here), whose 4-step student meets the 1.1x FID target (benchmarks/toy/RESULTS.md)")
    parser.add_argument("--eval-images", type=_images_per_row, default=1000,
                        help="images per row for the report's metrics (default 1,000, as the quality table)")
    # the demo's own second CPU process (trainer.demo.second_process): the 1-step student, the teacher at 50 steps
    parser.add_argument("--second-process", metavar="ROWS_FILE", help=argparse.SUPPRESS)


def _images_per_row(text: str) -> int:
    from trainer.toy.evaluate import images_per_row  # imported here: the command modules load without torch

    return images_per_row(text)


def run(args) -> int:
    from trainer.demo import run_demo, second_process

    if args.second_process:
        second_process(args.out, args.overrides, args.eval_images, args.second_process, args.recipe)
        return 0
    lora = run_demo(args.out, args.overrides, args.eval_images, args.recipe)
    print(f"LoRA: {lora}")
    return 0
