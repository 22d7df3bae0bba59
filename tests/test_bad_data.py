"""Bad annotation data: lines `datasets` cannot read are skipped and counted, never a whole split refused; a missing
caption column is one error naming the columns; a run that fails before its first step leaves nothing behind;
held-out rows without `objects` are left out of the content scores; `med data check` counts cut captions.

Every fixture is a few tiny files written here."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model_config
from PIL import Image
from test_e2e import TINY
from typer.testing import CliRunner

from med_train.cli import app
from med_train.config import DataConfig, load_config
from med_train.data import build_dataset
from med_train.sources import BadRowStats, open_split

runner = CliRunner()
GOOD = [json.dumps({"file_name": f"g{i}.png", "id": f"g{i}", "text": f"a red dog {i}"}).encode() for i in range(5)]
BAD_LINES = {  # reason -> the line, written as line 3 of metadata.jsonl
    "line_not_utf8": b'{"file_name": "g9.png", "text": "caf\xe9 \xff"}',
    "line_not_json": b"this is not json",
    "caption_not_string": b'{"file_name": "g9.png", "text": 5}',
}


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), (i * 40 % 256, 90, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def write_folder(root: Path, lines: list[bytes], metadata: str = "metadata.jsonl") -> Path:
    (root / "train").mkdir(parents=True)
    for i in range(10):
        (root / "train" / f"g{i}.png").write_bytes(png(i))
    (root / "train" / metadata).write_bytes(b"\n".join(lines) + b"\n")
    return root


def with_bad_line(root: Path, bad: bytes) -> Path:
    return write_folder(root, [*GOOD[:2], bad, *GOOD[2:]])


def check(source: Path, *sets: str):
    args = ["data", "check", str(source), "--json", "--set", f"data.cache_dir={source / 'cache'}"]
    for s in sets:
        args += ["--set", s]
    return runner.invoke(app, args)


# ---- lines datasets cannot read -------------------------------------------------------------------------------------

@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_a_bad_metadata_line_is_one_counted_bad_row_naming_file_and_line(tmp_path, reason, streaming):
    root = with_bad_line(tmp_path, BAD_LINES[reason])
    cfg = DataConfig(source=str(root), streaming=streaming, cache_dir=str(tmp_path / "cache"))
    stats = BadRowStats()
    rows = list(build_dataset(cfg, "train", train=True, image_size=8, stats=stats))
    assert sorted((e["id"], e["caption"]) for e in rows) == [(f"g{i}", f"a red dog {i}") for i in range(5)]
    assert (stats.rows, stats.bad, dict(stats.bad_reasons)) == (6, 1, {reason: 1})
    assert stats.examples[0]["id"] == f"{(root / 'train' / 'metadata.jsonl').resolve()}:3"


def test_a_bad_line_in_a_folder_without_split_folders_is_skipped_too(tmp_path):
    root = with_bad_line(tmp_path / "src", BAD_LINES["line_not_json"])
    for path in (root / "train").iterdir():
        path.rename(root / path.name)
    (root / "train").rmdir()
    stats = BadRowStats()
    rows = list(build_dataset(DataConfig(source=str(root), cache_dir=str(tmp_path / "cache")), "train",
                              train=True, image_size=8, stats=stats))
    assert len(rows) == 5 and stats.examples[0]["id"].endswith("metadata.jsonl:3")


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_data_check_and_pack_read_past_a_bad_line(tmp_path, reason):
    root = with_bad_line(tmp_path / "src", BAD_LINES[reason])
    result = check(root)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["rows"], report["ok"], report["bad_reasons"]) == (6, 5, {reason: 1})
    assert f"metadata.jsonl:3: {reason}" in result.stderr and "Traceback" not in result.output
    result = runner.invoke(app, ["data", "pack", str(root), str(tmp_path / "packed"), "--quiet", "--json",
                                 "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["train"]["bad_reasons"] == {reason: 1}


def test_captions_of_every_wrong_type_are_bad_rows_and_mixed_lists_keep_their_strings(tmp_path):
    cells = [5, [1, 2], None, {"a": 1}, True, ["two", 3, "words"], "plain"]
    lines = [json.dumps({"file_name": f"g{i}.png", "id": f"c{i}", "text": c}).encode() for i, c in enumerate(cells)]
    root = write_folder(tmp_path, GOOD + lines)
    stats = BadRowStats()
    rows = list(build_dataset(DataConfig(source=str(root), cache_dir=str(tmp_path / "cache")), "train", train=True,
                              image_size=8, stats=stats))
    assert sorted((e["id"], e["caption"]) for e in rows if e["id"].startswith("c")) == [
        ("c5", "two"), ("c5", "words"), ("c6", "plain")]
    assert (stats.rows, dict(stats.bad_reasons)) == (12, {"caption_not_string": 5})


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_metadata_csv_records_are_counted_bad_rows_naming_their_line(tmp_path, streaming):
    """Line numbers count a quoted caption's line breaks; as pandas reads it, an empty cell is no caption and a
    short record is padded."""
    lines = [b"file_name,id,text", b'g0.png,g0,"a red dog,\nin two lines"', b"g1.png,g1,caf\xe9", b"g2.png,g2,a,b",
             b"g3.png,g3,", b"g4.png,g4", *(f"g{i}.png,g{i},a red dog {i}".encode() for i in range(5, 10))]
    root = write_folder(tmp_path, lines, "metadata.csv")
    stats = BadRowStats()
    rows = list(build_dataset(DataConfig(source=str(root), streaming=streaming, cache_dir=str(tmp_path / "cache")),
                              "train", train=True, image_size=8, stats=stats))
    assert sorted((e["id"], e["caption"]) for e in rows) == [("g0", "a red dog, in two lines")] + [
        (f"g{i}", f"a red dog {i}") for i in range(5, 10)]
    where = {e["reason"]: e["id"].rsplit(":", 1)[1] for e in stats.examples if ".csv:" in e["id"]}
    assert where == {"line_not_utf8": "4", "line_not_csv": "5"}
    assert (stats.rows, dict(stats.bad_reasons)) == (10, {"line_not_utf8": 1, "line_not_csv": 1,
                                                          "caption_not_string": 2})


def test_a_file_name_outside_the_folder_is_a_bad_row(tmp_path):
    """As datasets refuses it; checked here when a bad line sends the file through a cleaned copy."""
    root = write_folder(tmp_path, [*GOOD, BAD_LINES["line_not_json"], b'{"file_name": "../../secret.png", "text": "x"}'])
    stats = BadRowStats()
    rows = list(build_dataset(DataConfig(source=str(root), cache_dir=str(tmp_path / "cache")), "train",
                              train=True, image_size=8, stats=stats))
    assert len(rows) == 5 and dict(stats.bad_reasons) == {"line_not_json": 1, "image_outside_folder": 1}


def test_a_bad_line_in_a_jsonl_annotation_list_is_skipped(tmp_path):
    (tmp_path / "images").mkdir()
    lines = []
    for i in range(4):
        (tmp_path / "images" / f"g{i}.png").write_bytes(png(i))
        lines.append(json.dumps({"image": f"images/g{i}.png", "caption": f"a dog {i}", "image_id": f"g{i}"}))
    lines.insert(1, "{not json")
    (tmp_path / "ann.jsonl").write_text("\n".join(lines) + "\n")
    stats = BadRowStats()
    cfg = DataConfig(source=str(tmp_path / "ann.jsonl"), cache_dir=str(tmp_path / "cache"))
    rows = list(build_dataset(cfg, "train", train=True, image_size=8, stats=stats))
    assert sorted(e["caption"] for e in rows) == [f"a dog {i}" for i in range(4)]
    assert stats.examples[0]["id"].endswith("ann.jsonl:2") and stats.examples[0]["reason"] == "line_not_json"


def write_list(root: Path, entries: list) -> Path:
    """A BLIP / Karpathy style annotation list, `ann.json`, beside the images it names."""
    (root / "images").mkdir(parents=True)
    for i in range(5):
        (root / "images" / f"g{i}.png").write_bytes(png(i))
    (root / "ann.json").write_text(json.dumps(entries, indent=1))
    return root / "ann.json"


GOOD_ENTRIES = [{"image": f"images/g{i}.png", "caption": f"a red dog {i}", "image_id": f"g{i}"} for i in range(5)]
BAD_ENTRIES = {  # reason -> the entry, written as entry 2 of ann.json
    "caption_not_string": {"image": "images/g1.png", "caption": 5},
    "image_missing": {"caption": "a dog without an image"},
    "entry_not_object": "images/g1.png",
}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("reason", list(BAD_ENTRIES))
def test_a_bad_entry_of_a_json_list_is_one_counted_bad_row_naming_file_and_index(tmp_path, reason, streaming):
    ann = write_list(tmp_path, [*GOOD_ENTRIES[:2], BAD_ENTRIES[reason], *GOOD_ENTRIES[2:]])
    stats = BadRowStats()
    cfg = DataConfig(source=str(ann), streaming=streaming, cache_dir=str(tmp_path / "cache"))
    rows = list(build_dataset(cfg, "train", train=True, image_size=8, stats=stats))
    assert sorted(e["caption"] for e in rows) == [f"a red dog {i}" for i in range(5)]
    assert (stats.rows, stats.bad, dict(stats.bad_reasons)) == (6, 1, {reason: 1})
    assert stats.examples[0]["id"] == f"{ann.resolve()}[2]"

    result = check(ann, f"data.cache_dir={tmp_path / 'cache'}")  # the last --set wins
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    report = json.loads(result.stdout)
    assert (report["rows"], report["ok"], report["bad_reasons"]) == (6, 5, {reason: 1})
    assert f"ann.json[2]: {reason}" in result.stderr


def test_a_json_list_cut_short_is_one_error_naming_where_it_stops(tmp_path):
    ann = write_list(tmp_path, GOOD_ENTRIES)
    cut = ann.read_text().split('"images/g3.png"')[0]
    ann.write_text(cut)
    where = f"line {cut.count(chr(10)) + 1}, column {len(cut.rsplit(chr(10), 1)[1]) + 1}"  # just past the end
    result = check(ann, f"data.cache_dir={tmp_path / 'cache'}")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {ann}: not valid JSON (Expecting value at {where}): an annotation list cut short?"]
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["train", str(train_config(tmp_path, ann)), "--output-dir", str(runs), "--set",
                                 "data.format=blip_json"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"{ann}: not valid JSON (Expecting value at {where})" in result.stderr.strip().splitlines()[-1]
    assert not list(runs.iterdir())


def test_a_json_list_that_reads_is_read_as_it_is(tmp_path):
    stats = BadRowStats()
    cfg = DataConfig(source=str(write_list(tmp_path, GOOD_ENTRIES)), cache_dir=str(tmp_path / "cache"))
    assert len(list(build_dataset(cfg, "train", train=True, image_size=8, stats=stats))) == 5 and stats.bad == 0
    assert not (tmp_path / "cache" / "med_train_cleaned").exists()


def test_a_file_that_reads_is_read_as_it_is(tmp_path):
    root = write_folder(tmp_path, GOOD)
    table = open_split(DataConfig(source=str(root), cache_dir=str(tmp_path / "cache")), "train")
    assert "image" in table.features and type(table.features["image"]).__name__ == "Image"  # imagefolder's own
    assert not (tmp_path / "cache" / "med_train_cleaned").exists()


# ---- the caption column ---------------------------------------------------------------------------------------------

def write_csv(root: Path, column: str = "description") -> Path:
    (root / "train").mkdir(parents=True)
    lines = [f"file_name,{column}"]
    for i in range(8):
        (root / "train" / f"g{i}.png").write_bytes(png(i))
        lines.append(f"g{i}.png,a red dog {i}")
    (root / "train" / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_a_missing_caption_column_is_one_error_naming_the_columns(tmp_path):
    root = write_csv(tmp_path / "csv")
    result = check(root, "data.caption_column=text")
    assert result.exit_code == 1
    [message] = [line for line in result.stderr.splitlines() if "error" in line.lower()]  # one line, no traceback
    assert "no caption column 'text' (data.caption_column)" in message and "image, description" in message
    result = check(write_csv(tmp_path / "close", "captoin"))
    assert "did you mean --set data.caption_column=captoin?" in result.stderr


# ---- a run that fails before its first step -------------------------------------------------------------------------

def train_config(tmp_path: Path, source: Path) -> Path:
    config = {**TINY, "data": {**TINY["data"], "source": str(source), "cache_dir": str(tmp_path / "cache")},
              "train": {**TINY["train"], "eval_every": 0}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "tiny.yaml"


@pytest.mark.parametrize("fault", ["no caption column", "mostly bad"])
def test_a_run_failing_before_its_first_step_leaves_no_folder_and_keeps_latest(tmp_path, fault):
    runs = tmp_path / "runs"
    (runs / "old").mkdir(parents=True)
    (runs / "latest").symlink_to("old")
    if fault == "no caption column":
        source = write_csv(tmp_path / "data")
    else:  # captions fine (a tokenizer is trained, the run folder written), every image missing
        source = write_folder(tmp_path / "data", GOOD)
        for image in (source / "train").glob("*.png"):
            image.unlink()
    result = runner.invoke(app, ["train", str(train_config(tmp_path, source)), "--output-dir", str(runs)])
    assert result.exit_code == 1 and fault in result.stderr, result.output
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "old"] and os.readlink(runs / "latest") == "old"


# ---- held-out rows without objects; cut captions --------------------------------------------------------------------

def test_held_out_rows_without_objects_are_left_out_of_the_content_scores(tmp_path, tokenizer):
    from med_train.evaluate import evaluate
    from med_train.model import Captioner

    objects = [{"kind": "circle", "colour": "red", "size": "small", "position": "centre"}]
    lines = [json.dumps({"file_name": f"g{i}.png", "id": f"g{i}", "captions": [f"a red dog {i}"],
                         **({"objects": objects} if i < 2 else {})}).encode() for i in range(5)]
    root = write_folder(tmp_path, lines)
    (root / "train").rename(root / "test")
    torch.manual_seed(0)
    model = Captioner(tiny_model_config(), tokenizer)
    cfg = load_config(None, [f"data.source={root}", f"data.cache_dir={tmp_path / 'cache'}", "generate.max_length=8",
                             "generate.min_length=1"])
    cfg.model = model.cfg
    scores = evaluate(model, cfg, split="test", num_beams=1, quiet=True)
    assert scores["images"] == 5 and scores["content_images"] == 2 and 0.0 <= scores["content_exact"] <= 1.0


def test_eval_of_a_split_without_captions_is_one_error(tmp_path, tokenizer):
    from med_train.model import Captioner

    Captioner(tiny_model_config(), tokenizer).save_pretrained(tmp_path / "model")
    source = write_csv(tmp_path / "data")
    (source / "train").rename(source / "test")
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "model"), "--quiet", "--set",
                                 f"data.source={source}", "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 1 and "[test] has no caption column 'caption'" in result.stderr, result.output


def test_data_check_counts_captions_cut_by_the_word_limit(tmp_path):
    lines = [*GOOD[:3], json.dumps({"file_name": "g3.png", "text": "red dog " * 5000}).encode()]
    result = check(write_folder(tmp_path, lines))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["over_max_words"], report["over_max_length"], report["truncated"]) == (1, 0, 1)
    assert report["words"]["max"] == 30  # what training reads
    assert "1 of 4 captions truncated: 1 over data.max_words (30 words)" in result.stderr

