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
