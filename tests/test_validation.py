"""Validation apart from the reported split: training validates on data.val_split (or on a held-out slice of the
training split, which training never reads), `med eval` reports data.eval_split; train.epochs counted from the
data; the trackers get the whole resolved config, train.project and the run name.

Fixtures are written here: an imagefolder with train/val/test folders of solid-colour PNGs, ids r*, v*, t*.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image
from test_e2e import TINY
from typer.testing import CliRunner

from med_train import evaluate as evaluate_module
from med_train.cli import app
from med_train.config import DataConfig, config_to_dict, load_config
from med_train.data import Holdout, build_dataloader, build_dataset, iter_captions
from med_train.sources import pack
from med_train.train import epoch_steps, tracker_config, validation_source

runner = CliRunner()
N_TRAIN, N_VAL, N_TEST = 30, 3, 4
CAPTIONS = {f"r{i}": [f"a picture number {i}"] * (3 if i == 0 else 1) for i in range(N_TRAIN)}  # r0: 3 captions


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), (i * 19 % 256, i * 53 % 256, (200 + i * 11) % 256)).save(buffer, "PNG")
    return buffer.getvalue()


def write_three_splits(root: Path) -> None:
    for split, prefix, n, offset in (("train", "r", N_TRAIN, 0), ("val", "v", N_VAL, 100), ("test", "t", N_TEST, 200)):
        (root / split).mkdir(parents=True)
        lines = []
        for i in range(n):
            (root / split / f"{prefix}{i}.png").write_bytes(png(offset + i))
            row = {"file_name": f"{prefix}{i}.png", "id": f"{prefix}{i}"}
            row.update({"captions": CAPTIONS[f"r{i}"]} if split == "train" else
                       {"captions": [f"reference of {prefix} {i}", f"another of {prefix} {i}"]})
            lines.append(json.dumps(row))
        (root / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validation")
    write_three_splits(root / "data")
    config = {**TINY, "data": {**TINY["data"], "source": str(root / "data"), "cache_dir": str(root / "cache")},
              "train": {**TINY["train"], "max_steps": 2, "eval_every": 2, "save_every": 2, "eval_images": 10}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture
def validation_reads(monkeypatch) -> list[list[str]]:
    """The image ids of every validation pass the trainer makes (the loader it hands to `evaluate`)."""
    passes: list[list[str]] = []
    real = evaluate_module.evaluate

    def recording(model, cfg, **kwargs):
        if kwargs.get("loader") is not None:
            passes.append([i for batch in kwargs["loader"] for i in batch["ids"]])
        return real(model, cfg, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", recording)
    return passes


def train_run(workspace: Path, out: str, *sets: str, resume: Path | None = None):
    args = ["train", "--resume", str(resume)] if resume else ["train", str(workspace / "tiny.yaml"),
                                                              "--output-dir", str(workspace / out)]
    result = runner.invoke(app, args + [a for s in sets for a in ("--set", s)])
    run = resume or Path(os.path.realpath(workspace / out / "latest"))
    return result, run


def steps_logged(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


# ---- which split validation reads -------------------------------------------------------------------------------

def test_training_validates_on_val_and_eval_reports_test(workspace, validation_reads, tmp_path):
    result, run = train_run(workspace, "runs-val")
    assert result.exit_code == 0, result.output
    assert validation_reads and all(sorted(ids) == ["v0", "v1", "v2"] for ids in validation_reads)
    assert "warning" not in result.output and not (run / "val_holdout.json").exists()
    evaluated = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    assert evaluated[-1]["eval"]["images"] == N_VAL

    result = runner.invoke(app, ["eval", "--model", str(run), "--out", str(tmp_path / "ev"), "--beams", "1"])
    assert result.exit_code == 0, result.output
    reported = json.loads((tmp_path / "ev" / "predictions.json").read_text())
    assert sorted(p["image_id"] for p in reported) == [f"t{i}" for i in range(N_TEST)]


def test_validating_on_the_reported_split_warns_even_when_quiet(workspace, validation_reads):
    result, _ = train_run(workspace, "runs-test", "data.val_split=test", "train.max_steps=1", "train.eval_every=0")
    assert result.exit_code == 0, result.output
    assert "warning: data.val_split 'test' is also data.eval_split" in result.output  # TINY trains quietly
    assert sorted(validation_reads[-1]) == [f"t{i}" for i in range(N_TEST)]


CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("name", ["coco_karpathy_base", "coco_karpathy_large", "flickr30k_base"])
def test_karpathy_configs_select_on_val_and_report_test(name, tmp_path):
    """The annotation files as BLIP ships them (`<prefix>_{train,val,test}.json`), at the config's own names."""
    cfg = load_config(CONFIGS / f"{name}.yaml")
    cfg.data.source = str(tmp_path / Path(cfg.data.source).name)
    for split in ("train", "val", "test"):
        Path(cfg.data.source.replace("{split}", split)).write_text("[]")
    assert validation_source(cfg) == ("val", None) and cfg.data.eval_split == "test"
    assert cfg.train.epochs == 5 and cfg.train.max_steps is None


def test_the_demo_validates_on_its_val_split_else_on_a_held_out_slice_of_its_training_images(tmp_path):
    cfg = load_config(CONFIGS / "shapes.yaml", [f"data.source={tmp_path}"])
    for split in ("train", "test"):  # what `med data shapes --val 0` writes
        (tmp_path / split).mkdir()
        (tmp_path / split / "metadata.jsonl").write_text('{"file_name": "0.png", "caption": "a"}\n')
    split, holdout = validation_source(cfg)
    assert split == "train" and holdout == Holdout(0.01, cfg.train.seed, str(tmp_path.resolve()))
    assert cfg.data.eval_split == "test"
    (tmp_path / "val").mkdir()  # what `med data shapes` writes by default
    (tmp_path / "val" / "metadata.jsonl").write_text('{"file_name": "0.png", "captions": ["a"]}\n')
    assert validation_source(cfg) == ("val", None)


def test_pack_keeps_the_validation_split(workspace, tmp_path):
    cfg = DataConfig(source=str(workspace / "data"), cache_dir=str(tmp_path / "cache"))
    assert list(pack(cfg, tmp_path / "packed")) == ["train", "val", "test"]
    packed = DataConfig(source=str(tmp_path / "packed"), cache_dir=str(tmp_path / "cache"))
    assert sorted(e["id"] for e in build_dataset(packed, "val", train=False, image_size=8)) == ["v0", "v1", "v2"]


# ---- the held-out slice of the training split -----------------------------------------------------------------------

def held_out_ids(cfg: DataConfig, holdout: Holdout) -> list[str]:
    return sorted(e["id"] for e in build_dataset(cfg, "train", train=False, image_size=8, holdout=holdout))


def test_the_held_out_slice_is_deterministic_and_moves_with_the_data(workspace, tmp_path):
    cfg = DataConfig(source=str(workspace / "data"), val_holdout=0.3, cache_dir=str(tmp_path / "cache"))
    held = held_out_ids(cfg, Holdout.of(cfg, 42))
    assert 0 < len(held) < N_TRAIN and held == held_out_ids(cfg, Holdout.of(cfg, 42))
    assert held != held_out_ids(cfg, Holdout.of(cfg, 43))  # another seed, another slice
    shutil.copytree(workspace / "data", tmp_path / "moved")
    moved = DataConfig(**{**cfg.__dict__, "source": str(tmp_path / "moved")})
    assert held_out_ids(moved, Holdout.of(moved, 42)) == held  # keys are paths inside the source folder


def test_a_trained_tokenizer_never_sees_the_held_out_captions(workspace, tmp_path):
    cfg = DataConfig(source=str(workspace / "data"), val_holdout=0.3, cache_dir=str(tmp_path / "cache"))
    held = set(held_out_ids(cfg, Holdout.of(cfg, 42)))
    kept = sorted(c for i, captions in CAPTIONS.items() if i not in held for c in captions)
    assert sorted(iter_captions(cfg, "train", holdout=Holdout.of(cfg, 42))) == kept
    assert len(list(iter_captions(cfg, "train"))) == sum(len(c) for c in CAPTIONS.values())


def test_rows_with_unusable_captions_are_skipped_by_the_tokenizer_and_the_epoch_count(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    rows = [{"file_name": f"{i}.png", "caption": caption} for i, caption in enumerate(["a red circle", "!!!", " "])]
    for i in range(len(rows)):
        (tmp_path / "data" / "train" / f"{i}.png").write_bytes(png(i))
    (tmp_path / "data" / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(tmp_path / "data"), val_holdout=1e-9, cache_dir=str(tmp_path / "cache"))
    holdout = Holdout.of(cfg, 42)  # holds out nothing here: the filter runs, every row stays
    for held in (None, holdout):
        assert list(iter_captions(cfg, "train", holdout=held)) == ["a red circle"]
        assert build_dataset(cfg, "train", train=True, image_size=8, holdout=held).epoch_size() == 1


@pytest.mark.parametrize("streaming", [False, True])
def test_training_never_reads_the_held_out_images_and_validation_reads_only_them(workspace, tokenizer, tmp_path,
                                                                                  streaming):
    """Two processes of two workers over one epoch, then a resume: every other image exactly once."""
    cfg = DataConfig(source=str(workspace / "data"), val_holdout=0.3, streaming=streaming, shuffle_buffer=4,
                     cache_dir=str(tmp_path / "cache"))
    holdout = Holdout.of(cfg, 42)
    held = set(held_out_ids(cfg, holdout))
    kept = Counter({i: len(c) for i, c in CAPTIONS.items() if i not in held})
    assert held and "r0" not in held  # r0's three captions count three examples below

    def loader(process: int, **kw):
        args = dict(train=True, batch_size=3, image_size=8, tokenizer=tokenizer, prompt="a ", max_length=16, seed=7,
                    epochs=1, num_workers=2, num_processes=2, process_index=process, holdout=holdout)
        return build_dataloader(cfg, "train", **{**args, **kw})

    seen = Counter(i for p in range(2) for batch in loader(p) for i in batch["ids"])
    assert seen == kept
    first = loader(0, num_processes=1)
    head = [i for _, batch in zip(range(2), first, strict=False) for i in batch["ids"]]
    resumed = loader(0, num_processes=1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert Counter(head + [i for batch in resumed for i in batch["ids"]]) == kept
    assert first.stream.epoch_size() == sum(kept.values())


# ---- a run on the held-out slice, counted in epochs, with trackers --------------------------------------------------

@pytest.mark.filterwarnings("ignore:`log_with=")  # tensorboard is not installed: init_trackers is captured
def test_epochs_on_a_held_out_slice_recorded_and_kept_on_resume(workspace, validation_reads, monkeypatch):
    from accelerate import Accelerator

    trackers = {}
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, project_name, config=None, init_kwargs=None:
                        trackers.update(project=project_name, config=config, init_kwargs=init_kwargs))
    result, run = train_run(workspace, "runs-epochs", "data.val_split=null", "data.val_holdout=0.2",
                            "train.epochs=1", "train.batch_size=4", "train.grad_accum_steps=2", "train.save_every=2",
                            "train.eval_every=0", "train.trackers=[tensorboard]", "train.project=captions",
                            "train.run_name=epochs-run")
    assert result.exit_code == 0, result.output

    record = json.loads((run / "val_holdout.json").read_text())
    held = sorted(Path(key).stem for key in record["keys"])
    assert record["images"] == len(held) > 0 and record["seed"] == 42 and record["fraction"] == 0.2
    assert all(sorted(ids) == held for ids in validation_reads)  # validation reads exactly the recorded images
    examples = sum(len(c) for i, c in CAPTIONS.items() if i not in held)
    steps = math.ceil(examples / (4 * 1 * 2))
    assert json.loads((run / "run.json").read_text()) == {"max_steps": steps, "epochs": 1.0}
    assert steps_logged(run) == list(range(1, steps + 1))
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (saved["epochs"], saved["max_steps"]) == (1.0, None)

    assert trackers["project"] == "captions" and trackers["init_kwargs"]["wandb"] == {"name": "epochs-run"}
    config = trackers["config"]
    assert config["train.max_steps"] == steps and config["train.epochs"] == 1.0  # resolved
    assert config["data.val_holdout"] == 0.2 and config["model.vision.kwargs.depth"] == 2
    assert all(v is None or isinstance(v, bool | int | float | str) for v in config.values())  # TensorBoard's rule

    shutil.rmtree(run / "checkpoints" / f"step_{steps}")
    result, _ = train_run(workspace, "", "train.batch_size=2", resume=run)  # a recount would double the steps
    assert result.exit_code == 0, result.output
    assert steps_logged(run) == list(range(1, steps + 1))


def test_an_empty_held_out_slice_is_one_line_error(workspace):
    result, _ = train_run(workspace, "runs-empty", "data.val_split=null", "data.val_holdout=1e-9")
    assert result.exit_code == 1
    assert "data.val_holdout 1e-09 holds out no image of 'train'" in result.output
    assert "Traceback" not in result.output


def test_epoch_steps_round_up_whole_batches_only():
    assert epoch_steps(1, 48, 16) == 3
    assert epoch_steps(0.1, 30, 3) == 1  # 0.1 as written, not 0.1000000000000000055...
    assert epoch_steps(2.5, 100, 32) == 8
    assert epoch_steps(0.001, 10, 64) == 1


def test_tracker_config_holds_every_key_as_a_flat_scalar():
    cfg = load_config(None, ["model.vision.kwargs={depth: 2}", "model.vision.mean=[0.5, 0.5, 0.5]"])
    flat = tracker_config(cfg)
    assert flat["model.vision.kwargs.depth"] == 2 and flat["model.vision.mean"] == "[0.5, 0.5, 0.5]"
    assert flat["train.trackers"] == "[]" and flat["data.config_name"] is None and flat["train.lr"] == 1e-4
    leaves = leaf_keys(config_to_dict(cfg))
    assert set(flat) == leaves and "train.project" in leaves and "data.val_split" in leaves


def leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in tree.items():
        keys |= leaf_keys(value, f"{prefix}{name}.") if isinstance(value, dict) and value else {prefix + name}
    return keys
