"""The door to the speed-only paths: `fast.prepare` is the only way in, the model files never import the
subpackage, a captioner without it is correct, and the switch turns every path off."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import tiny_model_config

from med_train import fast
from med_train.fast.decoding import FastDecoding
from med_train.fast.ops import FastLinear
from med_train.model import Captioner

PACKAGE = Path(fast.__file__).parents[1]


def test_the_model_files_import_nothing_from_the_fast_package():
    for name in ("med.py", "cache.py", "decode.py", "model.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        assert not [m for m in imported if m.startswith("med_train.fast")], name
        from_package = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                        and node.module == "med_train" and any(a.name == "fast" for a in node.names)]
        assert not from_package, name


def test_without_the_fast_package_the_captioner_trains_and_captions():
    """`med_train.fast` made unimportable (as if deleted): a captioner builds, takes a training step and captions
    through evaluate's path, which then leaves the model plain."""
    code = """if True:
        import sys
        from importlib.abc import MetaPathFinder

        class Deleted(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "med_train.fast" or name.startswith("med_train.fast."):
                    raise ImportError(name)

        sys.meta_path.insert(0, Deleted())
        import torch
        from med_train.config import ModelConfig, TextConfig, VisionConfig
        from med_train.evaluate import prepare_decoding
        from med_train.model import Captioner
        from med_train.tokenizer import train_tokenizer

        tokenizer = train_tokenizer(["a picture of a red circle", "a picture of a blue square"] * 20, vocab_size=120)
        cfg = ModelConfig(vision=VisionConfig(name="vit_tiny_patch16_224", image_size=32,
                                              kwargs=dict(patch_size=8, embed_dim=48, depth=2, num_heads=3)),
                          text=TextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=64))
        model = Captioner(cfg, tokenizer)
        images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
        model(images, ["a red circle", "a blue square"]).backward()
        prepare_decoding(model, torch.device("cpu"))
        model.eval()
        assert len(model.generate(images, num_beams=3, max_length=12)) == 2
        assert not any(m.startswith("med_train.fast") for m in sys.modules)
        assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr[-3000:]


def test_prepare_decides_once_per_model_and_the_switch_turns_it_all_off(tokenizer, monkeypatch):
    model = Captioner(tiny_model_config(), tokenizer)
    report = fast.prepare(model, "cpu", "decode", enabled_here=True)
    assert fast.prepare(model, "cpu", "decode") is report  # decided once
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, FastLinear) for m in linears)
    assert isinstance(model.text_decoder.decoding, FastDecoding) and "prepacked products" in report.describe()

    monkeypatch.setenv("MED_FAST", "0")
    assert not fast.enabled()
    plain = Captioner(tiny_model_config(), tokenizer)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    assert fast.prepare(plain, "cpu", "train").describe() == "fast paths: off"
    assert all(type(m) is torch.nn.Linear for m in plain.modules() if isinstance(m, torch.nn.Linear))
    assert not hasattr(plain.text_decoder, "decoding")
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
    monkeypatch.delenv("MED_FAST")
    other = Captioner(tiny_model_config(), tokenizer)
    assert fast.prepare(other, "cpu", "train", enabled_here=False).describe() == "fast paths: off"  # train.fast


def test_a_prepared_model_keeps_its_parameters_and_state_dict(tokenizer):
    model = Captioner(tiny_model_config(), tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    fast.prepare(model, "cpu", "train", enabled_here=True)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert [id(p) for p in model.parameters()] == params


def test_measuring_the_routes_leaves_a_seeded_runs_random_draws_alone(tokenizer, monkeypatch, tmp_path):
    """The calibration at a first `prepare` (nothing cached yet) draws its inputs from a generator of its own: a
    seeded run draws the same numbers whether this machine had measured before or not."""
    from med_train.fast import calibrate, few_rows, ops

    for route in ("packed_few", "packed_many", "few_rows", "onednn_training"):  # as the other tests take them
        monkeypatch.setattr(ops.ROUTES, route, getattr(ops.ROUTES, route))
    monkeypatch.delenv("MED_FAST")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calibrate.clear()
    model = Captioner(tiny_model_config(), tokenizer)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    fast.prepare(model, "cpu", "train")
    fast.prepare(model, "cpu", "decode")
    measured = 4 if few_rows.available() else 3  # the kernel's route is measured only where it is built
    assert len(calibrate.verdicts()) == measured and all(v.source.startswith("measured") for v in calibrate.verdicts())
    assert torch.equal(torch.get_rng_state(), state)
    calibrate.clear()


def test_a_med_fast_value_that_means_nothing_is_one_line(monkeypatch):
    from typer.testing import CliRunner

    from med_train.cli import app

    monkeypatch.setenv("MED_FAST", "yes")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: MED_FAST must be 0 (fast paths off), 1 (on) or unset (measured), not 'yes'"]
