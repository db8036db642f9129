"""``dmd2 train --config run.yaml [--set key=value ...] [--resume latest]``"""
from __future__ import annotations

import argparse

from trainer.config import TrainConfig, dump_yaml, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the run's options (see --print-config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any option, e.g. --set steps=2000 --set student.timesteps=[399]")
    parser.add_argument("--resume", metavar="latest|DIR", help="continue from the newest checkpoint in output_dir, or from a checkpoint folder")
    parser.add_argument("--num-processes", type=int, default=1, metavar="N",
                        help="data-parallel processes on this machine (one per GPU; CPU processes use gloo): starts `accelerate launch` for you")
    parser.add_argument("--print-config", action="store_true", help="print every option with its value (defaults merged with --config/--set) and exit")


def run(args) -> int:
    if args.print_config:
        cfg = load_config(args.config, args.overrides) if (args.config or args.overrides) else TrainConfig()
        print(dump_yaml(cfg), end="")
        return 0
    import os
    import subprocess

    cfg = load_config(args.config, args.overrides).validate()
    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:  # not yet inside a launched process group
        from trainer.distributed import launch_command

        forwarded = (["--config", args.config] if args.config else []) + [a for o in args.overrides for a in ("--set", o)]
        forwarded += ["--resume", args.resume] if args.resume else []
        return subprocess.call(launch_command(args.num_processes, forwarded))
    from trainer.train import train

    lora = train(cfg, resume=args.resume)
    if lora is None:
        return 130
    if os.environ.get("RANK", "0") == "0":  # under data parallelism only the main process reports
        print(f"LoRA: {lora}")
    return 0
