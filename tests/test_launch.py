"""accelerate's habits: the launcher's mixed precision, bare `--resume` in any order, and resuming with another
number of processes or dataloader workers (tiny runs through the real CLI)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_e2e
from typer.testing import CliRunner

from med_train.cli import app
from med_train.config import Config, save_config
from med_train.run_folder import checkpoint_dirs
from med_train.train import TrainingError, choose_precision

runner = CliRunner()
workspace = test_e2e.workspace  # the tiny config (tiny.yaml) and its shapes set


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one state per process and refuses another precision in it: each test starts afresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step_{step}" / "trainer_state.json").read_text())


def _losses(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# ---- precision -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("configured,launcher,used,says", [
    (None, None, "no", False),
    (None, "bf16", "bf16", False),
    (None, "FP16", "fp16", False),
    ("bf16", None, "bf16", False),
    ("bf16", "bf16", "bf16", False),
    ("no", "bf16", "no", True),
    ("bf16", "no", "bf16", True),
])
def test_the_launchers_precision_applies_unless_the_config_sets_one(configured, launcher, used, says):
    environ = {} if launcher is None else {"ACCELERATE_MIXED_PRECISION": launcher}
    precision, note = choose_precision(configured, environ)
    assert precision == used
    assert (note is not None) == says
    if says:  # both values, and where each came from
        assert f"{configured} (train.mixed_precision in the config) wins over {launcher}" in note
        assert "ACCELERATE_MIXED_PRECISION" in note and "\n" not in note


def test_a_bad_launcher_precision_is_one_line_naming_the_variable():
    with pytest.raises(TrainingError, match=r"ACCELERATE_MIXED_PRECISION='bf61'.*no \| fp16 \| bf16"):
        choose_precision(None, {"ACCELERATE_MIXED_PRECISION": "bf61"})


@pytest.mark.parametrize("configured,used", [(None, "bf16"), ("no", "no")])
def test_the_chosen_precision_is_the_accelerators(monkeypatch, configured, used):
    from accelerate import Accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as `accelerate launch --mixed_precision bf16` does
    assert Accelerator(cpu=True, mixed_precision=choose_precision(configured)[0]).mixed_precision == used


def test_a_run_records_the_precision_it_used(workspace, monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    base = ["train", str(workspace / "tiny.yaml"), "--set", "train.max_steps=1", "--set", "train.eval_every=0"]
    result = runner.invoke(app, [*base, "--output-dir", str(tmp_path / "launcher")])
    assert result.exit_code == 0, result.output
    assert "wins over" not in result.output
    assert _state(Path(os.path.realpath(tmp_path / "launcher" / "latest")), 1)["mixed_precision"] == "bf16"

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a new command line is a new process
    result = runner.invoke(app, [*base, "--output-dir", str(tmp_path / "config"), "--set", "train.mixed_precision=no"])
    assert result.exit_code == 0, result.output
    assert "mixed precision no (train.mixed_precision in the config) wins over bf16" in result.output
    assert _state(Path(os.path.realpath(tmp_path / "config" / "latest")), 1)["mixed_precision"] == "no"


# ---- --resume in any order -------------------------------------------------------------------------------------

@pytest.fixture
def runs(tmp_path, monkeypatch):
    """runs/old and runs/new (runs/latest -> new), each with a config; `med train` recorded, not run."""
    monkeypatch.chdir(tmp_path)
    for name in ("old", "new"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        save_config(Config(), tmp_path / "runs" / name / "config.yaml")
    (tmp_path / "runs" / "latest").symlink_to("new")
    calls = []

    def train(cfg, config_path=None, resume=None):
        calls.append({"resume": resume, "config_path": config_path, "quiet": cfg.train.quiet, "lr": cfg.train.lr})
        return resume

    monkeypatch.setattr("med_train.train.train", train)
    return tmp_path / "runs", calls


@pytest.mark.parametrize("args,run,quiet", [
    (["--resume"], "new", False),
    (["--resume", "--quiet"], "new", True),
    (["--quiet", "--resume"], "new", True),
    (["--resume", "runs/old"], "old", False),
    (["--resume", "runs/old", "--quiet"], "old", True),
    (["runs/old", "--resume"], "old", False),
    (["--resume=runs/old"], "old", False),
    (["--resume=runs/old", "--quiet"], "old", True),
])
def test_resume_takes_a_run_folder_or_runs_latest_in_any_order(runs, args, run, quiet):
    root, calls = runs
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    assert calls == [{"resume": (root / run).resolve(), "config_path": None, "quiet": quiet, "lr": Config().train.lr}]


def test_resume_applies_set_overrides_wherever_they_stand(runs):
    root, calls = runs
    result = runner.invoke(app, ["train", "--set", "train.lr=0.5", "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    assert calls[0]["lr"] == 0.5 and calls[0]["resume"] == (root / "new").resolve() and calls[0]["quiet"]


@pytest.mark.parametrize("args,message", [
    (["runs/old"], "runs/old is a run folder: add --resume to continue it"),
    (["--resume", "runs/old/config.yaml"], "not a run folder"),
    (["--resume", "runs/gone"], "runs/gone: no such run folder"),
])
def test_resume_misuse_is_one_line(runs, args, message):
    _, calls = runs
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 2 and not calls
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bare_resume_without_runs_latest_says_what_to_give(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--resume"])
    assert result.exit_code == 2 and "nothing to resume: no runs/latest" in result.stderr


# ---- resuming with other workers or processes --------------------------------------------------------------------

def test_a_bare_resume_with_more_workers_continues_the_run(workspace, monkeypatch):
    """A real stop and resume: `--resume --quiet` finds runs/latest; 1 worker before, 2 after."""
    monkeypatch.chdir(workspace)
    # batch 4: the 6 steps stay inside the first epoch (36 training images), so the resumed run still carries the
    # rows that the first layout delivered in it
    result = runner.invoke(app, ["train", "tiny.yaml", "--set", "train.eval_every=0", "--set", "train.batch_size=4"])
    assert result.exit_code == 0, result.output
    run = Path(os.path.realpath(workspace / "runs" / "latest"))
    shutil.rmtree(run / "checkpoints" / "step_6")  # as if stopped after the step-3 checkpoint
    result = runner.invoke(app, ["train", "--resume", "--set", "data.num_workers=2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "written by 1 process x 1 worker, now 1 process x 2 workers" in result.output
    assert _losses(run) == [1, 2, 3, 4, 5, 6]  # no step twice, none missing
    data = _state(run, 6)["data"]
    assert [r["num_workers"] for r in data["ranks"]] == [2]
    assert data["carried"]  # the rows of epoch 0 the first layout delivered, for a later resume


def test_a_stream_resumed_with_other_workers_stops_in_one_line(workspace, tmp_path):
    result = runner.invoke(app, ["train", str(workspace / "tiny.yaml"), "--output-dir", str(tmp_path),
                                 "--set", "data.streaming=true", "--set", "train.max_steps=3"])
    assert result.exit_code == 0, result.output
    run = Path(os.path.realpath(tmp_path / "latest"))
    result = runner.invoke(app, ["train", "--resume", str(run), "--set", "data.num_workers=2"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: data.streaming: the data position was saved with 1 process x 1 worker, now 1 process x 2 workers; "
        "a stream's rows cannot be shared out anew: resume with 1 process x 1 worker (--set data.num_workers=1)"]


@pytest.mark.slow
def test_a_run_of_two_processes_resumes_in_one(workspace, tmp_path):
    """torchrun with 2 CPU processes, stopped after its step-2 checkpoint; resumed by one process, which carries
    on from the data both processes had delivered."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29536", "-m", "med_train.cli", "train", str(workspace / "tiny.yaml"), "--output-dir",
                             str(tmp_path), "--set", "train.max_steps=4", "--set", "train.save_every=2"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = Path(os.path.realpath(tmp_path / "latest"))
    shutil.rmtree(run / "checkpoints" / "step_4")
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert "written by 2 processes x 1 worker, now 1 process x 1 worker" in result.output
    assert _losses(run) == [1, 2, 3, 4]
    assert [p.name for p in checkpoint_dirs(run)] == ["step_2", "step_4"]
    assert len(_state(run, 4)["data"]["ranks"]) == 1


class _Accelerator:
    """What `_resume` asks of accelerate, recorded instead of done."""

    def __init__(self, mixed_precision: str, scaler=None) -> None:
        self.mixed_precision, self.scaler, self.num_processes, self.loaded = mixed_precision, scaler, 1, []
        self.process_index = 0

    def load_state(self, folder: str) -> None:
        self.loaded.append(folder)


class _Loader:
    num_workers, resharded_from = 0, None

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def _checkpoint(run: Path, precision: str | None) -> Path:
    folder = run / "checkpoints" / "step_3"
    folder.mkdir(parents=True)
    state = {"step": 3, "data": {"version": 2}} | ({} if precision is None else {"mixed_precision": precision})
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def test_a_resume_in_another_precision_says_so(tmp_path):
    from med_train.train import _resume

    folder, notes, accelerator = _checkpoint(tmp_path, "no"), [], _Accelerator("bf16")
    state = _resume(accelerator, tmp_path, _Loader(), notes.append)
    assert notes == [f"resuming with mixed precision bf16; {folder} was trained with no"]
    assert state.step == 3 and state.mixed_precision == "bf16" and accelerator.loaded == [str(folder)]
    notes.clear()
    _resume(_Accelerator("no"), tmp_path, _Loader(), notes.append)
    assert notes == []


@pytest.mark.parametrize("precision", ["bf16", None])  # None: a checkpoint from before precisions were recorded
def test_a_resume_into_fp16_without_its_loss_scaler_is_one_line(tmp_path, precision):
    from med_train.train import _resume

    folder = _checkpoint(tmp_path, precision)
    with pytest.raises(TrainingError, match=f"{folder} holds no fp16 loss scaler.*train.mixed_precision="
                                            f"{precision or 'no'}"):
        _resume(_Accelerator("fp16", scaler=object()), tmp_path, _Loader(), print)
