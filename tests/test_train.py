"""The DMD2 trainer end to end on the tiny SDXL: the CLI, exact resume, NaN handling, refusals, export round trip."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from trainer import objectives
from trainer.config import load_config
from trainer.errors import TrainingDivergedError
from trainer.train import train

PROMPTS = ["a red square", "a blue circle", "a green triangle"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    images = d / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(f"a photo number {i}")
    return d


def _config(data_dir: Path, model: Path, out: Path, **extra) -> dict:
    cfg = {"model": str(model), "prompts": str(data_dir / "prompts.txt"), "images": str(data_dir / "images"),
           "output_dir": str(out), "steps": 6, "resolution": 32, "batch_size": 2, "seed": 3,
           "lora": {"rank": 4, "alpha": 2}, "checkpoint_every": 0, "validate_every": 0,
           "optim": {"warmup_steps": 2}, "student": {"update_every": 2}, "validation": {"teacher_steps": 3, "seeds": [0]}}
    for key, value in extra.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def _dmd2(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_train_cli_end_to_end(tmp_path, data_dir, tiny_sdxl_file):
    """All losses on (DMD, GAN with real images), 4-step backward simulation, validation, checkpoints, export."""
    cfg = _config(data_dir, tiny_sdxl_file, tmp_path / "run", checkpoint_every=3, validate_every=3)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    result = _dmd2("train", "--config", tmp_path / "run.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    lora = Path(result.stdout.strip().splitlines()[-1].removeprefix("LoRA: "))
    assert lora.is_file() and lora.parent == tmp_path / "run"
    with safe_open(lora, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        assert all(k.startswith("lora_unet_") for k in keys)
        assert f.get_tensor(keys[0]).dtype == torch.float16
    downs = [k for k in keys if k.endswith(".lora_down.weight")]
    assert len(downs) > 50 and len(keys) == 3 * len(downs)  # down, up and alpha for every module
    assert any("_attn1_to_q." in k for k in downs) and any("_resnets_0_conv1." in k for k in downs)
    assert json.loads(meta["dmd2.timesteps"]) == [999, 749, 499, 249] and meta["dmd2.cfg"] == "1"
    assert meta["dmd2.rank"] == "4" and float(meta["dmd2.alpha"]) == 2.0 and meta["dmd2.steps"] == "6"
    assert len(meta["dmd2.teacher_hash"]) == 64
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "validation").glob("*.png")) == ["step-00000003.png", "step-00000006.png"]
    assert Image.open(run / "validation" / "step-00000006.png").size[1] > 2 * 32  # teacher row + student row
    assert list((run / "logs").rglob("events.out.tfevents.*"))
    ckpt = run / "checkpoints" / "step-00000006"
    assert {p.name for p in ckpt.iterdir()} >= {"student.safetensors", "critic.safetensors", "gan_head.safetensors", "training_state.pt", "state.json"}
    assert "dmd" in result.stderr and "d_gan" in result.stderr  # the progress bar shows the losses
    # the last checkpoint's student, converted as `dmd2 export --run` converts it, is the LoRA the run wrote
    from trainer.export import lora_from_checkpoint
    tensors, ckpt_meta = lora_from_checkpoint(ckpt)
    assert tensors.keys() == set(keys) and all(torch.equal(tensors[k], load_file(lora)[k]) for k in keys)
    assert all(ckpt_meta[k] == meta[k] for k in ("dmd2.timesteps", "dmd2.rank", "dmd2.alpha", "dmd2.steps", "dmd2.teacher_hash"))


def _final_weights(out: Path, steps: int) -> dict:
    ckpt = out / "checkpoints" / f"step-{steps:08d}"
    return {stem: load_file(ckpt / f"{stem}.safetensors") for stem in ("student", "critic", "gan_head")}


def test_resume_and_extend_is_bit_exact(tmp_path, data_dir, tiny_sdxl_file):
    straight = _config(data_dir, tiny_sdxl_file, tmp_path / "straight", steps=8)
    train(load_config(base=straight))
    first = _config(data_dir, tiny_sdxl_file, tmp_path / "resumed", steps=4)
    train(load_config(base=first))
    lora = train(load_config(base=first, overrides=["steps=8"]), resume="latest")
    assert lora is not None and lora.is_file()
    a, b = _final_weights(tmp_path / "straight", 8), _final_weights(tmp_path / "resumed", 8)
    for stem in a:
        assert a[stem].keys() == b[stem].keys()
        for key in a[stem]:
            assert torch.equal(a[stem][key], b[stem][key]), f"{stem}:{key} differs after resume"
    before = load_file(tmp_path / "resumed" / "checkpoints" / "step-00000004" / "student.safetensors")
    assert any(not torch.equal(before[k], a["student"][k]) for k in before)  # the extension really trained


def test_cosine_schedule_and_gan_window_resume_bit_exact(tmp_path, data_dir, tiny_sdxl_file):
    """A cosine run resumed from its half-way checkpoint (what Ctrl-C leaves) ends exactly like the straight run."""
    import shutil

    extra = {"steps": 6, "optim.lr_schedule": "cosine", "gan.max_t": 0.5, "checkpoint_every": 3}
    cfg = _config(data_dir, tiny_sdxl_file, tmp_path / "straight", **extra)
    train(load_config(base=cfg))
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-00000003", tmp_path / "resumed" / "checkpoints" / "step-00000003")
    train(load_config(base=cfg, overrides=[f"output_dir={tmp_path / 'resumed'}"]), resume="latest")
    a, b = _final_weights(tmp_path / "straight", 6), _final_weights(tmp_path / "resumed", 6)
    for stem in a:
        for key in a[stem]:
            assert torch.equal(a[stem][key], b[stem][key]), f"{stem}:{key} differs after resume"
    assert any(not torch.equal(a["student"][k], v) for k, v in  # steps 4-6 really trained
               load_file(tmp_path / "straight" / "checkpoints" / "step-00000003" / "student.safetensors").items())
    lrs = {step: torch.load(tmp_path / "straight" / "checkpoints" / f"step-{step:08d}" / "training_state.pt",
                            weights_only=True)["critic_sched"]["_last_lr"][0] for step in (3, 6)}
    assert 0 < lrs[3] < 5e-5 * 0.99 and lrs[6] == pytest.approx(0.0, abs=1e-12)  # the cosine really ran (critic LR 5e-5)


@pytest.mark.parametrize("max_t, window", [(0.5, (0, 500)), (1.0, (0, 999))])
def test_gan_timesteps_stay_in_the_configured_window(tmp_path, data_dir, tiny_sdxl_file, monkeypatch, max_t, window):
    """Every timestep at which the GAN re-noises real and fake samples (critic and student side) lies in
    [0, gan.max_t * 1000]; with the default window the draws do go past 500, so the spy sees the setting work."""
    from trainer.models.roles import DMD2Roles

    seen: list[torch.Tensor] = []
    real = DMD2Roles.critic_features

    def spy(self, x, t, cond, *which):
        seen.append(t.detach().cpu())
        return real(self, x, t, cond, *which)

    monkeypatch.setattr(DMD2Roles, "critic_features", spy)
    train(load_config(base=_config(data_dir, tiny_sdxl_file, tmp_path / "run", **{"gan.max_t": max_t})))
    t = torch.cat(seen)
    assert len(t) == 6 * 2 * 2 + 3 * 2  # 6 critic updates (fake + real, batch 2) and 3 student updates (fake)
    assert window[0] <= int(t.min()) and int(t.max()) <= window[1]
    assert (int(t.max()) > 500) == (max_t == 1.0)


def test_dmd_noise_draws_renoise_each_sample_that_often(tmp_path, data_dir, tiny_sdxl_file, monkeypatch):
    """With dmd.noise_draws = 3 the teacher (guided: conditional and unconditional halves) and the critic see three
    re-noisings of each student sample in one pass, at timesteps drawn independently; 0 draws are refused."""
    from trainer.errors import ConfigError
    from trainer.models.roles import DMD2Roles

    calls: dict[str, list[torch.Tensor]] = {"teacher": [], "critic": []}
    for role in calls:
        def spy(self, x, t, cond, *which, _real=getattr(DMD2Roles, role), _role=role):
            calls[_role].append(t.detach().cpu())
            return _real(self, x, t, cond, *which)
        monkeypatch.setattr(DMD2Roles, role, spy)
    train(load_config(base=_config(data_dir, tiny_sdxl_file, tmp_path / "run", **{"dmd.noise_draws": 3})))
    assert [len(t) for t in calls["teacher"]] == [2 * 3 * 2] * 3  # 3 student updates, batch 2, CFG doubles the rows
    dmd_critic = [t for t in calls["critic"] if len(t) == 2 * 3]  # the DMD passes; its own denoising passes see 2 rows
    assert len(dmd_critic) == 3 and all(len(set(t.tolist())) > 2 for t in dmd_critic)
    with pytest.raises(ConfigError, match="dmd.noise_draws"):
        load_config(base=_config(data_dir, tiny_sdxl_file, tmp_path / "bad", **{"dmd.noise_draws": 0})).validate()


def test_student_batch_size_gives_the_student_more_samples_than_the_critic(tmp_path, data_dir, tiny_sdxl_file, monkeypatch):
    """student.batch_size=5 with batch_size 2 in micro-batches of 2: on the student's iterations (every 2nd) its
    losses see chunks of 2, 2 and 1 samples and the critic trains on the first chunk's samples only; on the others
    the critic sees 2; a student batch under batch_size is refused."""
    import trainer.train as train_module
    from trainer.errors import ConfigError

    student_chunks: list[tuple[int, int]] = []  # (iteration, samples) of each student loss call
    critic_chunks: list[tuple[int, int]] = []
    first_chunk: dict[int, int] = {}  # iteration -> data pointer of its first student chunk's samples
    real_student, real_critic, real_iteration = train_module.student_losses, train_module.critic_losses, train_module.train_iteration
    now = [0]

    def spy_iteration(s, step):
        now[0] = step
        return real_iteration(s, step)

    def spy_student(roles, head, schedule, x0, *args, **kwargs):
        first_chunk.setdefault(now[0], x0.data_ptr())
        student_chunks.append((now[0], len(x0)))
        return real_student(roles, head, schedule, x0, *args, **kwargs)

    def spy_critic(roles, head, schedule, fake, *args, **kwargs):
        critic_chunks.append((now[0], len(fake)))
        assert now[0] not in first_chunk or fake.data_ptr() == first_chunk[now[0]]
        return real_critic(roles, head, schedule, fake, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_iteration", spy_iteration)
    monkeypatch.setattr(train_module, "student_losses", spy_student)
    monkeypatch.setattr(train_module, "critic_losses", spy_critic)
    lora = train(load_config(base=_config(data_dir, tiny_sdxl_file, tmp_path / "run", steps=4, micro_batch_size=2,
                                          **{"student.batch_size": 5})))
    assert lora.exists()
    assert student_chunks == [(0, 2), (0, 2), (0, 1), (2, 2), (2, 2), (2, 1)]
    assert critic_chunks == [(i, 2) for i in range(4)] and sorted(first_chunk) == [0, 2]
    with pytest.raises(ConfigError, match=r"student.batch_size \(1\) must be at least batch_size \(2\)"):
        load_config(base=_config(data_dir, tiny_sdxl_file, tmp_path / "bad", **{"student.batch_size": 1})).validate()


@pytest.mark.parametrize("below_step, timesteps", [(True, [999, 749, 499, 249]), (False, [999, 749, 499, 249]), (True, [399])])
def test_dmd_timestep_below_the_step_input(tmp_path, data_dir, tiny_sdxl_file, monkeypatch, below_step, timesteps):
    """With dmd.t_below_step the DMD loss of a sample made by student step k > 0 re-noises it only within [20, t_k];
    without it (DMD2's window) the same run's draws go above t_k for the later steps, so the spy sees the option. The
    first step draws from pure noise, so a 1-step student labelled t = 399 keeps the whole window."""
    import trainer.train as train_module
    from trainer.models.roles import DMD2Roles

    drawn: list[int] = []  # the student timestep t_k of each iteration's samples
    pairs: list[tuple[int, torch.Tensor]] = []  # (t_k, the DMD timesteps) of every teacher pass
    real_input, real_teacher = train_module.student_input, DMD2Roles.teacher

    def spy_input(*args, **kwargs):
        x, t = real_input(*args, **kwargs)
        drawn.append(int(t[0]))
        return x, t

    def spy_teacher(self, x, t, cond):
        pairs.append((drawn[-1], t.detach().cpu()))
        return real_teacher(self, x, t, cond)

    monkeypatch.setattr(train_module, "student_input", spy_input)
    monkeypatch.setattr(DMD2Roles, "teacher", spy_teacher)
    train(load_config(base=_config(data_dir, tiny_sdxl_file, tmp_path / "run", steps=16, **{
        "dmd.t_below_step": below_step, "dmd.noise_draws": 4, "student.timesteps": timesteps})))
    steps_drawn = {t_k for t_k, _ in pairs}
    assert len(pairs) == 8 and (len(steps_drawn) > 1 if len(timesteps) > 1 else steps_drawn == {399})  # 8 updates
    assert all(20 <= int(t.min()) and int(t.max()) <= 980 for _, t in pairs)
    above = sum(int((t > t_k).sum()) for t_k, t in pairs)
    assert (above == 0) == (below_step and len(timesteps) > 1)


def test_critic_per_step_trains_the_critic_of_the_step_that_made_the_samples(tmp_path, data_dir, tiny_sdxl_file, monkeypatch):
    """With dmd.critic_per_step every critic pass of an iteration (the DMD pass, the denoising loss, the GAN features)
    uses the critic of the student step whose samples it judges; only those critics train, all are checkpointed
    (and resumed: the bit-exact resume test covers loading by name), and a full critic is refused."""
    import trainer.train as train_module
    from trainer.errors import ConfigError
    from trainer.models.roles import DMD2Roles, critic_adapter_names

    drawn: list[int] = []  # the student timestep of each iteration's samples
    critics: list[tuple[int, str]] = []  # (iteration, critic adapter) of every critic pass
    real_input, real_critic, real_features = train_module.student_input, DMD2Roles.critic, DMD2Roles.critic_features

    def spy_input(*args, **kwargs):
        x, t = real_input(*args, **kwargs)
        drawn.append(int(t[0]))
        return x, t

    def spy_critic(self, x, t, cond, which=0, _real=real_critic):
        out = _real(self, x, t, cond, which)
        critics.append((len(drawn) - 1, self._adapter_state[0]))
        return out

    monkeypatch.setattr(train_module, "student_input", spy_input)
    monkeypatch.setattr(DMD2Roles, "critic", spy_critic)
    monkeypatch.setattr(DMD2Roles, "critic_features", lambda self, *a, _real=real_features, **k: spy_critic(self, *a, _real=_real, **k))
    out = tmp_path / "run"
    train(load_config(base=_config(data_dir, tiny_sdxl_file, out, steps=8, **{"dmd.critic_per_step": True})))
    names = critic_adapter_names(4)
    assert names == ["critic", "critic_1", "critic_2", "critic_3"]  # the checkpoint's key format: saved runs resume by it
    steps = [999, 749, 499, 249]
    assert len(set(drawn)) > 1 and len(critics) >= 8 * 3  # denoising + GAN fake/real passes per iteration, DMD passes
    assert all(name == names[steps.index(drawn[i])] for i, name in critics)
    saved = load_file(out / "checkpoints" / "step-00000008" / "critic.safetensors")
    for i, name in enumerate(names):
        ups = [v for k, v in saved.items() if f".{name}." in k and "lora_B" in k]
        assert ups and any(v.abs().sum() > 0 for v in ups) == (steps[i] in drawn), name  # trained iff its step was drawn
    assert len(saved) == 4 * len([k for k in saved if ".critic." in k])
    with pytest.raises(ConfigError, match="dmd.critic_per_step needs LoRA critics"):
        load_config(base=_config(data_dir, tiny_sdxl_file, tmp_path / "bad", critic="full", **{"dmd.critic_per_step": True})).validate()


def test_critic_x0_high_noise_loss_replaces_the_target_loss(tmp_path, data_dir, tiny_sdxl_file, monkeypatch):
    """dmd.critic_loss=x0_high_noise trains the critic with objectives.critic_x0_loss on every iteration, at the
    SNR of each sample's own timestep, and never with the eps/v loss; an unknown value is refused."""
    from trainer import objectives
    from trainer.errors import ConfigError

    calls = {"x0": [], "target": 0}
    real_x0, real_target = objectives.critic_x0_loss, objectives.critic_denoising_loss

    def spy_x0(pred, x0, snr):
        calls["x0"].append(snr.flatten())
        return real_x0(pred, x0, snr)

    def spy_target(*args):
        calls["target"] += 1
        return real_target(*args)

    monkeypatch.setattr(objectives, "critic_x0_loss", spy_x0)
    monkeypatch.setattr(objectives, "critic_denoising_loss", spy_target)
    train(load_config(base=_config(data_dir, tiny_sdxl_file, tmp_path / "run", **{"dmd.critic_loss": "x0_high_noise"})))
    snr = torch.cat(calls["x0"])
    assert len(calls["x0"]) == 6 and calls["target"] == 0 and len(snr) == 6 * 2
    assert float(snr.min()) >= 0 and len(set(snr.tolist())) > 1  # one SNR per sample, from its own random timestep
    with pytest.raises(ConfigError, match="dmd.critic_loss must be target or x0_high_noise"):
        load_config(base=_config(data_dir, tiny_sdxl_file, tmp_path / "bad", **{"dmd.critic_loss": "v"})).validate()


def test_student_average_is_the_mean_of_its_updates_exported_and_resumed_exactly(tmp_path, data_dir, tiny_sdxl_file):
    """student.average_from=4 in 8 iterations (student updates at 0, 2, 4, 6): the LoRA is the mean of the
    student's weights after its updates at iterations 4 and 6, checkpoints carry it, and a resume reproduces it."""
    import shutil

    from trainer.config import ConfigError
    from trainer.export import lora_from_checkpoint

    cfg = _config(data_dir, tiny_sdxl_file, tmp_path / "straight", steps=8, checkpoint_every=1, keep_checkpoints=100,
                  **{"student.average_from": 4})
    lora = train(load_config(base=cfg))
    ckpt = lambda run, step: tmp_path / run / "checkpoints" / f"step-{step:08d}"  # noqa: E731
    after_4, after_6 = (load_file(ckpt("straight", step) / "student.safetensors") for step in (5, 7))
    mean = load_file(ckpt("straight", 8) / "student_average.safetensors")
    assert mean.keys() == after_4.keys() and any(not torch.equal(after_4[k], after_6[k]) for k in mean)
    for k in mean:
        torch.testing.assert_close(mean[k], (after_4[k] + after_6[k]) / 2, rtol=1e-6, atol=1e-7)
    assert not (ckpt("straight", 4) / "student_average.safetensors").exists()  # the window starts at iteration 4
    info = json.loads((ckpt("straight", 6) / "state.json").read_text())
    assert info["student_average"] == {"start": 4, "count": 1}
    # the exported LoRA is the mean, as `dmd2 export --run` converts the last checkpoint
    tensors, meta = lora_from_checkpoint(ckpt("straight", 8))
    exported = load_file(lora)
    assert tensors.keys() == exported.keys() and all(torch.equal(tensors[k], exported[k]) for k in tensors)
    with safe_open(lora, "pt") as f:
        assert f.metadata()["dmd2.average"] == meta["dmd2.average"] == "mean of the student's weights after each of its 2 updates from iteration 4"
    so_far = load_file(ckpt("straight", 6) / "student_average.safetensors")  # a checkpoint holds the mean so far
    assert all(torch.equal(so_far[k], after_4[k]) for k in so_far)
    early, _ = lora_from_checkpoint(ckpt("straight", 6))
    assert any(not torch.equal(early[k], exported[k]) for k in early if k.endswith("weight"))
    # resumed from inside the window, the run ends with the same mean to the bit
    shutil.copytree(ckpt("straight", 6), ckpt("resumed", 6))
    train(load_config(base=cfg, overrides=[f"output_dir={tmp_path / 'resumed'}"]), resume="latest")
    resumed = load_file(ckpt("resumed", 8) / "student_average.safetensors")
    assert all(torch.equal(resumed[k], mean[k]) for k in mean)
    # a config whose window starts elsewhere cannot continue that mean: one line says what to do
    shutil.copytree(ckpt("straight", 7), ckpt("other", 7))
    with pytest.raises(ConfigError, match=r"lacks the mean of the student's 1 updates from student.average_from=6: resume"):
        train(load_config(base=cfg, overrides=[f"output_dir={tmp_path / 'other'}", "student.average_from=6"]), resume="latest")
    with pytest.raises(ConfigError, match=r"student.average_from must be an iteration in \[0, steps=8\)"):
        load_config(base={**cfg, "student": {"average_from": 8}}).validate()


def test_lr_schedule_factors():
    from trainer.train import _lr_lambda

    constant, cosine = _lr_lambda(4, 20), _lr_lambda(4, 20, "cosine")
    assert [constant(s) for s in (0, 3, 19, 50)] == [0.25, 1.0, 1.0, 1.0]
    assert [cosine(s) for s in (0, 3, 4)] == [0.25, 1.0, 1.0]
    assert cosine(12) == pytest.approx(0.5) and cosine(20) == pytest.approx(0.0) and cosine(30) == pytest.approx(0.0)
    with pytest.raises(Exception, match="lr_schedule must be constant or cosine"):
        load_config(base={"model": "m", "prompts": "p", "optim": {"lr_schedule": "linear"}}).validate()
    with pytest.raises(Exception, match=r"gan.max_t must be in \(0, 1\]"):
        load_config(base={"model": "m", "prompts": "p", "gan": {"max_t": 0}}).validate()


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, data_dir, tiny_sdxl_file, monkeypatch):
    calls = {"n": 0}
    real = objectives.critic_denoising_loss

    def poisoned(pred, target):
        calls["n"] += 1
        return real(pred, target) * (float("nan") if calls["n"] == 5 else 1.0)

    monkeypatch.setattr(objectives, "critic_denoising_loss", poisoned)
    cfg = _config(data_dir, tiny_sdxl_file, tmp_path / "run", steps=8, checkpoint_every=2)
    with pytest.raises(TrainingDivergedError, match=r"critic/denoise is nan at step 4"):
        train(load_config(base=cfg))
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]  # the last good ones, complete (no temp folders)
    assert load_file(tmp_path / "run" / "checkpoints" / "step-00000004" / "student.safetensors")


@pytest.mark.parametrize("case", ["empty_prompts", "missing_images", "unreadable_image"])
def test_bad_data_is_refused_with_one_line(tmp_path, data_dir, tiny_sdxl_file, case):
    cfg = _config(data_dir, tiny_sdxl_file, tmp_path / "run")
    if case == "empty_prompts":
        (tmp_path / "empty.txt").write_text("\n  \n")
        cfg["prompts"], expected = str(tmp_path / "empty.txt"), "has no prompts"
    elif case == "missing_images":
        cfg["images"], expected = str(tmp_path / "nope"), "does not exist"
    else:
        folder = tmp_path / "imgs"
        folder.mkdir()
        Image.new("RGB", (8, 8)).save(folder / "good.png")
        (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        cfg["images"], expected = str(folder), "cannot read image"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    result = _dmd2("train", "--config", tmp_path / "run.yaml")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1], result.stderr[-1000:]
    assert "Traceback" not in result.stderr


def test_print_config_lists_every_option():
    result = _dmd2("train", "--print-config", "--set", "lora.rank=16")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    for key in ("model", "prompts", "images", "output_dir", "steps", "resolution", "batch_size", "seed", "critic",
                "checkpoint_every", "validate_every"):
        assert key in cfg
    assert cfg["student"]["timesteps"] == [999, 749, 499, 249] and cfg["lora"] == {"rank": 16, "alpha": 8.0, "critic_rank": None, "critic_alpha": None}
    assert cfg["dmd"]["guidance_scale"] == 8.0 and cfg["gan"]["student_weight"] == 0.005 and cfg["gan"]["critic_weight"] == 0.01
    assert cfg["student"]["update_every"] == 5 and cfg["dmd"]["critic_lr"] == 5e-5 and cfg["student"]["lr"] == 5e-5


def test_yaml_words_read_as_booleans_stay_words(tmp_path):
    """YAML 1.1 reads `no` as false: `mixed_precision: no` (accelerate's spelling) must mean "no", in a file and --set."""
    base = {"model": "m.safetensors", "prompts": "p.txt", "images": "none", "output_dir": str(tmp_path)}
    (tmp_path / "run.yaml").write_text("mixed_precision: no\n")
    assert load_config(tmp_path / "run.yaml", base=base).validate().mixed_precision == "no"
    assert load_config(None, ["mixed_precision=no"], base=base).validate().mixed_precision == "no"
    with pytest.raises(Exception, match="mixed_precision must be auto, no, bf16 or fp16, got 'yes'"):
        load_config(None, ["mixed_precision=yes"], base=base).validate()


@pytest.fixture(scope="module")
def vpred_tiny_file(tmp_path_factory) -> Path:
    from trainer.testing.tiny_sdxl import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny-vpred"), seed=1, v_pred=True, ztsnr=True)["single_file"]


@pytest.mark.parametrize("variant", ["vpred_ztsnr_1step", "full_critic_2step", "teacher_gan_data"])
def test_train_variants(tmp_path, data_dir, tiny_sdxl_file, vpred_tiny_file, variant):
    """v-prediction + zero-terminal-SNR teachers with the 1-step preset (t=399), the full critic with the 2-step
    preset, and teacher-generated GAN data when there is no image folder."""
    extra = {"steps": 3}
    model = tiny_sdxl_file
    if variant == "vpred_ztsnr_1step":
        model, extra["student.timesteps"] = vpred_tiny_file, 1
    elif variant == "full_critic_2step":
        extra["critic"], extra["student.timesteps"] = "full", 2
    else:
        extra.update({"images": None, "gan.real_data": "teacher", "gan.teacher_samples": 4, "gan.teacher_steps": 2})
    cfg = load_config(base=_config(data_dir, model, tmp_path / "run", **extra))
    lora = train(cfg)
    meta = safe_open(lora, "pt").metadata()
    expected = {"vpred_ztsnr_1step": [399], "full_critic_2step": [999, 499], "teacher_gan_data": [999, 749, 499, 249]}[variant]
    assert json.loads(meta["dmd2.timesteps"]) == expected
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    critic = load_file(ckpt / "critic.safetensors")
    if variant == "vpred_ztsnr_1step":
        assert meta["dmd2.prediction_type"] == "v_prediction"
    if variant == "full_critic_2step":
        assert not any("lora_" in k for k in critic) and "conv_in.weight" in critic  # a whole UNet
    else:
        assert critic and all(".critic." in k for k in critic)
    if variant == "teacher_gan_data":
        parts = list((tmp_path / "run" / "cache").glob("teacher-*/part-*.safetensors"))
        assert len(parts) == 1 and load_file(parts[0])
        assert load_file(ckpt / "gan_head.safetensors")


def test_ctrl_c_writes_a_checkpoint_and_resumes(tmp_path, data_dir, tiny_sdxl_file):
    import signal
    import time

    cfg = _config(data_dir, tiny_sdxl_file, tmp_path / "run", steps=400)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "train", "--config", str(tmp_path / "run.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    events = tmp_path / "run" / "logs"
    while time.time() < deadline and not list(events.rglob("events.out.tfevents.*")):
        time.sleep(0.5)
    time.sleep(3)  # a few iterations
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "continue with --resume latest" in out
    saved = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert len(saved) == 1 and 0 < int(saved[0].name[5:]) < 400
    result = _dmd2("train", "--config", tmp_path / "run.yaml", "--resume", "latest", "--set", f"steps={int(saved[0].name[5:]) + 1}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"at step {int(saved[0].name[5:])}" in result.stdout
