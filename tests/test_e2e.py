"""End to end through the real CLI on a tiny config: train, stop, resume, evaluate, caption."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from med_train.cli import app
from med_train.run_folder import checkpoint_dirs

runner = CliRunner()

TINY = {
    "model": {"vision": {"name": "vit_tiny_patch16_224", "image_size": 32,
                         "kwargs": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}},
              "text": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "intermediate_size": 64, "max_position_embeddings": 64}},
    "tokenizer": {"name": "train", "vocab_size": 120},
    "data": {"format": "imagefolder", "num_workers": 0, "crop_scale_min": 0.9, "val_holdout": 0.25},
    "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "log_every": 1, "eval_every": 3, "eval_images": 6,
              "save_every": 3, "keep_checkpoints": 2, "quiet": True},
    "generate": {"num_beams": 2, "max_length": 16, "min_length": 5, "batch_size": 4},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    result = runner.invoke(app, ["data", "shapes", str(root / "shapes"), "--train", "48", "--val", "0", "--test", "6",
                                 "--seed", "1"])
    assert result.exit_code == 0, result.output
    config = {**TINY, "data": {**TINY["data"], "source": str(root / "shapes")}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def trained(workspace):
    result = runner.invoke(app, ["train", str(workspace / "tiny.yaml"), "--output-dir", str(workspace / "runs")])
    assert result.exit_code == 0, result.output
    return Path(os.path.realpath(workspace / "runs" / "latest"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_a_self_describing_run_folder(trained):
    for name in ("config.yaml", "med_config.json", "model.safetensors", "tokenizer.json", "curves.png",
                 "best/model.safetensors", "checkpoints/step_3/trainer_state.json",
                 "checkpoints/step_6/trainer_state.json"):
        assert (trained / name).is_file(), name
    records = _metrics(trained)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    for r in records:
        if "loss" in r:
            assert set(r) >= {"step", "epoch", "loss", "lr", "images_per_s", "data_wait", "grad_norm"}
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert {"Bleu_4", "CIDEr", "ROUGE_L", "content_exact"} <= set(evals[0]["eval"])
    saved = yaml.safe_load((trained / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 6 and saved["model"]["vision"]["image_size"] == 32


def test_resume_gives_the_losses_of_an_uninterrupted_run(trained, workspace):
    copy = workspace / "runs" / "resumed"
    shutil.copytree(trained, copy)
    shutil.rmtree(copy / "checkpoints" / "step_6")  # as if killed after the step-3 checkpoint
    result = runner.invoke(app, ["train", "--resume", str(copy)])
    assert result.exit_code == 0, result.output
    want = {r["step"]: r["loss"] for r in _metrics(trained) if "loss" in r}
    got = [r for r in _metrics(copy) if "loss" in r]
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # no step twice, none missing
    for r in got:
        assert r["loss"] == pytest.approx(want[r["step"]], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_compiled_training_gives_the_losses_of_eager_training(trained, workspace):
    """train.compile: torch.compile (inductor) on the training forward; the same tokenizer, data and initial
    weights (no dropout in TINY) give the same losses, to float32 rounding."""
    from torch._dynamo.utils import counters

    losses, frames = {}, {}
    for compiled in (False, True):
        counters.clear()
        out = workspace / f"compile-{compiled}"
        result = runner.invoke(app, ["train", str(workspace / "tiny.yaml"), "--output-dir", str(out),
                                     "--set", f"train.compile={str(compiled).lower()}", "--set", "train.max_steps=3",
                                     "--set", f"tokenizer.name={trained}"])
        assert result.exit_code == 0, result.output
        losses[compiled] = [r["loss"] for r in _metrics(Path(os.path.realpath(out / "latest"))) if "loss" in r]
        frames[compiled] = counters["frames"]["ok"]  # frames torch.compile captured
    assert frames[False] == 0 and frames[True] > 0
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_eval_writes_metrics_predictions_and_gallery(trained, tmp_path):
    result = runner.invoke(app, ["eval", "--model", str(trained), "--output-dir", str(tmp_path / "ev"), "--beams", "1",
                                 "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)  # the document alone: the table and notes went to stderr
    assert "scores" in result.stderr and "metrics.json" in result.stderr
    for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr", "content_exact", "content_colour", "content_position"):
        assert isinstance(scores[key], float), key
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == scores
    predictions = json.loads((tmp_path / "ev" / "predictions.json").read_text())
    assert len(predictions) == 6 and all(set(p) == {"image_id", "caption"} for p in predictions)
    assert len({p["image_id"] for p in predictions}) == 6  # each image once
    gallery = (tmp_path / "ev" / "gallery.html").read_text()
    assert gallery.count("<img") == 6 and "CIDEr" in gallery


def test_caption_prints_a_line_per_image_and_reports_bad_files(trained, workspace, tmp_path):
    images = sorted((workspace / "shapes" / "test").glob("*.png"))[:2]
    (tmp_path / "notes.txt").write_text("not an image")
    result = runner.invoke(app, ["caption", str(images[0]), str(images[1]), str(tmp_path / "notes.txt"),
                                 "--model", str(trained)])
    assert result.exit_code == 1
    lines = [line for line in result.stdout.splitlines() if "\t" in line]
    assert [line.split("\t")[0] for line in lines] == [str(images[0]), str(images[1])]
    assert all(line.split("\t")[1] for line in lines)
    assert "notes.txt" in result.stderr

    result = runner.invoke(app, ["caption", str(workspace / "shapes" / "test"), "--model", str(trained), "--json",
                                 "--sample", "--top-p", "0.9"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 6 and all(r["caption"] and r["error"] is None for r in rows)


def test_bf16_precision_captions_and_evaluates_under_autocast(trained, workspace, tmp_path, monkeypatch):
    import torch

    from med_train.model import Captioner

    seen, real_generate = [], Captioner.generate

    def generate(self, images, **kwargs):  # `med eval` runs where accelerate puts it: a GPU when there is one
        device = images.device.type
        seen.append((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))
        return real_generate(self, images, **kwargs)

    monkeypatch.setattr(Captioner, "generate", generate)
    images = [str(p) for p in sorted((workspace / "shapes" / "test").glob("*.png"))[:2]]
    for precision, autocast in (("fp32", False), ("bf16", True)):
        seen.clear()
        result = runner.invoke(app, ["caption", *images, "--model", str(trained), "--device", "cpu",
                                     "--precision", precision])
        assert result.exit_code == 0, result.output
        lines = [line.split("\t") for line in result.stdout.splitlines()]
        assert [line[0] for line in lines] == images and all(line[1] for line in lines)
        assert seen and all(enabled == autocast for enabled, _ in seen), precision
    assert all(dtype == torch.bfloat16 for _, dtype in seen)

    seen.clear()
    result = runner.invoke(app, ["eval", "--model", str(trained), "--output-dir", str(tmp_path / "ev"), "--beams", "1",
                                 "--precision", "bf16", "--json"])
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout)["CIDEr"], float)
    assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen)


def test_eval_takes_the_generation_device_and_precision_options(trained, tmp_path, monkeypatch):
    import torch

    from med_train import cli
    from med_train.model import Captioner

    calls, real_generate = [], Captioner.generate

    def generate(self, images, **kwargs):
        calls.append({**kwargs, "device": images.device.type, "fp16": torch.is_autocast_enabled("cpu")
                      and torch.get_autocast_dtype("cpu") == torch.float16})
        return real_generate(self, images, **kwargs)

    monkeypatch.setattr(Captioner, "generate", generate)
    monkeypatch.setattr(cli, "_stderr_is_terminal", lambda: True)
    result = runner.invoke(app, ["eval", "--model", str(trained), "--out", str(tmp_path / "ev"), "--max-images", "4",
                                 "--device", "cpu", "--precision", "fp16", "--sample", "--top-k", "5", "--seed", "3",
                                 "--max-length", "12", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 4
    assert "--out is now --output-dir" in result.stderr and (tmp_path / "ev" / "metrics.json").is_file()
    assert "img/s" in result.stderr and "/4 [" in result.stderr  # the progress bar, of 4 images
    assert calls and all(c["device"] == "cpu" and c["fp16"] and c["do_sample"] and c["top_k"] == 5
                         and c["max_length"] == 12 and c["repetition_penalty"] == 1.1 for c in calls)


def test_caption_refuses_an_unknown_precision_or_device(trained, workspace):
    import torch

    image = str(next((workspace / "shapes" / "test").glob("*.png")))
    for command in (["caption", image], ["eval"]):
        result = runner.invoke(app, [*command, "--model", str(trained), "--precision", "fp8"])
        assert result.exit_code == 2 and "Invalid value for '--precision'" in result.output, command
        assert "'fp8'" in result.output and "no|bf16|fp16|fp" in runner.invoke(app, [command[0], "--help"]).output
    result = runner.invoke(app, ["caption", image, "--model", str(trained), "--device", "tpu"])
    assert result.exit_code == 2 and "--device" in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["caption", image, "--model", str(trained), "--device", "cuda"])
        assert result.exit_code == 2 and "no CUDA device" in result.output


def test_caption_without_a_model_says_how_to_train_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["caption", "x.png"])
    assert result.exit_code == 2
    assert "med train" in result.stderr


def test_config_errors_stop_before_any_heavy_work(workspace, tmp_path):
    bad = yaml.safe_load((workspace / "tiny.yaml").read_text())
    bad["train"]["batch_sise"] = 4
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = runner.invoke(app, ["train", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2
    assert "train.batch_sise" in result.stderr and "train.batch_size" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    result = runner.invoke(app, ["train", str(workspace / "tiny.yaml"), "--set", "model.vision.name=vit_nope_9"])
    assert result.exit_code == 2 and "vit_nope_9" in result.stderr


@pytest.mark.slow
def test_two_processes_train_and_evaluate_each_image_once(workspace, tmp_path):
    """torchrun with 2 CPU processes (gloo): training runs, evaluation sees each held-out image once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
            "-m", "med_train.cli"]
    train = subprocess.run([*base, "train", str(workspace / "tiny.yaml"), "--output-dir", str(tmp_path / "runs"),
                            "--set", "train.max_steps=4", "--set", "train.eval_every=0"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    run = Path(os.path.realpath(tmp_path / "runs" / "latest"))
    # one run of two joined processes (accelerate saves each one's RNG), not two single-process runs in one folder
    assert sorted(p.name for p in (run / "checkpoints" / "step_4").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.name != "latest"] == [run.name]
    evaluate = subprocess.run([*base, "eval", "--model", str(run), "--output-dir", str(tmp_path / "ev"), "--json"],
                              capture_output=True, text=True, env=env, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    predictions = json.loads((tmp_path / "ev" / "predictions.json").read_text())
    assert sorted(p["image_id"] for p in predictions) == sorted(f"test/{i:06d}" for i in range(6))


NAN_ON_RANK_1 = """
import os, sys
from med_train.cli import app
from med_train.model import Captioner

real_forward, calls = Captioner.forward, {"n": 0}

def forward(self, *args, **kwargs):  # the second micro-batch of process 1 only has a NaN loss
    calls["n"] += 1
    loss = real_forward(self, *args, **kwargs)
    return loss * float("nan") if os.environ["RANK"] == "1" and calls["n"] == 2 else loss

Captioner.forward = forward
app(args=sys.argv[1:])
"""


@pytest.mark.slow
def test_a_nan_in_one_process_skips_the_step_in_every_process(workspace, tmp_path):
    """Gradients are all-reduced, so one process's NaN reaches all: every process must drop that update."""
    import torch

    from med_train.model import Captioner

    (tmp_path / "nan_on_rank_1.py").write_text(NAN_ON_RANK_1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29534", str(tmp_path / "nan_on_rank_1.py"), "train", str(workspace / "tiny.yaml"),
                             "--output-dir", str(tmp_path / "runs"), "--set", "train.max_steps=3",
                             "--set", "train.eval_every=0", "--set", "train.save_every=3",
                             "--set", "train.clip_grad_norm=null"],  # no grad norm: the losses alone decide
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = Path(os.path.realpath(tmp_path / "runs" / "latest"))
    state = json.loads((run / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 1 and state["step"] == 3
    assert all(torch.isfinite(p).all() for p in Captioner.from_pretrained(run).parameters())


DISK_FULL_ON_RANK_1 = """
import errno, os, sys
from accelerate import Accelerator
from med_train.cli import app

real_save, calls = Accelerator.save_state, {"n": 0}

def save_state(self, *args, **kwargs):  # process 1 cannot write its part of the second checkpoint
    calls["n"] += 1
    if os.environ["RANK"] == "1" and calls["n"] == 2:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, *args, **kwargs)

Accelerator.save_state = save_state
app(args=sys.argv[1:])
"""


@pytest.mark.slow
def test_a_checkpoint_write_failing_in_one_process_stops_every_process(workspace, tmp_path):
    """A full disk on one process must not leave the others waiting at a barrier: every process stops with the
    error, and the previous checkpoint stays the one to resume from."""
    (tmp_path / "disk_full_on_rank_1.py").write_text(DISK_FULL_ON_RANK_1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29535", str(tmp_path / "disk_full_on_rank_1.py"), "train", str(workspace / "tiny.yaml"),
                             "--output-dir", str(tmp_path / "runs"), "--set", "train.max_steps=4",
                             "--set", "train.eval_every=0", "--set", "train.save_every=2"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "No space left on device" in output  # process 1's own cause
    assert "another process could not write its part" in output  # process 0 says why it stops too
    run = Path(os.path.realpath(tmp_path / "runs" / "latest"))
    assert [p.name for p in checkpoint_dirs(run)] == ["step_2"]
    assert not list((run / "checkpoints").glob(".tmp_*"))
