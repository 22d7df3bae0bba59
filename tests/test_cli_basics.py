"""The CLI's start-up: `med --help` must not import the heavy libraries."""

import subprocess
import sys


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
