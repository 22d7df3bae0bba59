"""Faults during training: signals, kills at random moments, non-finite losses, failed checkpoint writes."""

import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


def _train_args(config_file, out, *sets) -> list[str]:
    args = [sys.executable, "-m", "med_train.cli", "train", str(config_file), "--output-dir", str(out)]
    for s in sets:
        args += ["--set", s]
    return args


def _start(config_file, out, *sets, prefix=(), **popen):
    """`med train` in a process of its own (`prefix`: a launcher before it, e.g. `timeout`)."""
    return subprocess.Popen([*prefix, *_train_args(config_file, out, *sets)],
                            **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen})


def _wait_for_steps(run_root: Path, n: int, proc, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        runs = [p for p in run_root.glob("*") if p.is_dir() and not p.is_symlink()] if run_root.exists() else []
        if runs and (runs[0] / "metrics.jsonl").exists() and len(_steps(runs[0])) >= n:
            return runs[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not get going")


@pytest.mark.parametrize("signum,to", [(signal.SIGTERM, "the process"), (signal.SIGTERM, "timeout"),
                                       (signal.SIGINT, "the group")])
def test_a_signal_saves_a_checkpoint_and_exits_cleanly(config_file, tmp_path, signum, to):
    """To the training process alone, or to its whole process group as `timeout`, Slurm, Kubernetes and Ctrl-C send
    it: the loader workers (data.num_workers=2) ignore it; the training process finishes its step, saves a
    checkpoint, says how to resume and exits 0."""
    if to == "timeout" and shutil.which("timeout") is None:
        pytest.skip("no `timeout` command here (GNU coreutils)")
    prefix = ("timeout", "-s", "TERM", "600") if to == "timeout" else ()
    proc = _start(config_file, tmp_path / "runs", "train.max_steps=400", "train.save_every=1000",
                  "data.num_workers=2", prefix=prefix, start_new_session=True)
    try:
        run = _wait_for_steps(tmp_path / "runs", 3, proc)
        if to == "the group":
            os.killpg(proc.pid, signum)
        else:  # `timeout` passes a signal it gets on to its whole group, as it does when its time is up
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err[-2000:]
    assert f"stopped by signal {signum.value} at step" in out + err
    assert f"`med train --resume {run}`" in out + err
    saved = checkpoint_dirs(run)
    assert saved and int(saved[-1].name.removeprefix("step_")) == _steps(run)[-1]


@pytest.mark.slow
def test_a_signal_to_the_group_of_two_processes_stops_both_after_the_same_step(config_file, tmp_path):
    """torchrun with 2 CPU processes, each with a loader worker; SIGTERM to the whole group (torchrun passes it on
    again): both processes stop after the same step, without torchrun having to kill them, into one checkpoint
    that holds both; it resumes."""
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537",
            "-m", "med_train.cli", "train", str(config_file), "--output-dir", str(tmp_path / "runs")]
    for setting in ("train.max_steps=400", "train.save_every=1000", "data.num_workers=1"):
        args += ["--set", setting]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        run = _wait_for_steps(tmp_path / "runs", 3, proc, timeout=300)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    stopped = _steps(run)[-1]
    assert f"stopped by signal 15 at step {stopped}" in out + err, err[-3000:]
    assert "forcefully" not in err  # torchrun did not have to SIGKILL a process that would not stop
    assert sorted(p.name for p in (run / "checkpoints" / f"step_{stopped}").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert [p.name for p in checkpoint_dirs(run)] == [f"step_{stopped}"]
    result = runner.invoke(app, ["train", "--resume", str(run), "--set", f"train.max_steps={stopped + 2}"])
    assert result.exit_code == 0, result.output
    assert _steps(run) == list(range(1, stopped + 3))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["the group", "timeout"])
def test_med_train_processes_stops_on_a_signal_and_exits_0(config_file, tmp_path, how):
    """`med train --processes 2` (torchrun's launcher in a session of its own): SIGTERM to the command's whole
    group, or through `timeout -s TERM`, reaches the training processes only; they stop after the same step into
    one checkpoint, and the command exits 0 with the resume line and no traceback (bare torchrun, reached by the
    signal itself, reports it as its own failure); the run resumes."""
    if how == "timeout" and shutil.which("timeout") is None:
        pytest.skip("no `timeout` command here (GNU coreutils)")
    prefix = ["timeout", "-s", "TERM", "600"] if how == "timeout" else []
    args = [*prefix, *_train_args(config_file, tmp_path / "runs", "train.max_steps=400", "train.save_every=1000",
                                  "data.num_workers=1"), "--processes", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        run = _wait_for_steps(tmp_path / "runs", 3, proc, timeout=300)
        if how == "the group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:  # `timeout` passes it on to its group: the command; the launcher's session is its own
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err[-3000:]
    stopped = _steps(run)[-1]
    assert f"stopped by signal 15 at step {stopped}" in out + err
    assert f"`med train --resume {run}`" in out + err
    assert "Traceback" not in out + err, err[-3000:]
    assert sorted(p.name for p in (run / "checkpoints" / f"step_{stopped}").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    result = runner.invoke(app, ["train", "--resume", str(run), "--set", f"train.max_steps={stopped + 1}"])
    assert result.exit_code == 0, result.output
    assert _steps(run) == list(range(1, stopped + 2))


STAND_IN = """
import signal, subprocess, sys
signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))  # as torchrun: a signal that reaches it is a failure
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)  # as torchrun's workers
sys.exit(child.wait())
"""
CHILD = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (print("child stopped cleanly", flush=True), sys.exit(0)))
open({ready!r}, "w").close()
time.sleep(60)
sys.exit(3)
"""


def test_processes_pass_a_signal_to_the_training_processes_only(tmp_path):
    """The launcher's forwarding (`launch._wait`), with a stand-in for torchrun that fails if a signal reaches it
    and whose child lives in a session of its own (as torchrun's training processes do): SIGTERM to the whole
    group of the command reaches the child only, which exits 0; so does the stand-in, and the command."""
    ready = tmp_path / "ready"
    command = (f"import subprocess, sys; from med_train import launch\n"
               f"stand_in = subprocess.Popen([sys.executable, '-c', {STAND_IN!r}, {CHILD.format(ready=str(ready))!r}],"
               f" start_new_session=True)\n"
               f"sys.exit(launch._wait(stand_in))\n")
    proc = subprocess.Popen([sys.executable, "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err
    assert "child stopped cleanly" in out


def test_a_failed_process_under_processes_is_one_line(tmp_path):
    """A training process that fails under the launcher (`python -m med_train.launch`, torchrun's own launch) says
    why in its line; the launcher adds one naming it and its exit code, not torchrun's report with a traceback."""
    script = tmp_path / "fails.py"
    script.write_text("import os, sys\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    print('error: data/x.jsonl line 3: not JSON', file=sys.stderr)\n"
                      "    sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-m", "med_train.launch", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert "error: data/x.jsonl line 3: not JSON" in proc.stderr
    assert "error: training process 1 failed with exit code 3" in proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr


def test_processes_under_another_launcher_is_refused_in_one_line(config_file, tmp_path, monkeypatch):
    """`--processes` starts the processes itself: under torchrun or accelerate launch (WORLD_SIZE set) it is a
    usage error naming the option, before anything is written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.invoke(app, ["train", str(config_file), "--output-dir", str(tmp_path / "runs"), "--processes", "2"])
    assert result.exit_code == 2 and "--processes starts the processes itself" in result.output
    assert not (tmp_path / "runs").exists()


def _kill_group(proc) -> None:
    """kill -9 whatever is left of a process group started with `start_new_session` (its loader workers too)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


KILL_MOMENTS = ("any time", "writing a checkpoint", "publishing it, before the rename", "publishing it, after the rename")


def _newest(run: Path) -> int:
    done = checkpoint_dirs(run)
    return int(done[-1].name.removeprefix("step_")) if done else 0


def _moment_came(moment: str, run: Path, after: int, since: float) -> bool:
    """Whether the run is at `moment` of a checkpoint later than step `after`: its temporary folder exists (accelerate
    writing into it), holds trainer_state.json (publish: the model's config and tokenizer, the rename to come), or
    it has just been renamed whole (publish: old checkpoints pruned, the last weights written). Temporary files left
    by an earlier kill (older than `since`) are not this life's."""
    if moment == "publishing it, after the rename":
        return _newest(run) > after
    for folder in (run / "checkpoints").glob(".tmp_step_*"):
        path = folder if moment == "writing a checkpoint" else folder / "trainer_state.json"
        try:
            if int(folder.name.removeprefix(".tmp_step_")) > after and path.stat().st_mtime > since:
                return True
        except FileNotFoundError:  # renamed or removed meanwhile
            continue
    return False


def _kill_at(moment: str, proc, run: Path, rng: random.Random, start_up: float) -> bool:
    """kill -9 the run's process group at `moment` of a checkpoint 1-3 steps on, or at "any time" within a life's
    `start_up` seconds (loading, resuming, training, checkpointing: whatever it is doing then; at the latest as the
    third new checkpoint appears). A life makes 0-3 steps of progress. False when the run ended first."""
    after, since, deadline = _newest(run), time.time(), time.time() + 300
    if moment == "any time":
        moment, after, deadline = "publishing it, after the rename", after + 2, since + rng.uniform(0.0, start_up)
    else:
        after += rng.randint(0, 2)
    while not _moment_came(moment, run, after, since) and time.time() < deadline:
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    assert time.time() < since + 300, f"no checkpoint after step {after} came"
    if proc.poll() is not None:
        return False
    _kill_group(proc)
    return True


def _kill_and_resume(config_file, runs: Path, name: str, sets, env, kills_wanted: int, seed: int) -> dict[str, int]:
    """Start run `name`, kill -9 it `kills_wanted` times, at each of KILL_MOMENTS in turn, resuming it after each;
    let the last life finish. Returns the kills made at each moment, and how many left a half-written checkpoint."""
    rng, run, log = random.Random(seed), runs / name, runs.parent / f"{name}.log"
    kills = dict.fromkeys((*KILL_MOMENTS, "left a half-written checkpoint"), 0)
    with open(log, "w") as out:
        def start(args):
            return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

        born = time.time()
        life = start(_train_args(config_file, runs, *sets, f"train.run_name={name}"))
        try:
            while not _newest(run):  # the first life writes a checkpoint to resume from
                assert life.poll() is None, log.read_text()[-2000:]
                time.sleep(0.01)
            start_up = time.time() - born
            for n in range(kills_wanted):
                moment = KILL_MOMENTS[n % len(KILL_MOMENTS)]
                assert _kill_at(moment, life, run, rng, start_up), f"{name} ended before kill {n + 1}: more steps"
                kills[moment] += 1
                kills["left a half-written checkpoint"] += any(
                    p.stat().st_mtime >= born for p in (run / "checkpoints").glob(".tmp_step_*"))
                assert checkpoint_dirs(run), f"{name}: no whole checkpoint after kill {n + 1}"
                born = time.time()
                life = start([sys.executable, "-m", "med_train.cli", "train", "--resume", str(run)])
            assert life.wait(timeout=600) == 0, log.read_text()[-3000:]
        finally:
            _kill_group(life)
    return kills


def _shared_tokenizer(config_file, folder: Path) -> Path:
    """One vocabulary for runs that are compared weight for weight (each training its own could break ties
    differently)."""
    from med_train.data import iter_captions
    from med_train.tokenizer import train_tokenizer

    cfg = load_config(config_file)
    captions = (cfg.model.prompt + c for c in iter_captions(cfg.data, cfg.data.train_split))
    train_tokenizer(captions, cfg.tokenizer.vocab_size).save_pretrained(str(folder))
    return folder


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_loses_and_repeats_nothing(config_file, tmp_path):
    """50 kill -9s of runs that save a checkpoint every step, at random moments: while one starts, trains, writes a
    checkpoint or publishes it; each followed by a resume. Two runs are killed side by side, 25 times each, while an
    uninterrupted one trains. Every resume goes on from the last whole checkpoint; in the end every step is logged
    once, in order, and the weights are bit for bit the uninterrupted run's."""
    import torch
    from safetensors.torch import load_file

    steps, chains, kills_each = 100, 2, 25  # no life makes more than 3 steps: the last one still has 24 to go
    runs, env = tmp_path / "runs", {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the same sums in every run
    sets = (f"train.max_steps={steps}", "train.save_every=1", "train.keep_checkpoints=2",
            f"tokenizer.name={_shared_tokenizer(config_file, tmp_path / 'vocabulary')}")
    whole = _start(config_file, runs, *sets, "train.run_name=whole", env=env, start_new_session=True)
    try:
        with ThreadPoolExecutor(chains) as pool:
            chained = [pool.submit(_kill_and_resume, config_file, runs, f"killed-{i}", sets, env, kills_each, seed=i)
                       for i in range(chains)]
            kills = [future.result() for future in chained]
        _, err = whole.communicate(timeout=600)
    finally:
        _kill_group(whole)
    assert whole.returncode == 0, err[-2000:]
    survived = {what: sum(k[what] for k in kills) for what in kills[0]}
    print(f"kill -9s survived: {survived}")  # the figures the README gives
    assert sum(survived[moment] for moment in KILL_MOMENTS) == chains * kills_each
    want = load_file(runs / "whole" / "model.safetensors")
    for i in range(chains):
        run = runs / f"killed-{i}"
        assert _steps(run) == list(range(1, steps + 1)), run  # every step once, in order
        got = load_file(run / "model.safetensors")
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), f"{run}: not the uninterrupted run's weights"


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


def _fail_writes_into(folder_name: str, error: Exception, write):
    """`write(obj, path, ...)` that raises `error` for a path inside a folder named `folder_name` (leaving a part of
    the file, as a write cut short does) and writes anything else."""
    def failing(obj, path, *args, **kwargs):
        if folder_name in Path(path).parts:
            Path(path).write_bytes(b"part of a file")
            raise error
        return write(obj, path, *args, **kwargs)

    return failing


@pytest.mark.parametrize("writer,error,says", [
    ("save_state", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
    ("torch.save", RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                                "data/0: file write failed\n(a C++ stack)"),
     "RuntimeError: [enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0"),
    ("safetensors", "Error while serializing: I/O error: No space left on device (os error 28)",
     "SafetensorError: Error while serializing: I/O error: No space left on device (os error 28)"),
])
def test_a_failed_checkpoint_write_is_a_clear_error_and_keeps_the_previous(config_file, tmp_path, monkeypatch,
                                                                           writer, error, says):
    """Whatever the writer raises (accelerate's OSError, torch.save's RuntimeError, safetensors' SafetensorError):
    one line naming the checkpoint and the cause; the temporary folder removed; the previous checkpoint resumes."""
    import accelerate.utils.other
    import torch
    from accelerate import Accelerator
    from safetensors import SafetensorError

    real_save = Accelerator.save_state
    saves = {"n": 0}

    def full_disk(self, output_dir=None, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "partial.bin").write_bytes(b"x")
            raise error
        return real_save(self, output_dir, **kwargs)

    if writer == "save_state":
        monkeypatch.setattr(Accelerator, "save_state", full_disk)
    elif writer == "torch.save":  # the optimizer's, scheduler's and random states' files
        monkeypatch.setattr(torch, "save", _fail_writes_into(".tmp_step_4", error, torch.save))
    else:  # the model's weights
        monkeypatch.setattr(accelerate.utils.other, "safe_save_file", _fail_writes_into(
            ".tmp_step_4", SafetensorError(error), accelerate.utils.other.safe_save_file))
    cfg = load_config(config_file, ["train.max_steps=6", "train.save_every=2", f"train.output_dir={tmp_path}"])
    with pytest.raises(TrainingError) as err:
        train(cfg, config_file)
    run = next(p for p in tmp_path.iterdir() if p.is_dir() and not p.is_symlink())
    assert f"could not write checkpoint {run / 'checkpoints' / 'step_4'} ({says}" in str(err.value)
    assert "step_2 is intact" in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in checkpoint_dirs(run)] == ["step_2"]
    assert not list((run / "checkpoints").glob(".tmp*"))
    if writer != "save_state":  # the run folder is as that case leaves it, and its resume is tested there
        return
    monkeypatch.undo()
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_metrics_line_that_cannot_be_written_stops_the_run_in_one_line_and_it_resumes(config_file, tmp_path,
                                                                                         monkeypatch):
    """A full disk while appending step 3's line (the part written left torn): one line naming metrics.jsonl and
    the cause, exit 1, the step-2 checkpoint whole; the resume logs every step once."""
    from med_train import train as train_module

    real_append = train_module.append_jsonl

    def full_disk(path, record):
        if record.get("step") == 3:
            with open(path, "a") as f:
                f.write('{"step": 3, "lo')
            _no_space()
        real_append(path, record)

    monkeypatch.setattr(train_module, "append_jsonl", full_disk)
    result = runner.invoke(app, ["train", str(config_file), "--output-dir", str(tmp_path), "--set",
                                 "train.max_steps=6", "--set", "train.save_every=2"])
    assert result.exit_code == 1, result.output
    run = next(p for p in tmp_path.iterdir() if p.is_dir() and not p.is_symlink())
    assert "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("error")] == [
        f"error: could not write {run / 'metrics.jsonl'} (No space left on device); the last complete checkpoint "
        f"{run / 'checkpoints' / 'step_2'} is intact: free space or fix the folder, then `med train --resume {run}`"]
    assert [p.name for p in checkpoint_dirs(run)] == ["step_2"]
    monkeypatch.undo()
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


FULL_DISK_AT_STEP_3 = """
import errno, os, sys
from med_train import train
from med_train.cli import app

real_append = train.append_jsonl

def full_disk(path, record):
    if record.get("step") == 3:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real_append(path, record)

train.append_jsonl = full_disk
app(sys.argv[1:], prog_name="med")
"""


@pytest.mark.slow
def test_a_metrics_line_that_cannot_be_written_stops_every_process(config_file, tmp_path):
    """torchrun with 2 CPU processes; only the main one writes metrics.jsonl, and cannot: the other stops too, by
    itself (its own line says so), rather than waiting for the main process in the next step."""
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_AT_STEP_3)
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29538",
            str(script), "train", str(config_file), "--output-dir", str(tmp_path / "runs")]
    for setting in ("train.max_steps=6", "train.save_every=2"):
        args += ["--set", setting]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    run = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir() and not p.is_symlink())
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    resume = f"the last complete checkpoint {run / 'checkpoints' / 'step_2'} is intact"
    assert errors == [f"error: could not write {run / 'metrics.jsonl'} ({cause}); {resume}: free space or fix the "
                      f"folder, then `med train --resume {run}`" for cause in (
                          "No space left on device", "the main process could not; its error names the cause")]
    # torchrun reports a failed worker with its own traceback; none runs through the trainer's code
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith("File ") and "med_train" in line]
    assert [p.name for p in checkpoint_dirs(run)] == ["step_2"]


def test_run_folder_files_that_cannot_be_written_are_one_line_each(config_file, tmp_path, monkeypatch):
    """run.json before the first step: one line, the run removed; the curves at the end: a warning naming the file
    and the cause, then a one-line stop (exit 1) saying the run is complete."""
    from med_train import train as train_module

    real_write = train_module.atomic_write
    monkeypatch.setattr(train_module, "atomic_write", lambda path, data: _no_space() if Path(path).name == "run.json"
                        else real_write(path, data))
    args = ["train", str(config_file), "--set", "train.max_steps=2", "--set", "train.save_every=2"]
    result = runner.invoke(app, [*args, "--output-dir", str(tmp_path / "a")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    [message] = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert re.fullmatch(rf"error: could not write {re.escape(str(tmp_path / 'a'))}/tiny-[0-9-]+/run\.json "
                        r"\(No space left on device\); no earlier checkpoint exists", message), message
    assert not list((tmp_path / "a").iterdir())  # nothing trained: the folder removed, no runs/latest

    monkeypatch.undo()
    monkeypatch.setattr(train_module, "_plot_curves", _no_space)
    result = runner.invoke(app, [*args, "--output-dir", str(tmp_path / "b")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    run = next(p for p in (tmp_path / "b").iterdir() if p.is_dir() and not p.is_symlink())
    assert sorted(line for line in result.output.splitlines() if "could not" in line) == sorted([
        f"warning: could not write {run / 'curves.png'} (OSError: [Errno 28] No space left on device)",
        f"error: {run / 'curves.png'} could not be written (said above); the run is complete, its last weights in "
        f"{run}"])
    assert _steps(run) == [1, 2] and (run / "model.safetensors").is_file()


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB filesystem of its own (tmpfs), where this user may mount one (root); skipped elsewhere."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("mounting a small filesystem (tmpfs) needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_and_the_last_checkpoint_resumes(config_file, small_disk,
                                                                                monkeypatch):
    """A real full disk: after the step-2 checkpoint the disk is filled (room left for the metrics lines, not for a
    checkpoint), so the step-4 checkpoint cannot be written."""
    from med_train import train as train_module

    real_checkpoint, filler = train_module._checkpoint, small_disk / "filler"

    def then_fill_the_disk(run):
        real_checkpoint(run)
        if not filler.exists():
            filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 64 * 1024))

    monkeypatch.setattr(train_module, "_checkpoint", then_fill_the_disk)
    result = runner.invoke(app, ["train", str(config_file), "--output-dir", str(small_disk), "--set",
                                 "train.max_steps=6", "--set", "train.save_every=2"])
    assert result.exit_code == 1, result.output
    run = next(p for p in small_disk.iterdir() if p.is_dir() and not p.is_symlink())
    message = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert message.startswith(f"error: could not write checkpoint {run / 'checkpoints' / 'step_4'} (")
    assert "No space left on device" in message and "MB free there" in message, message  # the writer's, ours
    assert f"step_2 is intact: free space or fix the folder, then `med train --resume {run}`" in message
    assert [p.name for p in checkpoint_dirs(run)] == ["step_2"]
    assert not list((run / "checkpoints").glob(".tmp*"))
    filler.unlink()
    monkeypatch.undo()
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


def test_best_and_last_weights_that_cannot_be_written_are_one_line_each(config_file, tmp_path, monkeypatch):
    """best/ (written by the main process outside a checkpoint) that cannot be written is a warning naming it and
    the cause, and training goes on; the last weights that cannot be written stop the run in one line once every
    process has finished, naming the checkpoint that holds them."""
    from med_train.model import Captioner

    real_save = Captioner.save_pretrained
    run_weights = []

    def full_disk(self, out_dir, **kwargs):
        if (Path(out_dir) / "checkpoints").is_dir() and kwargs.get("weights", True):
            run_weights.append(out_dir)  # the last checkpoint's copy of the last weights, then the end's
        if Path(out_dir).name == "best" or len(run_weights) == 2:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed\n(a C++ stack)")
        return real_save(self, out_dir, **kwargs)

    monkeypatch.setattr(Captioner, "save_pretrained", full_disk)
    result = runner.invoke(app, ["train", str(config_file), "--output-dir", str(tmp_path), "--set",
                                 "train.max_steps=2", "--set", "train.save_every=2", "--set", "train.eval_every=2"])
    assert result.exit_code == 1, result.output
    run = next(p for p in tmp_path.iterdir() if p.is_dir() and not p.is_symlink())
    cause = "(RuntimeError: PytorchStreamWriter failed writing file data/0: file write failed)"
    assert sorted(line for line in result.output.splitlines() if "could not" in line) == sorted([
        f"warning: could not write {run / 'best'} {cause}",
        f"warning: could not write {run / 'model.safetensors'} {cause}",
        f"error: the last weights could not be written to {run} (said above); the last complete checkpoint "
        f"{run / 'checkpoints' / 'step_2'} holds step 2"])
    assert "Traceback" not in result.output and _steps(run) == [1, 2]
