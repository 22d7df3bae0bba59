"""The CLI's start-up and its one vocabulary: `--version`, `--json`, progress bars, generation options and
precision named the same way in every command, conflicts refused in one line."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_model_config
from PIL import Image
from typer.testing import CliRunner

from med_train import __version__, cli
from med_train.cli import app
from med_train.model import Captioner

runner = CliRunner()


def test_help_is_instant_and_lists_the_commands():
    code = ("import sys; from typer.testing import CliRunner; from med_train.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); print(r.output); "
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'datasets', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    for command in ("data", "config", "convert", "export"):
        assert command in out


def test_every_shipped_config_is_valid():
    from pathlib import Path

    import timm

    from med_train.config import load_config

    configs = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"shapes.yaml", "coco_karpathy_base.yaml", "coco_karpathy_large.yaml",
                                         "flickr30k_base.yaml"}
    for path in configs:
        cfg = load_config(path)
        assert timm.is_model(cfg.model.vision.name), path
    coco = load_config(configs[0].parent / "coco_karpathy_base.yaml")
    assert (coco.model.vision.image_size, coco.train.lr, coco.generate.num_beams) == (384, 1e-5, 3)


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"med_train {__version__}\n"
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert "version" in project["dynamic"]  # one source: med_train.__version__


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    Captioner(tiny_model_config(), tokenizer).save_pretrained(out)
    for i in range(3):
        Image.new("RGB", (40, 30), (80 * i, 40, 200)).save(out / f"image{i}.png")
    return out


@pytest.fixture
def generate_calls(monkeypatch):
    """The keyword arguments (and autocast state) of every Captioner.generate call."""
    calls, real_generate = [], Captioner.generate

    def generate(self, images, **kwargs):
        device = images.device.type
        calls.append({**kwargs, "autocast": torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)})
        return real_generate(self, images, **kwargs)

    monkeypatch.setattr(Captioner, "generate", generate)
    return calls


def _caption(model_dir, *options):
    return runner.invoke(app, ["caption", str(model_dir / "image0.png"), "--model", str(model_dir), *options])


@pytest.mark.parametrize("options,expected", [
    ([], dict(num_beams=3, repetition_penalty=1.0, max_length=20, min_length=5)),  # the run's generate.*
    (["--beams", "2", "--max-length", "12", "--min-length", "6", "--repetition-penalty", "1.3"],
     dict(num_beams=2, repetition_penalty=1.3, max_length=12, min_length=6)),
    (["--sample"], dict(do_sample=True, num_beams=1, top_p=0.9, top_k=0, temperature=1.0, repetition_penalty=1.1)),
    (["--sample", "--top-p", "0.5", "--top-k", "4", "--temperature", "0.7", "--repetition-penalty", "1.0"],
     dict(do_sample=True, top_p=0.5, top_k=4, temperature=0.7, repetition_penalty=1.0)),
    (["--set", "generate.top_p=0.8", "--set", "generate.min_length=7", "--sample"],
     dict(do_sample=True, top_p=0.8, min_length=7, repetition_penalty=1.1)),
    (["--set", "generate.do_sample=true", "--set", "generate.repetition_penalty=1.2"],  # the run samples already
     dict(do_sample=True, repetition_penalty=1.2)),
    (["--set", "generate.do_sample=true", "--no-sample", "--beams", "2"], dict(num_beams=2)),
])
def test_generation_options_default_to_the_runs_config(model_dir, generate_calls, options, expected):
    result = _caption(model_dir, *options)
    assert result.exit_code == 0, result.output
    (call,) = generate_calls
    assert {k: call.get(k) for k in expected} == expected
    assert call.get("do_sample", False) == expected.get("do_sample", False)


@pytest.mark.parametrize("options,message", [
    (["--beams", "3", "--sample"], "--beams 3 conflicts with --sample"),
    (["--set", "generate.do_sample=true", "--beams", "2"], "add --no-sample"),
    (["--top-p", "0.5"], "--top-p applies to sampling only: add --sample"),
    (["--temperature", "0.5", "--beams", "1"], "--temperature applies to sampling only"),
    (["--seed", "3"], "--seed applies to sampling only"),
    (["--min-length", "30"], "--min-length 30 is over --max-length 20"),
    (["--set", "generate.top_pp=0.5"], "did you mean 'generate.top_p'"),
])
@pytest.mark.parametrize("command", ["caption", "eval"])
def test_conflicting_generation_options_are_one_line_errors(model_dir, generate_calls, command, options, message):
    args = [str(model_dir / "image0.png")] if command == "caption" else []
    result = runner.invoke(app, [command, *args, "--model", str(model_dir), *options])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not generate_calls  # refused before any work


@pytest.mark.parametrize("options", [["--top-p", "0"], ["--top-p", "1.5"], ["--temperature", "0"], ["--beams", "0"]])
def test_out_of_range_generation_values_name_the_option(model_dir, options):
    result = _caption(model_dir, "--sample", *options)
    assert result.exit_code == 2 and f"Invalid value for '{options[0]}'" in result.output


def test_sampling_seed_makes_captions_repeatable(model_dir):
    def captions(seed):
        result = runner.invoke(app, ["caption", str(model_dir), "--model", str(model_dir), "--sample", "--top-k", "0",
                                     "--seed", seed, "--json", "--max-length", "14", "--min-length", "10"])
        assert result.exit_code == 0, result.output
        return [row["caption"] for row in json.loads(result.stdout)]

    assert captions("1") == captions("1") != captions("2")


@pytest.mark.parametrize("precision,dtype", [("no", False), ("fp32", False), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_precision_names_are_train_mixed_precisions(model_dir, generate_calls, precision, dtype):
    result = _caption(model_dir, "--precision", precision, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stdout.split("\t")[1].strip()
    assert [call["autocast"] for call in generate_calls] == [dtype]


def test_precision_a_device_cannot_run_is_refused_in_one_line(monkeypatch):
    from med_train.evaluate import precision_problem

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    problem = precision_problem(torch.device("cuda"), "bf16")
    assert "Tesla T4 has no bf16" in problem and "fp16" in problem
    assert precision_problem(torch.device("cuda"), "fp16") is None
    assert precision_problem(torch.device("cpu"), "bf16") is None  # F.linear's path where oneDNN has no bf16

    monkeypatch.setattr(cli, "_device", lambda device: torch.device("cuda"))
    result = runner.invoke(app, ["caption", "x.png", "--precision", "bf16"])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        f"error: --precision bf16: {problem}"]


def test_eval_takes_device_and_the_old_out_name(model_dir, monkeypatch):
    result = runner.invoke(app, ["eval", "--model", str(model_dir), "--device", "tpu"])
    assert result.exit_code == 2 and "--device" in result.output
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched: each process takes its own device, none is named
    result = runner.invoke(app, ["eval", "--model", str(model_dir), "--device", "cpu:0"])
    assert result.exit_code == 2 and "each process of a launch runs on its own device" in result.output
    monkeypatch.delenv("WORLD_SIZE")
    assert "--output-dir" in runner.invoke(app, ["eval", "--help"]).output
    assert "--out " not in runner.invoke(app, ["eval", "--help"]).output  # hidden, still accepted


def test_caption_json_is_one_document_listing_failures(model_dir, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    result = runner.invoke(app, ["caption", str(model_dir / "image0.png"), str(tmp_path / "notes.png"),
                                 str(model_dir / "image1.png"), "--model", str(model_dir), "--json", "--beams", "1"])
    assert result.exit_code == 1
    rows = json.loads(result.stdout)
    assert [r["image"] for r in rows] == [str(model_dir / "image0.png"), str(tmp_path / "notes.png"),
                                          str(model_dir / "image1.png")]
    assert rows[0]["caption"] and rows[0]["error"] is None and rows[2]["caption"]
    assert rows[1]["caption"] is None and rows[1]["error"]
    assert result.stderr.startswith(f"error: {tmp_path / 'notes.png'}")


def test_progress_bars_go_to_a_terminals_stderr_unless_quiet(model_dir, monkeypatch):
    args = ["caption", str(model_dir), "--model", str(model_dir), "--beams", "1", "--batch-size", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "img/s" not in result.stderr  # stderr is not a terminal here
    monkeypatch.setattr(cli, "_stderr_is_terminal", lambda: True)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "img/s" in result.stderr and "/3 [" in result.stderr  # of 3 images
    assert len([line for line in result.stdout.splitlines() if "\t" in line]) == 3  # stdout: the captions alone
    result = runner.invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0 and "img/s" not in result.stderr


# ---- models built from a config: ViTs only ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["convnext_tiny", "resnet18"])
@pytest.mark.parametrize("command", [["train"], ["race"], ["bench", "--config"]])
def test_a_timm_model_that_is_not_a_vit_is_refused_in_one_line(tmp_path, command, name):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"model": {"vision": {"name": name}}}))
    result = runner.invoke(app, [*command, str(tmp_path / "cfg.yaml")])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "cfg.yaml: model.vision.name:" in line and name in line and "VisionTransformer" in line


def test_vision_kwargs_a_vit_does_not_take_are_refused_in_one_line(tmp_path):
    config = {"model": {"vision": {"name": "vit_tiny_patch16_224", "kwargs": {"patch_sise": 8}}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["train", str(tmp_path / "cfg.yaml")])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "model.vision.kwargs" in line and "patch_sise" in line
