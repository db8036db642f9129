"""The GPU benchmarks run end to end at the tiny shape on a CPU: last output line is one JSON object, and the
numbers are appended to the results file."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _bench(script: str, *args, results: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--shape", "tiny", "--results", str(results), *map(str, args)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    text = results.read_text()
    assert record["device"] in text and json.dumps(record) in text
    return record


def test_train_cycle_tiny(tmp_path):
    record = _bench("train_cycle.py", "--cycles", "1", "--rank", "8", "--presets", "12gb,80gb", results=tmp_path / "RESULTS.md")
    assert record["benchmark"] == "train_cycle" and record["device"] == "cpu" and record["res"] == 128 and record["errors"] == {}
    for preset, checkpointing in (("12gb", True), ("80gb", False)):
        r = record["presets"][preset]
        assert r["cycle_s"] > 0 and r["losses_finite"] and r["gradient_checkpointing"] is checkpointing
    assert record["presets"]["12gb"]["optimizer"] == "torch.AdamW"  # 8-bit states need CUDA: clean fallback
    if (REPO.parent / "shared" / "reference" / "naive_dmd2_cycle.py").is_file():  # the reference sits beside the repo here
        assert record["reference"]["no_ckpt"]["impl"] == "naive-reference" and record["reference"]["grad_ckpt"]["grad_ckpt"] is True
        assert set(record["ratios"]) == {"default_vs_naive", "12gb_vs_naive_ckpt"}


def test_train_cycle_records_a_failing_configuration_and_runs_the_others(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_cycle.py"), "--shape", "tiny", "--cycles", "1", "--rank", "8",
                          "--presets", "nonsense,80gb", "--no-reference", "--results", str(results)],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO)
    assert out.returncode == 1, out.stderr[-3000:]  # a failure is reported in the exit status too
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(record["errors"]) == {"nonsense"} and "memory must be one of" in record["errors"]["nonsense"]
    assert set(record["presets"]) == {"80gb"} and record["presets"]["80gb"]["losses_finite"]
    assert "FAILED nonsense" in results.read_text()


def test_train_cycle_passes_trainer_options_to_every_preset(tmp_path):
    """`--set` reaches the trainer's config (an unknown key fails each preset with the config's own message), and a
    valid option runs, is recorded with the numbers and, with --against-default, is timed against the preset without it."""
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_cycle.py"), "--shape", "tiny", "--cycles", "1", "--rank", "8",
                          "--presets", "12gb,80gb", "--no-reference", "--results", "", "--set", "dmd.no_such_option=1"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO)
    errors = json.loads(bad.stdout.strip().splitlines()[-1])["errors"]
    assert bad.returncode == 1 and set(errors) == {"12gb", "80gb"} and all("no_such_option" in e for e in errors.values())
    record = _bench("train_cycle.py", "--cycles", "1", "--rank", "8", "--presets", "80gb", "--no-reference", "--against-default",
                    "--set", "dmd.critic_per_step=true", results=tmp_path / "RESULTS.md")
    assert record["overrides"] == ["dmd.critic_per_step=true"] and record["errors"] == {}
    assert record["presets"]["80gb"]["losses_finite"] and record["without_options"]["80gb"]["losses_finite"]
    assert set(record["ratios"]) == {"80gb_options_vs_without"} and record["ratios"]["80gb_options_vs_without"] > 0  # no peak on a CPU
    text = (tmp_path / "RESULTS.md").read_text()
    assert "options: dmd.critic_per_step=true" in text and "ours 80gb without options:" in text and "ours 80gb with options:" in text
    alone = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_cycle.py"), "--shape", "tiny", "--against-default"],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert alone.returncode == 2 and "pass --set KEY=VALUE too" in alone.stderr.strip().splitlines()[-1]


def test_inference_tiny(tmp_path):
    record = _bench("inference.py", "--runs", "1", "--teacher-steps", "6", "--channels-last", results=tmp_path / "RESULTS.md")
    assert record["benchmark"] == "inference" and record["student_steps"] == 4 and record["teacher_steps"] == 6
    assert record["eager"]["student_s"] > 0 and record["eager"]["speedup"] > 1
    assert record["channels_last"]["student_s"] > 0 and record["channels_last"]["student_gain"] > 0


def test_make_table_on_another_teacher(tmp_path, tiny_sdxl_folder):
    """The table command on a teacher other than the bundled one (as a reviewer's second teacher would be; here a
    diffusers folder at its own 64x64 resolution): every student is trained from it, the table names it, and its
    students are never reused for another teacher."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "benchmarks" / "toy" / "make_table.py"), "--n", "20", "--steps", "2", "--resolution", "64",
           "--seeds", "0,3", "--work", str(tmp_path / "work")]
    # --jobs 2: the students are trained in two --train-only processes, then this one evaluates them
    out = subprocess.run([*cmd, "--teacher", str(tiny_sdxl_folder), "--cfg-sweep", "1,2", "--jobs", "2"], capture_output=True, text=True,
                         timeout=900, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    logs = sorted((tmp_path / "work").glob("train-*.log"))
    assert [log.name for log in logs] == ["train-0.log", "train-1.log"]
    groups = [line.split("training ", 1)[1].split(" in a parallel process")[0].split(", ") for line in out.stdout.splitlines()
              if "in a parallel process" in line]
    assert len(groups) == 2 and sorted(sum(groups, [])) == sorted(["student-4", "student-4-long", "student-2", "student-1", "no-gan", "no-backsim",
                                                                      "full-critic", "no-gan-long", "no-backsim-long", "full-critic-long"])
    rows = json.loads((tmp_path / "work" / "results.json").read_text())
    full = json.loads((tmp_path / "work" / "results_full.json").read_text())
    assert [r["cfg"] for r in full["teacher_cfg_sweep"]] == [1.0, 2.0] and rows[0]["cfg"] in (1.0, 2.0)
    assert len(rows) == 13 and all(r["toy_fid"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert all(len(r["second_opinion"]) == 2 and all(o["toy_fid"] > 0 for o in r["second_opinion"]) for r in rows)
    assert all(r["image_size"] == 64 for r in rows + full["teacher_cfg_sweep"])  # sampled at --resolution, not at 32
    for r in rows:  # each number is the mean over the sampling seeds, whose draws differ
        assert [s["seed"] for s in r["per_seed"]] == [0, 3] and r["per_seed"][0]["toy_fid"] != r["per_seed"][1]["toy_fid"]
        assert r["toy_fid"] == pytest.approx(sum(s["toy_fid"] for s in r["per_seed"]) / 2)
        assert r["second_opinion"][1]["accuracy"] == pytest.approx(sum(s["second_opinion"][1]["accuracy"] for s in r["per_seed"]) / 2)
    table = (tmp_path / "work" / "RESULTS.md").read_text()
    assert f"--teacher {tiny_sdxl_folder} --n 20 --steps 2 --seeds 0,3 --resolution 64 --cfg-sweep 1,2`" in table
    assert f"| {rows[0]['per_seed'][0]['toy_fid']:.2f} / {rows[0]['per_seed'][1]['toy_fid']:.2f} |" in table
    assert "| met by the second opinions (seed 1 / 2) |" in table and f"| {rows[0]['second_opinion'][0]['toy_fid']:.2f} (1.00x) / " in table
    from safetensors import safe_open

    from trainer.models.hashing import content_hash
    loras = sorted((tmp_path / "work").glob("*/dmd2_*_lora.safetensors"))
    assert len(loras) == 10
    assert all(yaml.safe_load((lora.parent / "config.yaml").read_text())["resolution"] == 64 for lora in loras)
    one_step = yaml.safe_load((tmp_path / "work" / "student-1" / "config.yaml").read_text())
    assert one_step["steps"] == 2 and one_step["student"]["average_from"] == 1  # --steps wins; the mean keeps its share
    long = yaml.safe_load((tmp_path / "work" / "no-gan-long" / "config.yaml").read_text())
    assert long["steps"] == 2 and long["student"]["average_from"] == 1 and long["optim"]["lr_schedule"] == "cosine"
    assert long["gan"]["real_data"] == "none" and long["student"]["timesteps"] == [799, 599, 399, 199]
    assert "| student 4-step (long recipe) FID <= 1.1x teacher-50 (" in table and "| (long recipe) without the GAN loss worse" in table
    for lora in loras:
        with safe_open(lora, "pt") as f:
            assert f.metadata()["dmd2.teacher_hash"] == content_hash(tiny_sdxl_folder)
    # --rows re-scores some students and keeps the rest of the table; sampling is seeded, so the same LoRA scores the same
    made_with = [*cmd, "--teacher", str(tiny_sdxl_folder), "--cfg-sweep", "1,2"]
    out = subprocess.run([*made_with, "--rows", "no-gan,student-2"], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reusing" in out.stdout and "student 4-step " not in out.stdout  # scored (and printed) only the two rows
    again = json.loads((tmp_path / "work" / "results_full.json").read_text())
    assert again["rescored"] == ["student-2", "no-gan"] and again["teacher_cfg_sweep"] == full["teacher_cfg_sweep"]
    for before, after in zip(full["rows"], again["rows"], strict=True):
        if after.get("student") in ("student-2", "no-gan"):
            assert after["per_seed"] != before["per_seed"]  # sampled again: timings differ...
            assert [s["toy_fid"] for s in after["per_seed"]] == pytest.approx([s["toy_fid"] for s in before["per_seed"]], abs=1e-6)
        else:
            assert after == before  # ...kept rows are the file's
    assert "were re-scored later (`--rows student-2,no-gan`: their recipe changed)" in (tmp_path / "work" / "RESULTS.md").read_text()
    def recorded(r: dict) -> dict:  # no-backsim's row made with more iterations; student-4's before student.batch_size was a key
        if r.get("student") == "student-4":
            return dict(r, config=dict(r["config"], student={k: v for k, v in r["config"]["student"].items() if k != "batch_size"}))
        return dict(r, config=dict(r["config"], steps=9)) if r.get("student") == "no-backsim" else r
    stale = dict(again, rows=[recorded(r) for r in again["rows"]])
    (tmp_path / "work" / "results_full.json").write_text(json.dumps(stale))
    refused = subprocess.run([*made_with, "--rows", "no-gan"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    error = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode != 0 and error == "error: no-backsim's row was made with another config (steps): add it to --rows"
    # a row recorded with a key the config no longer has is refused, naming the key
    gone = dict(again, rows=[dict(r, config=dict(r["config"], dmd=dict(r["config"]["dmd"], old_option=1)))
                             if r.get("student") == "no-backsim" else r for r in again["rows"]])
    (tmp_path / "work" / "results_full.json").write_text(json.dumps(gone))
    refused = subprocess.run([*made_with, "--rows", "no-gan"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    error = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode != 0 and error == ("error: no-backsim's row was made with another config (unknown config key "
                                                 "dmd.old_option): add it to --rows")
    (tmp_path / "work" / "results_full.json").write_text(json.dumps(stale))
    refused = subprocess.run([*made_with, "--rows", "no-gan", "--n", "30"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert refused.returncode != 0 and "results_full.json was made with other --n: pass the flags" in refused.stderr.strip().splitlines()[-1]
    refused = subprocess.run([*cmd, "--train-only", "student-4"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert refused.returncode != 0 and "distilled from another teacher" in refused.stderr.strip().splitlines()[-1]
    # nor for another config (here more iterations): a stale student would silently fill the new table's row
    cmd[cmd.index("--steps") + 1] = "3"
    refused = subprocess.run([*cmd, "--teacher", str(tiny_sdxl_folder), "--train-only", "student-2"], capture_output=True, text=True,
                             timeout=300, env=env, cwd=REPO)
    assert refused.returncode != 0 and "trained with another config (steps)" in refused.stderr.strip().splitlines()[-1]
    bad = subprocess.run([*cmd[:cmd.index("--resolution") + 1], "30"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert bad.returncode != 0 and "--resolution 30 is not a positive multiple of 8" in bad.stderr.strip().splitlines()[-1]


def test_make_table_parallel_training_reports_a_failed_process(tmp_path, tiny_sdxl_file):
    """--train-only with --jobs trains just those students in parallel processes; a process that fails (here every one:
    the teacher is truncated) ends the command with a one-line error naming its log, and nothing is evaluated."""
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_sdxl_file.read_bytes()[: tiny_sdxl_file.stat().st_size // 2])
    cmd = [sys.executable, str(REPO / "benchmarks" / "toy" / "make_table.py"), "--n", "20", "--steps", "2", "--work", str(tmp_path / "work"),
           "--teacher", str(truncated)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([*cmd, "--train-only", "no-gan,student-4", "--jobs", "2"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode != 0
    groups = sorted(line.split("training ", 1)[1].split(" in a parallel process")[0] for line in out.stdout.splitlines()
                    if "in a parallel process" in line)
    assert groups == ["no-gan", "student-4"]  # only the students asked for, one per process
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("error: training students failed (") and "train-0.log" in error and error.count("error:") == 1
    assert "truncated or corrupt; download or copy it again" in error
    for log in ("train-0.log", "train-1.log"):
        assert "truncated or corrupt" in (tmp_path / "work" / log).read_text()
    assert not (tmp_path / "work" / "results.json").exists()
    unknown = subprocess.run([*cmd, "--train-only", "student-3"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert unknown.returncode != 0 and "--train-only student-3: no such student; pick from student-4," in unknown.stderr.strip().splitlines()[-1]


def _ctrl_c_once_training(cmd: list[str], logs: list[Path], out: Path) -> int:
    """Run ``cmd`` (stdout to ``out``, stderr to ``out``.err) as a terminal's foreground job, a process group of its
    own, and press Ctrl-C there once every one of ``logs`` shows a finished iteration of its 100,000 (the trainer's
    Ctrl-C handler is then installed). Returns the exit status; whatever of the group is still running is killed."""
    def as_foreground_job():  # SIGINT as a terminal leaves it: a suite started in the background (`cmd &` without job
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # control) passes SIGINT down ignored, and Python keeps it so
    with out.open("w") as stdout, out.with_suffix(".err").open("w") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO, start_new_session=True,
                                preexec_fn=as_foreground_job)
    try:
        deadline = time.monotonic() + 300
        while not all(log.is_file() and re.search(r"\| [1-9]\d*/100000", log.read_text()) for log in logs):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        return proc.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):  # e.g. a process that went on training after the command ended
            os.killpg(proc.pid, signal.SIGKILL)


def test_make_table_stops_at_ctrl_c_keeping_checkpoints_and_starts_no_further_student(tmp_path, tiny_sdxl_file):
    """A terminal's Ctrl-C reaches the table command and its training processes (one process group): each student in
    training ends its iteration with a checkpoint, no process goes on to its next student, and the command waits for
    them and ends with a one-line error saying how to resume."""
    work = tmp_path / "work"
    cmd = [sys.executable, str(REPO / "benchmarks" / "toy" / "make_table.py"), "--steps", "100000", "--work", str(work), "--teacher",
           str(tiny_sdxl_file), "--train-only", "student-4,no-gan,student-2", "--jobs", "2"]  # student-2 queues behind student-4
    logs = [work / "train-0.log", work / "train-1.log"]
    assert _ctrl_c_once_training(cmd, logs, tmp_path / "out") != 0
    assert "training student-4, student-2 in a parallel process" in (tmp_path / "out").read_text()
    error = (tmp_path / "out.err").read_text().strip().splitlines()[-1]
    assert error == f"error: stopped at Ctrl-C (the students' checkpoints are kept in {work}): run the same command again to resume"
    for sid, log in (("student-4", logs[0]), ("no-gan", logs[1])):
        assert len(list((work / sid / "checkpoints").glob("step-*"))) == 1 and not list((work / sid).glob("dmd2_*_lora.safetensors"))
        assert log.read_text().strip().splitlines()[-1] == (f"error: {sid} stopped at Ctrl-C (checkpoint kept in {work / sid / 'checkpoints'}): "
                                                            "run the same command again to resume")
    assert not (work / "student-2").exists()  # its process stopped instead of starting it


def test_score_checkpoints_stops_at_ctrl_c_without_scoring(tmp_path):
    """Ctrl-C while `score_checkpoints.py --train` trains: a checkpoint is kept, nothing is scored, and the command ends
    with a one-line error saying how to resume."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "benchmarks" / "toy" / "score_checkpoints.py"), str(run), "--n", "40", "--train", "--set",
           "steps=100000", "batch_size=2", "micro_batch_size=2"]
    assert _ctrl_c_once_training(cmd, [tmp_path / "out.err"], tmp_path / "out") != 0
    error = (tmp_path / "out.err").read_text().strip().splitlines()[-1]
    assert error == f"error: training stopped at Ctrl-C (checkpoint kept in {run / 'checkpoints'}): run the same command again to resume"
    assert len(list((run / "checkpoints").glob("step-*"))) == 1 and not (run / "scores.jsonl").exists()


def test_score_checkpoints_trains_and_scores_every_checkpoint_once(tmp_path):
    """`score_checkpoints.py --train` trains demo.yaml + overrides on the bundled teacher, keeps every checkpoint, and
    scores each with the three classifiers; a second call scores only what is missing and summarises all of it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "benchmarks" / "toy" / "score_checkpoints.py"), str(tmp_path / "run"), "--n", "40"]
    train = ["--train", "--set", "steps=4", "checkpoint_every=2", "batch_size=2", "micro_batch_size=2"]
    out = subprocess.run([*cmd, *train], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    scores = tmp_path / "run" / "scores.jsonl"
    first = [json.loads(line) for line in scores.read_text().splitlines()]
    assert [(r["step"], r["seed"]) for r in first] == [(4, 0), (2, 0)]  # newest first: a deadline keeps the latest
    assert all(r[c]["toy_fid"] > 0 and 0 <= r[c]["accuracy"] <= 1 for r in first for c in ("committed", "seed1", "seed2"))
    # the three classifiers are different networks: they never give one image set the same distance
    assert len({first[0][c]["toy_fid"] for c in ("committed", "seed1", "seed2")}) == 3
    out = subprocess.run([*cmd, "--min-step", "4", "--seeds", "0,1"], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in scores.read_text().splitlines()]
    assert records[:2] == first and [(r["step"], r["seed"]) for r in records[2:]] == [(4, 1)]
    summary = json.loads(out.stdout[out.stdout.index("{\n"):])
    assert summary["seed 0"]["checkpoints"] == 1 and summary["seed 0"]["committed"]["mean_fid"] == round(first[0]["committed"]["toy_fid"], 3)
    bad = subprocess.run([*cmd, "--min-step", "5"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert bad.returncode != 0 and "has no checkpoints at step 5 or later" in bad.stderr.strip().splitlines()[-1]


def test_handoff_ends_are_the_plain_rows_and_every_handover_is_scored(tmp_path):
    """`handoff.py`: handing over at the student's last step is the plain student, and at the grid's end the plain
    teacher, image for image (the same noise draws as the table's rows); the script scores every hand-over of a LoRA
    the real trainer wrote."""
    sys.path[:0] = [str(REPO / "benchmarks" / "toy")]
    import handoff
    from score_checkpoints import train_run

    from trainer.models.loading import load_sdxl
    from trainer.toy.rows import Row, sample_row
    from trainer.toy.teacher import teacher_path

    model = load_sdxl(str(teacher_path()))
    digits, timesteps = [3, 7, 1], (999, 749, 499, 249)
    student = handoff.sample(model, model.unet, ("", "student_first", 4), timesteps, digits, seed=2, cfg=1.5, teacher_steps=6)
    assert torch.equal(student, sample_row(model, Row("student", 4, 1.0, timesteps), digits, seed=2)[0])
    teacher = handoff.sample(model, model.unet, ("", "teacher_first", 4), timesteps, digits, seed=2, cfg=1.5, teacher_steps=6)
    assert torch.equal(teacher, sample_row(model, Row("teacher", 6, 1.5), digits, seed=2)[0])
    # a hand-over in between is neither
    middle = handoff.sample(model, model.unet, ("", "student_first", 2), timesteps, digits, seed=2, cfg=1.5, teacher_steps=6)
    assert not torch.equal(middle, student) and not torch.equal(middle, teacher)

    train_run(tmp_path / "run", str(teacher_path()), ["steps=2", "checkpoint_every=2", "batch_size=2", "micro_batch_size=2"])
    lora = next((tmp_path / "run").glob("dmd2_*_lora.safetensors"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "toy" / "handoff.py"), str(lora), "--n", "20", "--teacher-steps", "6",
                          "--json", str(tmp_path / "handoff.json")], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "handoff.json").read_text())
    assert [r["row"] for r in rows] == [name for name, _, _ in handoff.rows_for(4)] and len(rows) == 9
    assert all(r[c] > 0 for r in rows for c in ("committed", "seed1", "seed2")) and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert rows[-2]["row"] == "teacher (plain)" and rows[0]["row"] == "student (plain)"
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "toy" / "handoff.py"), str(tmp_path / "missing.safetensors")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert bad.returncode != 0 and "missing.safetensors" in bad.stderr.strip().splitlines()[-1]


def test_critic_fit_uses_the_critic_of_each_student_step(tmp_path):
    """`critic_fit.py` on a run with one critic per student step: the critics of steps the run never drew are still
    zero and predict exactly what the teacher does; those that trained do not. A missing checkpoint is one line."""
    sys.path[:0] = [str(REPO / "benchmarks" / "toy")]
    from safetensors.torch import load_file
    from score_checkpoints import train_run

    from trainer.models.roles import critic_adapter_names
    from trainer.toy.teacher import teacher_path

    run = tmp_path / "run"
    train_run(run, str(teacher_path()), ["steps=2", "checkpoint_every=2", "batch_size=2", "micro_batch_size=2", "dmd.critic_per_step=true"])
    critic = load_file(run / "checkpoints" / "step-00000002" / "critic.safetensors")
    names = critic_adapter_names(4)
    trained = [any(v.abs().sum() > 0 for key, v in critic.items() if f".{name}." in key and "lora_B" in key) for name in names]
    assert 1 <= sum(trained) <= 2  # two iterations draw at most two of the four steps
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "benchmarks" / "toy" / "critic_fit.py"), str(run), "--n", "2"]
    out = subprocess.run([*cmd, "--steps", "2"], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    fit = json.loads(out.stdout.strip().splitlines()[-1])["2"]
    assert len(fit) == 4 * 5 and all(e > 0 for r in fit.values() for e in r["mse"] + r["spread"])
    for k in range(4):
        rows = [fit[f"k{k}t{t}"] for t in (900, 700, 500, 300, 100)]
        assert all((r["mse"][0] != r["mse"][1]) == trained[k] and (r["spread"][0] != r["spread"][1]) == trained[k] for r in rows), (k, rows)
        assert len({r["spread"][2] for r in rows}) == 1  # the samples are the same at every re-noising
    bad = subprocess.run([*cmd, "--steps", "3"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert bad.returncode != 0 and "no complete checkpoint at step(s) [3]" in bad.stderr.strip().splitlines()[-1]


def test_gan_probe_fresh_head_learns_what_separates_the_sets():
    """The probe's fresh head, trained as the trainer trains its head, separates features that differ and stays
    near chance on features that do not; balanced accuracy by hand."""
    sys.path[:0] = [str(REPO / "benchmarks" / "toy")]
    from gan_probe import balanced_accuracy, train_head

    from trainer.models.gan_head import GANHead

    assert balanced_accuracy(torch.tensor([-1.0, 2.0]), torch.tensor([1.0, 1.0, -3.0, 0.5])) == (0.5 + 0.75) / 2
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(4000, 64, 4, 4, generator=g)  # fewer rows than dimensions would be memorised
    direction = torch.randn(64, 4, 4, generator=g)
    direction /= direction.norm()
    for shift, expect in ((4.0, lambda a: a > 0.9), (0.0, lambda a: abs(a - 0.5) < 0.1)):  # 4 sd apart along one direction
        feats = lambda rows, t: pool[rows] + shift * (rows >= 2000).float()[:, None, None, None] * direction  # noqa: E731
        torch.manual_seed(0)
        head = train_head(GANHead(64, 4), feats, torch.arange(0, 1500), torch.arange(2000, 3500), steps=300, batch=16, t_max=999, lr=2e-3)
        with torch.no_grad():
            acc = balanced_accuracy(head(feats(torch.arange(1500, 2000), None)), head(feats(torch.arange(3500, 4000), None)))
        assert expect(acc), (shift, acc)


def test_gan_probe_on_a_run(tmp_path):
    """`gan_probe.py` end to end on a two-iteration run: both heads' accuracies per noise band; a run without the GAN
    gets a one-line error."""
    sys.path[:0] = [str(REPO / "benchmarks" / "toy")]
    from score_checkpoints import train_run

    from trainer.toy.teacher import teacher_path

    env = dict(os.environ, OMP_NUM_THREADS="1")
    small = ["steps=2", "checkpoint_every=2", "batch_size=2", "micro_batch_size=2"]
    train_run(tmp_path / "run", str(teacher_path()), small)
    cmd = [sys.executable, str(REPO / "benchmarks" / "toy" / "gan_probe.py"), "--steps", "2", "--n", "40", "--fresh-steps", "3"]
    out = subprocess.run([*cmd, str(tmp_path / "run")], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    bands = json.loads(out.stdout.strip().splitlines()[-1])["2"]
    assert list(bands) == ["t0-50", "t50-200", "t200-400", "t400-700", "t700-1000"]
    assert all(0 <= a <= 1 for pair in bands.values() for a in pair) and len({tuple(p) for p in bands.values()}) > 1
    first = subprocess.run([*cmd, str(tmp_path / "run"), "--student-step", "0"], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout.strip().splitlines()[-1])["2"] != bands  # the first step's x0, not the final samples
    late = subprocess.run([*cmd, str(tmp_path / "run"), "--student-step", "4"], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert late.returncode != 0 and "--student-step must be in 0..3" in late.stderr.strip().splitlines()[-1]
    train_run(tmp_path / "nogan", str(teacher_path()), [*small, "gan.real_data=none"])
    bad = subprocess.run([*cmd, str(tmp_path / "nogan")], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert bad.returncode != 0 and "trained without the GAN" in bad.stderr.strip().splitlines()[-1]


def test_real_baseline_subsets_keep_the_datas_digit_shares():
    sys.path[:0] = [str(REPO / "benchmarks" / "toy")]
    import numpy as np
    from real_baseline import digit_counts, stratified_subset

    from trainer.toy.digits import load_digits_32, split_indices

    _, labels = load_digits_32()
    held = labels[split_indices()[1]]
    assert digit_counts(359, held) == np.bincount(held.numpy()).tolist()  # the held-out split's own counts
    counts = digit_counts(1000, held)
    assert sum(counts) == 1000 and max(counts) - min(counts) <= 6  # the data is nearly balanced (174-183 per digit)
    pool = torch.tensor([i % 10 for i in range(200)])
    rows = stratified_subset(pool, [3] * 10, np.random.default_rng(0))
    assert len(set(rows.tolist())) == 30 and np.bincount(pool[rows].numpy()).tolist() == [3] * 10


def test_real_baseline_end_to_end(tmp_path):
    """`real_baseline.py` with a student LoRA: every row at each count, the held-out digits scored as they are; a
    missing LoRA is one line."""
    sys.path[:0] = [str(REPO / "benchmarks" / "toy")]
    from score_checkpoints import train_run

    from trainer.toy.digits import load_digits_32, split_indices
    from trainer.toy.evaluate import ToyEvaluator
    from trainer.toy.teacher import teacher_path

    train_run(tmp_path / "run", str(teacher_path()), ["steps=2", "checkpoint_every=2", "batch_size=2", "micro_batch_size=2"])
    lora = next((tmp_path / "run").glob("*lora.safetensors"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "benchmarks" / "toy" / "real_baseline.py"), "--samples", "30", "--teacher-steps", "2",
           "--n", "20,40", "--repeats", "2"]
    out = subprocess.run([*cmd, "--lora", str(lora)], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    by_classifier = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(by_classifier) == ["committed", "seed1", "seed2"] and by_classifier["seed1"] != by_classifier["committed"]
    rows = by_classifier["committed"]
    assert list(rows) == ["held-out real digits (all 359)", "real digits, classifier's training split",
                          "teacher 2 steps, CFG 1.5", "student 4-step"]
    real, labels = load_digits_32()
    held = split_indices()[1]
    assert rows["held-out real digits (all 359)"]["359"]["mean"] == round(ToyEvaluator.load().score(real[held], labels[held])["toy_fid"], 3)
    for name in list(rows)[1:]:
        assert set(rows[name]) == {"20", "40"} and all(r["repeats"] == 2 and r["min"] <= r["mean"] <= r["max"] for r in rows[name].values())
    assert rows["student 4-step"] != rows["teacher 2 steps, CFG 1.5"]
    bad = subprocess.run([*cmd, "--lora", str(tmp_path / "missing.safetensors")], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert bad.returncode != 0 and "missing.safetensors does not exist" in bad.stderr.strip().splitlines()[-1]
