"""Faults during training: signals, kills at random moments, non-finite losses, failed checkpoint writes."""

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_e2e import TINY
from typer.testing import CliRunner

from med_train.cli import app
from med_train.config import load_config
from med_train.run_folder import checkpoint_dirs
from med_train.train import TrainingError, train

runner = CliRunner()


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    assert runner.invoke(app, ["data", "shapes", str(root / "shapes"), "--train", "48", "--val", "0", "--test", "4"]).exit_code == 0
    config = {**TINY, "data": {**TINY["data"], "source": str(root / "shapes")},
              "train": {**TINY["train"], "eval_every": 0, "eval_images": 4}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return root / "tiny.yaml"


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _start(config_file, out, *sets):
    args = [sys.executable, "-m", "med_train.cli", "train", str(config_file), "--output-dir", str(out)]
    for s in sets:
        args += ["--set", s]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(run_root: Path, n: int, proc, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        runs = [p for p in run_root.glob("*") if p.is_dir() and not p.is_symlink()] if run_root.exists() else []
        if runs and (runs[0] / "metrics.jsonl").exists() and len(_steps(runs[0])) >= n:
            return runs[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not get going")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_exits_cleanly(config_file, tmp_path, signum):
    proc = _start(config_file, tmp_path / "runs", "train.max_steps=400", "train.save_every=1000")
    run = _wait_for_steps(tmp_path / "runs", 3, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal" in out + err
    saved = checkpoint_dirs(run)
    assert saved and int(saved[-1].name.removeprefix("step_")) == _steps(run)[-1]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_loses_and_repeats_nothing(config_file, tmp_path):
    rng = random.Random(0)
    proc = _start(config_file, tmp_path / "runs", "train.max_steps=40", "train.save_every=3")
    run = _wait_for_steps(tmp_path / "runs", 4, proc)  # a first checkpoint exists
    resume = [sys.executable, "-m", "med_train.cli", "train", "--resume", str(run)]
    for _ in range(3):  # kill at a random moment (sometimes inside a checkpoint write), resume, again
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait()
        assert checkpoint_dirs(run)
        proc = subprocess.Popen(resume, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3.0)  # let it load before the next kill
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert _steps(run) == list(range(1, 41))  # every step once, in order


def test_a_half_written_checkpoint_is_never_chosen(config_file, tmp_path):
    cfg = load_config(config_file, ["train.max_steps=4", "train.save_every=2", f"train.output_dir={tmp_path}"])
    run = train(cfg, config_file)
    half = run / "checkpoints" / ".tmp_step_6"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)  # killed mid-write: no trainer_state.json, temp name
    assert [p.name for p in checkpoint_dirs(run)] == ["step_2", "step_4"]


def test_cpu_training_keeps_freed_memory_for_reuse(config_file, tmp_path, monkeypatch):
    """`med train` on the CPU asks the C allocator to keep freed memory (train.keep_freed_memory: fewer page
    faults per step)."""
    from med_train import train as train_module

    calls = []
    monkeypatch.setattr(train_module, "keep_freed_memory", lambda: calls.append(True) or True)
    train(load_config(config_file, ["train.max_steps=1", f"train.output_dir={tmp_path}"]), config_file)
    assert calls == [True]


def test_non_finite_losses_are_skipped_and_counted_then_stop_the_run(config_file, tmp_path, monkeypatch):
    import torch

    from med_train import train as train_module
    from med_train.model import Captioner

    real_forward = Captioner.forward
    calls = {"n": 0}
    bad_calls = {2, 3}

    def flaky_forward(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_forward(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] in bad_calls else loss

    monkeypatch.setattr(Captioner, "forward", flaky_forward)
    cfg = load_config(config_file, ["train.max_steps=5", "train.save_every=5", f"train.output_dir={tmp_path}"])
    run = train(cfg, config_file)
    state = json.loads((checkpoint_dirs(run)[-1] / "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 2 and state["step"] == 5
    assert _steps(run) == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(p).all() for p in Captioner.from_pretrained(run).parameters())

    bad_calls.update(range(1, 10_000))  # from now on every loss is NaN
    monkeypatch.setattr(train_module, "MAX_NONFINITE_IN_A_ROW", 4)
    cfg = load_config(config_file, ["train.max_steps=8", "train.save_every=2", f"train.output_dir={tmp_path}/b"])
    calls["n"] = -3  # three good steps first
    bad_calls.difference_update({-2, -1, 0})
    with pytest.raises(TrainingError, match=r"step 4: 4 non-finite steps in a row.*--resume"):
        train(cfg, config_file)


def test_a_finite_loss_with_non_finite_gradients_is_skipped_too(config_file, tmp_path, monkeypatch):
    """fp16 overflow and the like: the loss is finite but a gradient is not; with clipping on, the step is dropped
    rather than writing NaN into the weights."""
    import torch

    from med_train.model import Captioner

    class InfiniteGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    real_forward = Captioner.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_forward(self, *args, **kwargs)
        return InfiniteGradient.apply(loss) if calls["n"] == 2 else loss

    monkeypatch.setattr(Captioner, "forward", forward)
    cfg = load_config(config_file, ["train.max_steps=3", "train.save_every=3", "train.clip_grad_norm=1.0",
                                    f"train.output_dir={tmp_path}"])
    run = train(cfg, config_file)
    state = json.loads((checkpoint_dirs(run)[-1] / "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 1 and state["step"] == 3
    assert all(torch.isfinite(p).all() for p in Captioner.from_pretrained(run).parameters())
    norms = [json.loads(line)["grad_norm"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert len(norms) == 3 and all(isinstance(n, float) and math.isfinite(n) and n > 0 for n in norms)


def test_a_failed_checkpoint_write_is_a_clear_error_and_keeps_the_previous(config_file, tmp_path, monkeypatch):
    from accelerate import Accelerator

    real_save = Accelerator.save_state
    saves = {"n": 0}

    def full_disk(self, output_dir=None, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "partial.bin").write_bytes(b"x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    cfg = load_config(config_file, ["train.max_steps=6", "train.save_every=2", f"train.output_dir={tmp_path}"])
    with pytest.raises(TrainingError, match="No space left on device") as err:
        train(cfg, config_file)
    run = next(p for p in tmp_path.iterdir() if p.is_dir() and not p.is_symlink())
    assert "step_2 is intact" in str(err.value)
    assert [p.name for p in checkpoint_dirs(run)] == ["step_2"]
    assert not list((run / "checkpoints").glob(".tmp*"))
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
