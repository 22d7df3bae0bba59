"""The run folder's files: written whole, checkpoints that resume alone, run folders claimed once, and every bad
file (empty, cut short, of another model, or a pickle holding code) refused in one line that names it."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config
from PIL import Image
from test_faults import config_file  # noqa: F401 - the tiny config and its shapes set
from typer.testing import CliRunner

from med_train.cli import app
from med_train.config import load_config
from med_train.model import Captioner
from med_train.run_folder import (
    atomic_write,
    checkpoint_dirs,
    new_run_dir,
    read_jsonl,
    truncate_metrics,
)
from med_train.train import train

runner = CliRunner()


class CodeOnLoad:
    """Pickled, it calls `open(marker, "w")` when unpickled: the file appears only if the pickle's code runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _plant_code(path: Path, marker: Path, key: str = "model") -> None:
    torch.save({key: CodeOnLoad(marker)}, path)


def _one_line_error(result, *parts: str, code: int = 1) -> str:
    """The one `error:` line of a refused command; it holds each of `parts`."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def test_a_planted_pickle_runs_its_code_when_loaded_unsafely(tmp_path):
    """The trap the tests below set works: without weights_only, loading it creates the marker."""
    _plant_code(tmp_path / "x.pth", tmp_path / "marker")
    torch.load(tmp_path / "x.pth", weights_only=False)
    assert (tmp_path / "marker").exists()


# ---- writing whole ---------------------------------------------------------------------------------------------

def test_a_write_cut_short_leaves_the_previous_file(tmp_path):
    from med_train.run_folder import atomic_path

    target = tmp_path / "run.json"
    atomic_write(target, '{"max_steps": 6}\n')
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text('{"max_st')
        raise KeyboardInterrupt  # killed mid-write
    assert target.read_text() == '{"max_steps": 6}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left behind
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_a_model_save_cut_short_keeps_the_previous_model(tokenizer, tmp_path, monkeypatch):
    """The tokenizer files are rewritten at every checkpoint: a save cut short after tokenizer.json was opened
    (truncated) used to leave it empty, and the folder unloadable."""
    torch.manual_seed(0)
    model = Captioner(tiny_model_config(), tokenizer)
    model.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def killed_mid_save(self, folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "tokenizer.json").write_text("")  # opened for writing, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tokenizer), "save_pretrained", killed_mid_save)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "m")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    Captioner.from_pretrained(tmp_path / "m")


def test_metrics_reading_leaves_out_a_torn_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for _, r in read_jsonl(log)] == [1, 2]
    truncate_metrics(log, 1)
    assert log.read_text() == '{"step": 1, "loss": 2.0}\n'


# ---- run folders claimed once ----------------------------------------------------------------------------------

CLAIM = """
import pathlib, sys, time
from med_train.config import load_config
from med_train.run_folder import new_run_dir, point_latest

cfg = load_config(None, [f"train.output_dir={sys.argv[1]}", "train.run_name=same"])
while not pathlib.Path(sys.argv[2]).exists():  # all start together
    time.sleep(0.001)
run_dir = new_run_dir(cfg, None)
point_latest(run_dir)
print(run_dir.name)
"""


def test_runs_started_at_once_with_one_name_get_a_folder_each(tmp_path):
    """Threads and processes racing on one name: each gets its own new folder, runs/latest one of them."""
    cfg = load_config(None, [f"train.output_dir={tmp_path / 't'}", "train.run_name=same"])
    start, names = threading.Barrier(6), []

    def claim():
        start.wait()
        names.append(new_run_dir(cfg, None).name)

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(names) == sorted(["same"] + [f"same-{i}" for i in range(2, 7)])

    go = tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", CLAIM, str(tmp_path / "p"), str(go)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(3)]
    time.sleep(1.0)
    go.touch()
    got = sorted(p.communicate(timeout=120)[0].strip() for p in processes)
    assert got == ["same", "same-2", "same-3"]
    assert (tmp_path / "p" / "latest").resolve().name in got
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["latest", *got]


def test_latest_names_the_run_started_last_even_when_an_earlier_one_writes_its_files_later(
        config_file, tmp_path, monkeypatch):  # noqa: F811
    """Run `first` claims its folder; before it writes its files, run `second` starts and trains to the end; then
    `first` writes its files and trains. runs/latest names `second`, the run started last."""
    from med_train import train as train_module

    real_write, order = train_module._write_run_folder, []

    def slow_first_write(run, model):
        order.append(run.run_dir.name)
        if run.run_dir.name == "first":
            train(load_config(config_file, ["train.max_steps=1", "train.save_every=0", "train.run_name=second",
                                            f"train.output_dir={tmp_path}"]), config_file)
        real_write(run, model)

    monkeypatch.setattr(train_module, "_write_run_folder", slow_first_write)
    train(load_config(config_file, ["train.max_steps=1", "train.save_every=0", "train.run_name=first",
                                    f"train.output_dir={tmp_path}"]), config_file)
    assert order == ["first", "second"]
    assert (tmp_path / "first" / "model.safetensors").is_file() and (tmp_path / "second" / "model.safetensors").is_file()
    assert os.readlink(tmp_path / "latest") == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "latest", "second"]  # no temporary link left


# ---- resuming from the checkpoint alone ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(config_file):  # noqa: F811
    """A 2-step run with its checkpoint at step 2 (each test resumes a copy)."""
    cfg = load_config(config_file, ["train.max_steps=2", "train.save_every=2",
                                    f"train.output_dir={config_file.parent / 'files-runs'}"])
    return train(cfg, config_file)


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


def _resume(run: Path, steps: int = 3):
    return runner.invoke(app, ["train", "--resume", str(run), "--set", f"train.max_steps={steps}"])


def test_a_run_folder_has_no_temporary_files_and_its_checkpoint_holds_the_model(trained):
    assert not [p for p in trained.rglob("*") if p.name.startswith(".")]
    checkpoint = checkpoint_dirs(trained)[-1]
    for name in ("med_config.json", "tokenizer.json", "model.safetensors", "optimizer.bin", "trainer_state.json"):
        assert (checkpoint / name).is_file(), name
    Captioner.from_pretrained(checkpoint)  # a model directory in its own right


def test_resume_reads_the_model_and_tokenizer_from_the_checkpoint(run):
    """The run folder's own copies, rewritten at every checkpoint, may be damaged: the checkpoint has its own."""
    for name in ("tokenizer.json", "tokenizer_config.json", "med_config.json"):
        (run / name).write_text("")
    result = _resume(run)
    assert result.exit_code == 0, result.output
    assert _steps(run) == [1, 2, 3]
    Captioner.from_pretrained(run)  # written again at the end


def test_resume_drops_a_torn_last_metrics_line(run):
    with open(run / "metrics.jsonl", "a") as log:
        log.write('{"step": 3, "epoch": 0, "lo')  # killed mid-append
    result = _resume(run)
    assert result.exit_code == 0, result.output
    assert _steps(run) == [1, 2, 3]


@pytest.mark.parametrize("damage, words", [
    ("empty state", ("trainer_state.json", "empty")),
    ("cut weights", ("model.safetensors", "not a whole safetensors file")),
    ("code in optimizer", ("optimizer.bin", "refused", "pickled code")),
    ("code in rng", ("random_states_0.pkl", "refused", "pickled code")),
    ("empty optimizer", ("optimizer.bin", "empty")),
])
def test_resume_refuses_a_bad_checkpoint_file_in_one_line(run, damage, words, tmp_path):
    checkpoint = checkpoint_dirs(run)[-1]
    marker = tmp_path / "marker"
    if damage == "empty state":
        (checkpoint / "trainer_state.json").write_text("")
    elif damage == "cut weights":
        data = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "code in optimizer":
        _plant_code(checkpoint / "optimizer.bin", marker, "state")
    elif damage == "code in rng":
        _plant_code(checkpoint / "random_states_0.pkl", marker, "random_state")
    else:
        (checkpoint / "optimizer.bin").write_bytes(b"")
    line = _one_line_error(_resume(run), *words)
    assert str(checkpoint) in line
    assert not marker.exists()


def test_resume_says_when_the_random_state_is_not_restored(run):
    """accelerate skips a random state it cannot load in silence; the resume says so, naming the file."""
    rng = checkpoint_dirs(run)[-1] / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:40])
    result = _resume(run)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and str(rng) in warnings[0] and "random state is not restored" in warnings[0]
    assert _steps(run) == [1, 2, 3]


def test_model_init_never_runs_a_planted_pickle(config_file, tmp_path):  # noqa: F811
    _plant_code(tmp_path / "blip.pth", tmp_path / "marker")
    result = runner.invoke(app, ["train", str(config_file), "--output-dir", str(tmp_path / "runs"),
                                 "--set", f"model.init={tmp_path / 'blip.pth'}"])
    _one_line_error(result, "blip.pth", "refused", code=1)  # a bad file, as `med convert blip` says of it
    assert not (tmp_path / "marker").exists()


# ---- loading a model: med caption / med eval / med convert blip ------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model") / "m"
    Captioner(tiny_model_config(), tokenizer).save_pretrained(out)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(out.parent / "red.png")
    return out


def _damage_model(folder: Path, damage: str, tokenizer) -> str:
    weights = folder / "model.safetensors"
    if damage == "pickle as safetensors":
        torch.save(Captioner(tiny_model_config(), tokenizer).state_dict(), weights)
        return "model.safetensors: not a whole safetensors file"
    if damage == "cut safetensors":
        weights.write_bytes(weights.read_bytes()[:-100])
        return "model.safetensors: not a whole safetensors file"
    if damage == "other shapes":
        other = tiny_model_config()
        other.text.intermediate_size = 96
        Captioner(other, tokenizer).save_pretrained(folder.parent / "other")
        shutil.copy(folder.parent / "other" / "model.safetensors", weights)
        return "intermediate.dense.weight (96, 32) vs (64, 32)"
    if damage == "empty config":
        (folder / "med_config.json").write_text("")
        return "med_config.json: empty"
    if damage == "config without a model":
        (folder / "med_config.json").write_text('{"format": "med_train/captioner"}')
        return "med_config.json: not a med_train model config"
    (folder / "tokenizer.json").write_text("")
    return "tokenizer.json: empty"


@pytest.mark.parametrize("damage", ["pickle as safetensors", "cut safetensors", "other shapes", "empty config",
                                    "config without a model", "empty tokenizer"])
def test_caption_refuses_a_bad_model_file_in_one_line(model_dir, tokenizer, tmp_path, damage):
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    words = _damage_model(folder, damage, tokenizer)
    result = runner.invoke(app, ["caption", str(model_dir.parent / "red.png"), "--model", str(folder)])
    _one_line_error(result, words, str(folder))


@pytest.mark.parametrize("damage", ["cut safetensors", "other shapes", "empty config", "empty tokenizer"])
def test_train_refuses_a_bad_model_init_file_as_caption_does(config_file, model_dir, tokenizer, tmp_path,  # noqa: F811
                                                             damage):
    """A model.init folder with a damaged file is a bad file (exit 1), in the line `med caption` gives for it; the
    run folder it had claimed is removed."""
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    words = _damage_model(folder, damage, tokenizer)
    said = _one_line_error(runner.invoke(app, ["caption", str(model_dir.parent / "red.png"), "--model", str(folder)]),
                           words, str(folder))
    result = runner.invoke(app, ["train", str(config_file), "--output-dir", str(tmp_path / "runs"),
                                 "--set", f"model.init={folder}"])
    assert _one_line_error(result) == said
    assert not list((tmp_path / "runs").iterdir())


def test_eval_refuses_a_bad_model_file_in_one_line(model_dir, tokenizer, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    words = _damage_model(folder, "pickle as safetensors", tokenizer)
    _one_line_error(runner.invoke(app, ["eval", "--model", str(folder)]), words)


@pytest.mark.parametrize("damage, words", [("code", ("refused", "pickled code")), ("cut", ("unreadable",)),
                                           ("not blip", ("not a BLIP caption checkpoint",))])
def test_convert_blip_refuses_a_bad_checkpoint_in_one_line(tmp_path, damage, words):
    path = tmp_path / "model_base_caption.pth"
    if damage == "code":
        _plant_code(path, tmp_path / "marker")
    elif damage == "cut":
        torch.save({"model": {"text_decoder.x": torch.zeros(100)}}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        torch.save({"model": {"visual_encoder.x": torch.zeros(1)}}, path)
    result = runner.invoke(app, ["convert", "blip", str(path), str(tmp_path / "out")])
    _one_line_error(result, str(path), *words)
    assert not (tmp_path / "marker").exists()

