"""`med race`: both models train on the same batches for the same budget and are scored over time."""

import json

import yaml
from test_e2e import TINY
from typer.testing import CliRunner

from med_train.cli import app
from med_train.race import QUALITY_BAR, meets_bar

runner = CliRunner()


def test_race_trains_and_scores_both_models(tmp_path):
    assert runner.invoke(app, ["data", "shapes", str(tmp_path / "shapes"), "--train", "32", "--val", "0", "--test", "4"]).exit_code == 0
    config = {**TINY, "data": {**TINY["data"], "source": str(tmp_path / "shapes")},
              "train": {**TINY["train"], "warmup_steps": 2}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["race", str(tmp_path / "tiny.yaml"), "--budget", "6", "--eval-every", "2",
                                 "--eval-images", "4", "--json", "--json-out", str(tmp_path / "race.json")])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "race.json").read_text())
    assert json.loads(result.stdout) == results  # the document alone on stdout, the table on stderr
    for name in ("med_train", "transformers"):
        curve = results[name]["curve"]
        assert curve and curve[-1]["train_s"] >= 6  # scored at the end of its budget (and on the way)
        assert all(0 <= p["content_exact"] <= 1 and p["images"] == 4 for p in curve)
        assert [p["train_s"] for p in curve] == sorted(p["train_s"] for p in curve)
    assert "transformers" in result.stderr and "med_train" in result.stderr


def test_quality_bar():
    assert meets_bar(dict(QUALITY_BAR))
    assert not meets_bar({**QUALITY_BAR, "content_position": 0.39})
    assert not meets_bar({k: v for k, v in QUALITY_BAR.items() if k != "CIDEr"})
