"""The toy quality table in one command: the bundled digits teacher against its DMD2 students and the paper's
ablations, same prompts and seeds in every row, scored by the toy evaluator.

    python benchmarks/toy/make_table.py --jobs 2       # resumable; see the README for timings
    python benchmarks/toy/make_table.py --n 200 --steps 50 --work /tmp/t --out /tmp/t  # a quick smoke run
    python benchmarks/toy/make_table.py --teacher outputs/teacher2/digits_teacher.safetensors  # another teacher
        # (from `train_teacher.py --out outputs/teacher2`); students and table go to outputs/toy_table-<hash>/
    python benchmarks/toy/make_table.py --teacher my_teacher/ --resolution 64  # a diffusers folder trained at 64x64
    python benchmarks/toy/make_table.py --rows student-4-long,full-critic-long  # after those rows' recipe changed

Rows: the teacher at 50 Euler steps with its best CFG (a sweep picks it), the teacher at 4 and 1 steps with that
CFG; the 4-, 2- and 1-step students (the demo's config, `trainer/toy/demo.yaml`: the 4-step student is trained
exactly as `dmd2 demo` trains its LoRA, the 1-step student gets 9x its iterations); the 4-step student's long recipe
(6x the iterations, a cosine LR); and DMD2's ablations on each 4-step recipe: without the GAN loss, without
backward simulation, and a full critic instead of the LoRA critic.
Students are trained with the real trainer into `--work` (`--jobs 2`: in two processes first); a student whose LoRA
exists is not trained again (`--train-only` trains some), and one trained with another config or teacher is refused.
Ctrl-C stops every student in training with a checkpoint (and starts no other); the same command then resumes them.
`--rows` re-scores only some students (e.g. after their recipe changed) and keeps the other rows of `--out`'s table.
Every row is also scored by two second-opinion classifiers (the evaluator's classifier trained with seeds 1 and 2).
Writes `results.json` (rows with name, steps, toy_fid, accuracy, diversity, seconds_per_image, image_size and
second_opinion: toy_fid and accuracy per second-opinion classifier; a student's row also its id, `student`),
`results_full.json` (also the teacher's CFG sweep and each student's training config) and `RESULTS.md` into `--out`.
Each row is sampled at every seed of `--seeds` (1,000 images each by default); its numbers are the means over them,
and `per_seed` keeps each seed's (one seed's FID moves by about +-0.1 on the teacher and the students alike, NOTES.md
point 30).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trainer.config import TrainConfig, dump_yaml, load_config  # noqa: E402
from trainer.demo import demo_config_path, last_error, start_logged, trained_or_exit, write_demo_data  # noqa: E402
from trainer.errors import DMD2Error  # noqa: E402
from trainer.export import read_lora, with_lora  # noqa: E402
from trainer.files import write_text_atomic  # noqa: E402
from trainer.models.hashing import content_hash  # noqa: E402
from trainer.models.loading import load_sdxl  # noqa: E402
from trainer.toy.evaluate import ToyEvaluator, images_per_row  # noqa: E402
from trainer.toy.recipes import LONG_FOUR_STEP, LONG_RECIPE, ONE_STEP, ONE_STEP_LONG, override  # noqa: E402
from trainer.toy.rows import Row, sample_row  # noqa: E402
from trainer.toy.targets import few_step_checks, one_step_checks  # noqa: E402
from trainer.toy.teacher import teacher_path  # noqa: E402

CFG_SWEEP = (1.25, 1.5, 2.0, 3.0)  # the committed teacher evaluation (teacher_results.json) sweeps 1..6
SEEDS = (0, 1, 2)  # sampling seeds: every row is sampled (1,000 images by default) and scored at each
# The same classifier trained with other seeds (`train_classifier.py --seed 1|2 --out ...`). Every row is also scored
# with them: a student tuned against one feature extractor can look better to it than to another (NOTES.md point 27).
SECOND_OPINION = tuple(ROOT / "benchmarks" / "toy" / "second_opinion" / f"digit_classifier_seed{s}.safetensors" for s in (1, 2))
SECOND_OPINION_NAMES = tuple(path.stem.rsplit("_", 1)[1] for path in SECOND_OPINION)  # "seed1", "seed2"


def load_evaluators() -> dict[str, ToyEvaluator]:
    """The committed classifier ("committed") and the second opinions (by SECOND_OPINION_NAMES), in that order."""
    return {"committed": ToyEvaluator.load(), **{name: ToyEvaluator.load(path) for name, path in zip(SECOND_OPINION_NAMES, SECOND_OPINION)}}

# A whole UNet copy learns faster than a LoRA at the same LR: at demo.yaml's 2e-3 the full critic collapses the
# student's styles (diversity 0.92, FID 2.32 over checkpoints); at 5e-4 (the GAN head kept at 2e-3) it is level with
# the LoRA critic or slightly worse, which is the comparison worth a row (NOTES.md point 32).
FULL_CRITIC = ["critic=full", "dmd.critic_lr=5e-4", "gan.head_lr=2e-3"]

# id -> (row name, sampling steps, config overrides on top of demo.yaml). The long recipe's ablations share its
# overrides (trainer/toy/recipes.py), so each compares like with like.
STUDENTS = {
    "student-4": ("student 4-step", 4, []),
    "student-4-long": ("student 4-step, long recipe", 4, LONG_FOUR_STEP),
    "student-2": ("student 2-step", 2, ["student.timesteps=2"]),
    # the demo's 1-step recipe trained 9x as long, with the mean of its weights (trainer/toy/recipes.py); `--steps`
    # wins, and the mean then covers the same share of the run
    "student-1": ("student 1-step", 1, [*ONE_STEP, *ONE_STEP_LONG]),
    "no-gan": ("4-step, without GAN loss", 4, ["gan.real_data=none"]),
    "no-backsim": ("4-step, without backward simulation", 4, ["student.backward_simulation=false"]),
    "full-critic": ("4-step, full critic (critic LR 5e-4) instead of LoRA critic", 4, FULL_CRITIC),
    "no-gan-long": ("4-step long recipe, without GAN loss", 4, [*LONG_RECIPE, "gan.real_data=none"]),  # no GAN, no GAN weight
    "no-backsim-long": ("4-step long recipe, without backward simulation", 4, [*LONG_FOUR_STEP, "student.backward_simulation=false"]),
    "full-critic-long": ("4-step long recipe, full critic (critic LR 5e-4) instead of LoRA critic", 4, [*LONG_FOUR_STEP, *FULL_CRITIC]),
}
# the two 4-step recipes: (student id, its ablations' id suffix, how the targets name it)
FOUR_STEP_RECIPES = (("student-4", "", "demo.yaml"), ("student-4-long", "-long", "long recipe"))


def student_config(sid: str, work: Path, data: tuple[Path, Path], steps: int | None, teacher: Path | None = None,
                   resolution: int | None = None) -> TrainConfig:
    """demo.yaml + the student's overrides (+ ``--steps``, ``--resolution``), trained from ``teacher`` into ``work/sid``."""
    prompts, images = data
    overrides = with_steps(STUDENTS[sid][2], steps) if steps else STUDENTS[sid][2]
    extra = [f"resolution={resolution}"] if resolution else []
    return load_config(demo_config_path(), overrides + extra,
                       base={"model": str(teacher or teacher_path()), "prompts": str(prompts), "images": str(images), "output_dir": str(work / sid)})


def with_steps(overrides: list[str], steps: int) -> list[str]:
    """A row's overrides for ``steps`` iterations (`--steps`): its own ``steps=`` goes, and an averaging window
    (``student.average_from``) keeps its share of the run."""
    out = [o for o in overrides if not o.startswith(("steps=", "student.average_from="))] + [f"steps={steps}"]
    if (average_from := override(overrides, "student.average_from")) is not None:
        out.append(f"student.average_from={int(average_from) * steps // int(override(overrides, 'steps'))}")
    return out


# where a run read and wrote, and how often it kept checkpoints and drew validation images, not what it trained
# (validation draws from generators of its own); the teacher is compared by content (dmd2.teacher_hash), not path
_WHERE_KEYS = ("model", "output_dir", "prompts", "images", "keep_checkpoints", "validate_every")


def trained_config(cfg: TrainConfig) -> dict:
    """What ``cfg`` trains, as plain data: every key but those of ``_WHERE_KEYS``. Through the loader, so keys added to
    the config since (at their defaults) compare equal."""
    return _trained_keys(cfg.validate())


def _trained_keys(cfg: TrainConfig) -> dict:
    return {k: v for k, v in yaml.safe_load(dump_yaml(cfg)).items() if k not in _WHERE_KEYS}


def _differing(was: dict, now: dict) -> list[str]:
    return sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))


def trained_lora(work: Path, sid: str, teacher: Path | None, cfg: TrainConfig) -> Path | None:
    """The LoRA a previous (or `--train-only`) run already wrote for this student from this teacher with this config,
    if any. A folder trained (or started) with another config, or whose LoRA came from another teacher, is refused:
    never reused or resumed."""
    saved = work / sid / "config.yaml"
    if saved.is_file():
        differ = _differing(trained_config(load_config(saved)), trained_config(cfg))
        if differ:
            raise SystemExit(f"error: {work / sid} was trained with another config ({', '.join(differ)}): delete it or pass a "
                             "fresh --work")
    done = sorted((work / sid).glob("dmd2_*_lora.safetensors"))
    if not done:
        return None
    trained_from = read_lora(done[-1])[1].get("dmd2.teacher_hash")
    if trained_from != content_hash(teacher or teacher_path()):
        raise SystemExit(f"error: {done[-1]} was distilled from another teacher: pass a fresh --work for this one")
    return done[-1]


def train_student(sid: str, work: Path, data: tuple[Path, Path], steps: int | None, teacher: Path | None = None,
                  resolution: int | None = None) -> tuple[Path, bool]:
    """The student's LoRA, and whether it was trained (or finished) by this call rather than reused."""
    from trainer.train import train

    cfg = student_config(sid, work, data, steps, teacher, resolution)
    done = trained_lora(work, sid, teacher, cfg)
    if done:
        print(f"{sid}: reusing {done}")
        return done, False
    resume = "latest" if (work / sid / "checkpoints").is_dir() else None
    return trained_or_exit(train(cfg, resume=resume), sid, work / sid / "checkpoints"), True  # Ctrl-C: no next student


def train_in_parallel(jobs: int, work: Path, data: tuple[Path, Path], steps: int | None, teacher: Path | None,
                      resolution: int | None, only: list[str] | None = None) -> None:
    """Train the students (``only`` these, default all) that have no LoRA yet in ``jobs`` processes (``--train-only``,
    one CPU thread share each), the longest first onto the least loaded process; each writes its log to
    ``work/train-<i>.log``. The tiny models leave most of a second thread idle, so on 2 cores two processes get through
    1.6-2x the iterations of one (NOTES.md point 40)."""
    todo = {}
    for sid in only or STUDENTS:
        cfg = student_config(sid, work, data, steps, teacher, resolution)
        if trained_lora(work, sid, teacher, cfg) is None:  # also refuses a folder from another config or teacher
            todo[sid] = cfg.steps  # the toy's full critic costs about what the LoRA critic does per iteration
    groups: list[list[str]] = [[] for _ in range(min(jobs, len(todo)))]
    for sid in sorted(todo, key=todo.get, reverse=True):
        min(groups, key=lambda g: sum(todo[i] for i in g)).append(sid)
    flags = ["--work", str(work)] + (["--steps", str(steps)] if steps else []) + (["--teacher", str(teacher)] if teacher else [])
    flags += ["--resolution", str(resolution)] if resolution else []
    threads = max(1, torch.get_num_threads() // max(1, len(groups)))  # torch's count follows OMP_NUM_THREADS, as the demo's
    running = []
    for i, group in enumerate(groups):
        log = work / f"train-{i}.log"
        print(f"training {', '.join(group)} in a parallel process (log: {log})", flush=True)
        running.append((start_logged([sys.executable, __file__, *flags, "--train-only", ",".join(group)], log, threads), log))
    try:
        codes = [proc.wait() for proc, _ in running]
    except KeyboardInterrupt:  # a terminal's Ctrl-C reached the processes too: each ends its iteration with a checkpoint
        for proc, _ in running:
            proc.wait()
        raise SystemExit(f"error: stopped at Ctrl-C (the students' checkpoints are kept in {work}): run the same command again "
                         "to resume") from None
    failed = [log for (_, log), code in zip(running, codes) if code != 0]
    if failed:
        raise SystemExit(f"error: training students failed ({', '.join(map(str, failed))}): {last_error(failed[0])}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=images_per_row, default=1000, help="images per row (digits 0-9 cycled)")
    p.add_argument("--seeds", type=seed_list, default=SEEDS, metavar="S,S,...", help="sampling seeds; a row's numbers "
                   "are the means over them (default: " + ",".join(map(str, SEEDS)) + ")")
    p.add_argument("--steps", type=int, default=None, help="training iterations per student (default: demo.yaml's, as "
                   "`dmd2 demo` trains)")
    p.add_argument("--teacher", type=Path, default=None, help="another digits teacher: a single-file SDXL checkpoint (e.g. "
                   "from `train_teacher.py --out`) or a diffusers folder; default: the bundled one")
    p.add_argument("--resolution", type=int, default=None, help="the teacher's image size, for sampling and for training the "
                   "students (default: demo.yaml's, 32); images are scored at 32x32")
    p.add_argument("--work", type=Path, default=None, help="where students are trained (default: outputs/toy_table, "
                   "or outputs/toy_table-<hash> for --teacher)")
    p.add_argument("--out", type=Path, default=None, help="where the table goes (default: benchmarks/toy, or --work for "
                   "--teacher)")
    p.add_argument("--cfg-sweep", type=_cfg_list, default=CFG_SWEEP, metavar="W,W,...", help="the teacher's 50-step "
                   "guidance scales; the best is the teacher-50 row (default: " + ",".join(f"{w:g}" for w in CFG_SWEEP) + ")")
    p.add_argument("--train-only", metavar="IDS", help=f"only train these students (comma-separated: {','.join(STUDENTS)}), e.g. to "
                   "train several in parallel processes before one run that evaluates everything")
    p.add_argument("--rows", metavar="IDS", help="re-score only these students (training any without a LoRA), e.g. after "
                   "their recipe changed, and keep the teacher's and the other students' rows of --out's table, which must "
                   "have been made with the same teacher and --n, --seeds, --steps, --resolution and --cfg-sweep")
    p.add_argument("--jobs", type=int, default=1, help="train the students in this many processes first (e.g. 2 on a "
                   "2-core CPU: 1.6-2x faster), then evaluate in this one; with --train-only, only those students and no evaluation")
    args = p.parse_args()
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs {args.jobs}: pass the number of training processes, 1 or more")
    only = student_ids("--train-only", args.train_only)
    rescore = student_ids("--rows", args.rows)
    if args.teacher is not None and not args.teacher.exists():
        raise SystemExit(f"error: teacher {args.teacher} does not exist: pass a single-file checkpoint or a diffusers folder")
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        raise SystemExit(f"error: --resolution {args.resolution} is not a positive multiple of 8: pass the size the teacher was trained at, e.g. 32")
    args.work = args.work or ROOT / "outputs" / ("toy_table" + (f"-{content_hash(args.teacher)[:8]}" if args.teacher else ""))
    args.out = args.out or (args.work if args.teacher else ROOT / "benchmarks" / "toy")
    args.work.mkdir(parents=True, exist_ok=True)
    data = write_demo_data(args.work / "data")
    if only:
        if args.jobs > 1:
            train_in_parallel(args.jobs, args.work, data, args.steps, args.teacher, args.resolution, only=only)
        for sid in only:  # after parallel training: reports each LoRA as reused
            train_student(sid, args.work, data, args.steps, args.teacher, args.resolution)
        return
    teacher_file = args.teacher or teacher_path()
    teacher_id = (_shown(teacher_file) if args.teacher else None, content_hash(teacher_file))  # its path as the table shows it, its content
    configs = {sid: trained_config(student_config(sid, args.work, data, args.steps, args.teacher, args.resolution)) for sid in STUDENTS}
    previous = table_to_update(args, teacher_id) if rescore else None
    kept = {sid: kept_row(previous, sid, configs[sid]) for sid in STUDENTS if sid not in rescore} if previous else {}
    if args.jobs > 1:
        train_in_parallel(args.jobs, args.work, data, args.steps, args.teacher, args.resolution, only=rescore or None)
    digits = [i % 10 for i in range(args.n)]
    evaluator, *second_opinion = load_evaluators().values()
    teacher = load_sdxl(teacher_file)
    resolution = args.resolution or load_config(demo_config_path()).resolution

    def score(row: Row, model) -> dict:
        per_seed = []
        for seed in args.seeds:
            images, seconds = sample_row(model, row, digits, seed=seed, resolution=resolution)
            per_seed.append({"seed": seed, **evaluator.score(images, digits), "seconds_per_image": seconds,
                             "second_opinion": [{k: v for k, v in e.score(images, digits).items() if k != "diversity"} for e in second_opinion]})
        r = {"name": row.name, "steps": row.steps, "cfg": row.cfg, **_mean(per_seed, ("toy_fid", "accuracy", "diversity", "seconds_per_image")),
             "image_size": images.shape[-1],  # what was sampled (the evaluator rescales to 32x32)
             "second_opinion": [_mean([s["second_opinion"][i] for s in per_seed], ("toy_fid", "accuracy")) for i in range(len(second_opinion))],
             "per_seed": per_seed}
        others = " / ".join(f"{o['toy_fid']:.2f}" for o in r["second_opinion"])
        print(f"{row.name:<45} FID {r['toy_fid']:6.2f} ({others})  acc {r['accuracy']:.3f}  div {r['diversity']:.3f}  "
              f"{r['seconds_per_image'] * 1000:6.1f} ms/img", flush=True)
        return r

    if previous:  # the teacher's rows do not change with the students' recipes
        sweep, rows = previous["teacher_cfg_sweep"], previous["rows"][:3]
    else:
        sweep = [score(Row(f"teacher 50 steps, CFG {w:g}", 50, w), teacher) for w in args.cfg_sweep]
        best = min(sweep, key=lambda r: r["toy_fid"])
        w = best["cfg"]
        rows = [dict(best, name=f"teacher 50 steps (best CFG {w:g})")]
        rows += [score(Row(f"teacher {k} steps, CFG {w:g}", k, w), teacher) for k in (4, 1)]
    for sid, (name, k, _) in STUDENTS.items():
        if sid in kept:
            rows.append(kept[sid])
            continue
        t0 = time.perf_counter()
        lora, trained_here = train_student(sid, args.work, data, args.steps, args.teacher, args.resolution)
        train_minutes = (time.perf_counter() - t0) / 60
        student, meta = with_lora(teacher, lora)
        timesteps = tuple(json.loads(meta["dmd2.timesteps"]))
        r = score(Row(name, k, 1.0, timesteps), student)
        if trained_here:  # a reused (e.g. `--train-only`) LoRA's training time is not known here
            r["train_minutes"] = round(train_minutes, 1)
        rows.append({**r, "student": sid, "config": configs[sid]})  # what trained it: `--rows` keeps only an unchanged row
    results = {"n": args.n, "seeds": args.seeds, "steps": args.steps, "resolution": args.resolution, "teacher": teacher_id[0],
               "teacher_hash": teacher_id[1], "teacher_cfg_sweep": sweep, "rows": rows, "threads": torch.get_num_threads(),
               "torch": torch.__version__}
    if previous:  # the machine that made the whole table stays in the header; the re-scoring one is named beside it
        results.update(threads=previous["threads"], torch=previous["torch"], rescore_run={"threads": torch.get_num_threads(), "torch": torch.__version__},
                       rescored=sorted({*previous.get("rescored", []), *rescore}, key=list(STUDENTS).index))
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "results.json", json.dumps([{k: v for k, v in r.items() if k != "config"} for r in rows], indent=2) + "\n")
    write_text_atomic(args.out / "results_full.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(args.out / "RESULTS.md", table_markdown(results))
    print(f"wrote {args.out / 'RESULTS.md'}")


def student_ids(flag: str, text: str | None) -> list[str]:
    """The students a comma-separated ``flag`` value names (none without it); an unknown one is a one-line error."""
    ids = text.split(",") if text else []
    unknown = [sid for sid in ids if sid not in STUDENTS]
    if unknown:
        raise SystemExit(f"error: {flag} {','.join(unknown)}: no such student; pick from {','.join(STUDENTS)}")
    return ids


def table_to_update(args: argparse.Namespace, teacher_id: tuple[str | None, str]) -> dict:
    """``--out``'s results_full.json, which `--rows` updates; refused unless it was made like this call would make it
    (else its kept rows would not compare with the re-scored ones); a table older than its teacher's recorded hash is
    compared by the teacher's path."""
    path = args.out / "results_full.json"
    if not path.is_file():
        raise SystemExit(f"error: --rows updates a table, and {path} does not exist: run make_table.py without --rows first")
    was = json.loads(path.read_text())
    now = {"--teacher": teacher_id, "--n": args.n,
           "--seeds": list(args.seeds), "--steps": args.steps, "--resolution": args.resolution, "--cfg-sweep": list(args.cfg_sweep)}
    made = {"--teacher": (was["teacher"], was.get("teacher_hash", teacher_id[1])), "--n": was["n"], "--seeds": was["seeds"],
            "--steps": was["steps"], "--resolution": was["resolution"], "--cfg-sweep": [r["cfg"] for r in was["teacher_cfg_sweep"]]}
    differ = [flag for flag in now if made[flag] != now[flag]]
    if differ:
        raise SystemExit(f"error: {path} was made with other {', '.join(differ)}: pass the flags it was made with, or run "
                         "without --rows to make the whole table")
    return was


def kept_row(previous: dict, sid: str, config: dict) -> dict:
    """``sid``'s row of the table `--rows` updates, refused when it was made with another config than ``config``."""
    name = STUDENTS[sid][0]
    row = next((r for r in previous["rows"] if r.get("student", r["name"]) in (sid, name)), None)
    if row is None:
        raise SystemExit(f"error: the table has no row for {sid}: add it to --rows")
    differ = []  # tables before 2026-12 did not record the config
    if "config" in row:
        try:  # through the loader, as a saved config.yaml is: keys added to the config since read as their defaults
            differ = _differing(_trained_keys(load_config(base=row["config"])), config)
        except DMD2Error as exc:  # e.g. a key the config no longer has
            differ = [str(exc).split(":", 1)[0]]
    if differ:
        raise SystemExit(f"error: {sid}'s row was made with another config ({', '.join(differ)}): add it to --rows")
    return {**row, "student": sid}


def _mean(records: list[dict], keys: tuple[str, ...]) -> dict:
    return {k: sum(r[k] for r in records) / len(records) for k in keys}


def seed_list(text: str) -> tuple[int, ...]:
    """argparse type for comma-separated sampling seeds (here, in score_checkpoints.py and in handoff.py)."""
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be distinct and non-negative, e.g. 0,1,2")
    return seeds


def _cfg_list(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 1,1.5,2") from None
    if not scales or min(scales) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: guidance scales start at 1 (no guidance), e.g. 1,1.5,2")
    return scales


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (what a reader would type), else as given."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _non_default_flags(results: dict) -> str:
    """The flags that made this table's rows and differ from the defaults (where it wrote them aside)."""
    flags = f" --teacher {results['teacher']}" if results.get("teacher") else ""
    flags += f" --n {results['n']}" if results["n"] != 1000 else ""
    flags += f" --steps {results['steps']}" if results.get("steps") else ""
    flags += f" --seeds {','.join(map(str, results['seeds']))}" if tuple(results["seeds"]) != SEEDS else ""
    flags += f" --resolution {results['resolution']}" if results.get("resolution") else ""
    sweep = tuple(r["cfg"] for r in results["teacher_cfg_sweep"])
    return flags + (f" --cfg-sweep {','.join(f'{w:g}' for w in sweep)}" if sweep != CFG_SWEEP else "")


def _rescored(results: dict) -> str:
    """Which rows a later `--rows` call re-scored (their recipe had changed), and where, if any."""
    if not results.get("rescored"):
        return ""
    names, run = ", ".join(f'"{STUDENTS[sid][0]}"' for sid in results["rescored"]), results["rescore_run"]
    return (f" The rows {names} were re-scored later (`--rows {','.join(results['rescored'])}`: their recipe changed) on CPU, "
            f"{run['threads']} thread(s), torch {run['torch']}; the other rows are the whole table's.")


def table_markdown(results: dict) -> str:
    rows, teacher50 = results["rows"], results["rows"][0]
    lines = ["# Toy quality table: the digits teacher and its DMD2 students", "",
             (f"Teacher `{results['teacher']}`; " if results.get("teacher") else "The bundled digits teacher; ") + f"{results['n']} images per row and seed (digits 0-9 cycled, prompt \"a handwritten digit <word>\"), "
             f"sampling seeds {', '.join(map(str, results['seeds']))}, the same noise for image i in every row; every number is the mean over the "
             f"seeds (the toy FID per seed in its own column); CPU, {results['threads']} thread(s), torch {results['torch']}. "
             "Regenerate: `python benchmarks/toy/make_table.py" + _non_default_flags(results) + "`." + _rescored(results), "",
             "| row | steps | toy FID | FID / teacher-50 | toy FID per seed | accuracy | diversity | ms / image | second opinion: FID (/ teacher-50) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        others = " / ".join(f"{o['toy_fid']:.2f} ({o['toy_fid'] / t['toy_fid']:.2f}x)" for o, t in zip(r["second_opinion"], teacher50["second_opinion"]))
        per_seed = " / ".join(f"{s['toy_fid']:.2f}" for s in r["per_seed"])
        lines.append(f"| {r['name']} | {r['steps']} | {r['toy_fid']:.2f} | {r['toy_fid'] / teacher50['toy_fid']:.2f} | {per_seed} | {r['accuracy']:.3f} | "
                     f"{r['diversity']:.3f} | {r['seconds_per_image'] * 1000:.1f} | {others} |")
    lines += ["", "Teacher CFG sweep at 50 steps:", "", "| CFG | toy FID | accuracy | diversity |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['cfg']:g} | {r['toy_fid']:.2f} | {r['accuracy']:.3f} | {r['diversity']:.3f} |" for r in results["teacher_cfg_sweep"]]
    lines += ["", "Second opinion: the evaluator's classifier trained with seeds 1 and 2 (`benchmarks/toy/second_opinion/`), "
              "toy FID and accuracy on their features and outputs; neither was used to choose any setting.",
              "", "## Targets (issue 4: the paper's claim in miniature)", "",
              "| target | measured | met | met by the second opinions (seed 1 / 2) |", "|---|---|---|---|"]
    by_opinion = [target_checks(rows, lambda r, i=i: r["second_opinion"][i]) for i in range(len(teacher50["second_opinion"]))]
    for n, (what, measured, met) in enumerate(target_checks(rows)):
        lines.append(f"| {what} | {measured} | {'yes' if met else 'no'} | {' / '.join('yes' if o[n][2] else 'no' for o in by_opinion)} |")
    lines += ["", "Why the misses, and how the demo config was found: `benchmarks/toy/NOTES.md`."]
    return "\n".join(lines) + "\n"


def target_checks(rows: list[dict], scores=lambda r: r) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the issue's targets and the paper's ablations, from the table's rows, for each 4-step
    recipe; ``scores`` picks a row's toy_fid and accuracy (the evaluator's by default, or a second opinion's)."""
    by = {r["name"]: scores(r) for r in rows}
    t50, t4, t1 = (scores(r) for r in rows[:3])
    s1 = by[STUDENTS["student-1"][0]]
    fid = lambda r: r["toy_fid"]  # noqa: E731
    checks = []
    for sid, suffix, recipe in FOUR_STEP_RECIPES:
        s4 = by[STUDENTS[sid][0]]
        ablation = lambda name, suffix=suffix: by[STUDENTS[name + suffix][0]]  # noqa: E731
        checks += few_step_checks(s4, t50, t4, f"student 4-step ({recipe})") + [
            (f"({recipe}) without the GAN loss worse than the full method", f"{fid(ablation('no-gan')):.2f} vs {fid(s4):.2f}",
             fid(ablation("no-gan")) > fid(s4)),
            (f"(paper, {recipe}) without backward simulation worse", f"{fid(ablation('no-backsim')):.2f} vs {fid(s4):.2f}",
             fid(ablation("no-backsim")) > fid(s4)),
            (f"(paper, {recipe}) LoRA critic no worse than a full critic", f"{fid(s4):.2f} vs {fid(ablation('full-critic')):.2f} (full)",
             fid(s4) <= fid(ablation("full-critic"))),
        ]
    return checks + one_step_checks(s1, t50, t1)


if __name__ == "__main__":
    try:
        main()
    except DMD2Error as exc:  # a bad teacher, config or data: one line, as the CLI gives it
        raise SystemExit(f"error: {exc}") from None
