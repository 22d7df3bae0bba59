"""The data layer: every source kind, streamed or not, gives the same rows; bad rows are skipped and counted;
sharding gives each row to exactly one worker of one process; resume neither replays nor skips; cleaning, label
masking and image modes are right; `med data check --json` reports what the files hold.

Every fixture is written here: solid-colour PNGs whose colour encodes the row, so a pixel says which row it is.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from typer.testing import CliRunner

from med_train.cli import app
from med_train.config import DataConfig
from med_train.data import build_dataloader, build_dataset, build_transform, iter_captions, make_collate
from med_train.sources import (
    BadImage,
    BadRowStats,
    DataError,
    clean_caption,
    clean_captions,
    load_image,
    pack,
    to_rgb,
)
from med_train.tokenizer import prompt_length

N_TRAIN, N_TEST = 12, 4


def colour(i: int) -> tuple[int, int, int]:
    return (i * 19 % 256, i * 53 % 256, (200 + i * 11) % 256)


def png(i: int, size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour(i)).save(buffer, "PNG")
    return buffer.getvalue()


def train_caption(i: int) -> str:
    return f"A Picture, number {i}!"  # cleaned: "a picture, number {i}"


def held_out_refs(i: int) -> list[str]:
    return [f"Reference one of {i}.", f"reference (two) of {i}"]


EXPECTED_TRAIN = {(f"r{i}", clean_caption(train_caption(i), 30)) for i in range(N_TRAIN)}
EXPECTED_TEST = {f"t{i}": sorted(clean_caption(c, 30) for c in held_out_refs(i)) for i in range(N_TEST)}


# ---- fixtures: one folder per source kind ---------------------------------------------------------------------------

def write_imagefolder(root: Path) -> None:
    for split, n, prefix in (("train", N_TRAIN, "r"), ("test", N_TEST, "t")):
        (root / split).mkdir(parents=True)
        lines = []
        for i in range(n):
            (root / split / f"{prefix}{i}.png").write_bytes(png(i if split == "train" else 100 + i))
            row = {"file_name": f"{prefix}{i}.png", "id": f"{prefix}{i}"}
            row.update({"caption": train_caption(i)} if split == "train" else {"captions": held_out_refs(i)})
            lines.append(json.dumps(row))
        (root / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def write_imagefolder_csv(root: Path) -> None:
    (root / "train").mkdir(parents=True)
    lines = ["file_name,id,caption"]
    for i in range(N_TRAIN):
        (root / "train" / f"r{i}.png").write_bytes(png(i))
        lines.append(f'r{i}.png,r{i},"{train_caption(i)}"')
    (root / "train" / "metadata.csv").write_text("\n".join(lines) + "\n")


def write_blip_json(root: Path) -> None:
    """Karpathy style: train rows one caption each; test rows one per caption too (grouped by image_id)."""
    (root / "images").mkdir(parents=True)
    train, test = [], []
    for i in range(N_TRAIN):
        (root / "images" / f"r{i}.png").write_bytes(png(i))
        train.append({"image": f"images/r{i}.png", "caption": train_caption(i), "image_id": f"r{i}"})
    for i in range(N_TEST):
        (root / "images" / f"t{i}.png").write_bytes(png(100 + i))
        test += [{"image": f"images/t{i}.png", "caption": c, "image_id": f"t{i}"} for c in held_out_refs(i)]
    (root / "ann").mkdir()
    (root / "ann" / "blip_train.json").write_text(json.dumps(train))
    (root / "ann" / "blip_test.json").write_text(json.dumps(test))


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_webdataset(root: Path) -> None:
    """Train: 3 shards of .png + .txt (id = the key); test: one shard of .png + .json with a captions list."""
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
    for shard in range(3):
        with tarfile.open(root / "train" / f"shard-{shard}.tar", "w") as tar:
            for i in range(shard * 4, shard * 4 + 4):
                add_member(tar, f"r{i}.png", png(i))
                add_member(tar, f"r{i}.txt", train_caption(i).encode())
    with tarfile.open(root / "test" / "shard-0.tar", "w") as tar:
        for i in range(N_TEST):
            add_member(tar, f"t{i}.png", png(100 + i))
            add_member(tar, f"t{i}.json", json.dumps({"captions": held_out_refs(i)}).encode())


def write_parquet(root: Path, uniform: bool = False) -> None:
    """Split-named files in one folder (train-0000N.parquet), image bytes in a {bytes, path} struct. `uniform`:
    train captions as 1-item lists, so both splits have the same columns (load_dataset(folder) requires it)."""
    root.mkdir(parents=True)
    for part in range(2):
        rows = range(part * 6, part * 6 + 6)
        captions = {"captions": [[train_caption(i)] for i in rows]} if uniform else {
            "caption": [train_caption(i) for i in rows]}
        pq.write_table(pa.table({"image": [{"bytes": png(i), "path": None} for i in rows], **captions,
                                 "id": [f"r{i}" for i in rows]}), root / f"train-{part:05d}.parquet")
    pq.write_table(pa.table({"image": [{"bytes": png(100 + i), "path": None} for i in range(N_TEST)],
                             "captions": [held_out_refs(i) for i in range(N_TEST)],
                             "id": [f"t{i}" for i in range(N_TEST)]}), root / "test-00000.parquet")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, DataConfig]:
    base = tmp_path_factory.mktemp("sources")
    cache = str(base / "hf-cache")
    write_imagefolder(base / "imagefolder")
    write_imagefolder_csv(base / "csv")
    write_blip_json(base / "blip")
    write_webdataset(base / "wds")
    write_parquet(base / "parquet")
    write_parquet(base / "hub", uniform=True)
    return {
        "imagefolder": DataConfig(source=str(base / "imagefolder"), cache_dir=cache),
        "csv": DataConfig(source=str(base / "csv"), cache_dir=cache),
        "blip_json": DataConfig(source=str(base / "blip" / "ann" / "blip_{split}.json"),
                                image_root=str(base / "blip"), cache_dir=cache),
        "webdataset": DataConfig(source=str(base / "wds"), cache_dir=cache),
        "parquet": DataConfig(source=str(base / "parquet"), cache_dir=cache),
        # The hub code path (load_dataset(source, config_name, ...)) pointed at a local folder.
        "hub": DataConfig(source=str(base / "hub"), format="hub", cache_dir=cache),
    }


def with_(cfg: DataConfig, **changes) -> DataConfig:
    return DataConfig(**{**cfg.__dict__, **changes})


def pixel_row(image: torch.Tensor) -> tuple[int, ...]:
    return tuple(round(v) for v in image.float().mean(dim=(1, 2)).tolist())


# ---- sources --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["imagefolder", "csv", "blip_json", "webdataset", "parquet", "hub"])
@pytest.mark.parametrize("streaming", [False, True])
def test_every_source_yields_the_same_rows(sources, kind, streaming):
    cfg = with_(sources[kind], streaming=streaming)
    stats = BadRowStats()
    train = list(build_dataset(cfg, "train", train=True, image_size=8, stats=stats))
    assert {(e["id"], e["caption"]) for e in train} == EXPECTED_TRAIN and len(train) == N_TRAIN
    for e in train:  # each image is its own row's (solid colour survives the random crop)
        assert e["image"].shape == (3, 8, 8)
        assert pixel_row(e["image"]) == pytest.approx(colour(int(e["id"][1:])), abs=1)
    assert (stats.rows, stats.bad) == (N_TRAIN, 0)
    if kind == "csv":
        return
    test = list(build_dataset(cfg, "test", train=False, image_size=8))
    assert {e["id"]: sorted(e["references"]) for e in test} == EXPECTED_TEST  # one row per image, all refs
    assert all(pixel_row(e["image"]) == pytest.approx(colour(100 + int(e["id"][1:])), abs=1) for e in test)


def test_iter_captions_and_missing_split(sources):
    assert sorted(iter_captions(sources["parquet"], "train")) == sorted(c for _, c in EXPECTED_TRAIN)
    with pytest.raises(DataError, match="no split 'validation'.*found: train, test"):
        build_dataset(sources["parquet"], "validation", train=False, image_size=8)


def test_pack_round_trips(sources, tmp_path):
    for fmt in ("webdataset", "parquet"):
        out = tmp_path / fmt
        stats = pack(sources["blip_json"], out, fmt=fmt, shard_size=5)
        assert (stats["train"].ok, stats["test"].ok) == (N_TRAIN, N_TEST)
        assert len(list((out / "train").iterdir())) == 3  # 12 rows in shards of 5
        cfg = DataConfig(source=str(out), cache_dir=sources["parquet"].cache_dir, streaming=True)
        train = list(build_dataset(cfg, "train", train=True, image_size=8))
        assert {(e["id"], e["caption"]) for e in train} == EXPECTED_TRAIN
        test = list(build_dataset(cfg, "test", train=False, image_size=8))
        assert {e["id"]: sorted(e["references"]) for e in test} == EXPECTED_TEST
    with pytest.raises(DataError, match="not empty"):  # stale shards would be read with the new ones
        pack(sources["blip_json"], tmp_path / "parquet", fmt="parquet")


# ---- bad rows -------------------------------------------------------------------------------------------------------

BAD_REASONS = {"image_missing": 1, "image_unreadable": 2, "caption_empty": 1, "caption_not_string": 1,
               "image_too_large": 1}


@pytest.fixture(scope="module")
def bad_source(tmp_path_factory) -> DataConfig:
    """6 good rows and one of each kind of bad row (the bomb: 100x100 pixels against a limit of 5000)."""
    root = tmp_path_factory.mktemp("bad")
    (root / "train").mkdir()
    rows = []
    for i in range(6):
        (root / "train" / f"g{i}.png").write_bytes(png(i))
        rows.append({"file_name": f"g{i}.png", "id": f"g{i}", "caption": f"good {i}"})
    (root / "train" / "truncated.png").write_bytes(png(1, size=64)[:60])
    (root / "train" / "text.png").write_bytes(b"this is not an image")
    (root / "train" / "bomb.png").write_bytes(png(2, size=100))
    (root / "train" / "e.png").write_bytes(png(3))
    (root / "train" / "n.png").write_bytes(png(4))
    rows += [{"file_name": "missing.png", "id": "missing", "caption": "x"},  # listed, never written
             {"file_name": "truncated.png", "id": "truncated", "caption": "x"},
             {"file_name": "text.png", "id": "text", "caption": "x"},
             {"file_name": "bomb.png", "id": "bomb", "caption": "x"},
             {"file_name": "e.png", "id": "empty", "caption": " !!! "},
             {"file_name": "n.png", "id": "nocaption", "caption": None}]
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "train" / "missing.png").write_bytes(b"")  # make datasets list it...
    (root / "train" / "missing.png").unlink()  # ...then remove it
    return DataConfig(source=str(root), max_image_pixels=5000, cache_dir=str(root / "hf-cache"))


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_rows_are_skipped_counted_and_named(bad_source, streaming):
    stats = BadRowStats()
    cfg = with_(bad_source, streaming=streaming)
    good = list(build_dataset(cfg, "train", train=True, image_size=8, stats=stats))
    assert sorted(e["id"] for e in good) == [f"g{i}" for i in range(6)]
    assert (stats.rows, stats.ok, stats.bad, dict(stats.bad_reasons)) == (12, 6, 6, BAD_REASONS)
    by_id = {e["id"]: e for e in stats.examples}
    assert by_id["missing"]["reason"] == "image_missing" and "missing.png" in by_id["missing"]["detail"]
    assert by_id["bomb"]["reason"] == "image_too_large" and "100x100" in by_id["bomb"]["detail"]
    assert "12 rows: 6 ok, 6 bad" in stats.summary()


def test_bad_rows_reach_the_loader_stats_from_workers(bad_source, tokenizer, caplog):
    loader = build_dataloader(bad_source, "train", train=True, batch_size=4, image_size=8,
                              tokenizer=tokenizer, prompt="a picture of ", max_length=16, epochs=1,
                              num_workers=2)
    assert sum(len(b["ids"]) for b in loader) == 6
    assert (loader.stats.rows, dict(loader.stats.bad_reasons)) == (12, BAD_REASONS)
    assert "skipped row missing of" in caplog.text and "image_missing" in caplog.text  # the run log names them


def test_a_mostly_bad_source_stops_with_its_name(bad_source):
    cfg = with_(bad_source, max_bad_fraction=0.25)
    with pytest.raises(DataError, match=f"{bad_source.source}.*mostly bad.*6 bad"):
        list(build_dataset(cfg, "train", train=True, image_size=8))


def test_an_endless_stream_of_a_mostly_bad_source_stops(bad_source, tokenizer):
    """No pass ever ends, so the check runs on the first 100 rows (here: about 8 passes over 12 rows)."""
    loader = build_dataloader(with_(bad_source, max_bad_fraction=0.25), "train", train=True, batch_size=4,
                              image_size=8, tokenizer=tokenizer, num_workers=0)
    with pytest.raises(DataError, match="mostly bad"):
        for _ in zip(range(1000), loader, strict=False):
            pass


def test_data_check_json_reports_the_fixture(bad_source):
    result = CliRunner().invoke(app, ["data", "check", bad_source.source, "--json", "--set",
                                      "data.max_image_pixels=5000", "--set", f"data.cache_dir={bad_source.cache_dir}"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the document alone: the human summary went to stderr
    assert "12 rows, 6 ok, 6 bad" in result.stderr
    assert (report["rows"], report["ok"], report["bad"]) == (12, 6, 6)
    assert report["bad_reasons"] == BAD_REASONS
    assert report["captions"] == 6 and report["words"]["max"] == 2 and report["unk_rate"] == 0.0
    assert report["images_per_s"] > 0


def test_data_check_and_pack_show_progress_on_a_terminal_and_pack_json(bad_source, tmp_path, monkeypatch):
    from med_train import cli

    monkeypatch.setattr(cli, "_stderr_is_terminal", lambda: True)
    check = ["data", "check", bad_source.source, "--set", f"data.cache_dir={bad_source.cache_dir}", "--json"]
    result = CliRunner().invoke(app, check)
    assert result.exit_code == 0, result.output
    assert "row/s" in result.stderr and json.loads(result.stdout)["rows"] == 12
    assert "row/s" not in CliRunner().invoke(app, [*check, "--quiet"]).stderr

    result = CliRunner().invoke(app, ["data", "pack", bad_source.source, str(tmp_path / "packed"), "--split", "train",
                                      "--set", f"data.cache_dir={bad_source.cache_dir}", "--set",
                                      "data.max_image_pixels=5000", "--json"])
    assert result.exit_code == 0, result.output
    assert "row/s" in result.stderr and "train:" in result.stderr
    stats = json.loads(result.stdout)
    assert (stats["train"]["rows"], stats["train"]["ok"]) == (12, 6)
    assert stats["train"]["folder"] == str(tmp_path / "packed" / "train")


# ---- sharding and resume --------------------------------------------------------------------------------------------

def loader_for(cfg, tokenizer, **kw):
    args = dict(train=True, batch_size=3, image_size=8, tokenizer=tokenizer, prompt="a ",
                max_length=16, seed=7, epochs=1, num_workers=2)
    return build_dataloader(cfg, "train", **{**args, **kw})


@pytest.mark.parametrize("kind,streaming", [("imagefolder", False), ("imagefolder", True), ("webdataset", True),
                                            ("parquet", True)])
def test_two_processes_of_two_workers_see_every_row_once(sources, tokenizer, kind, streaming):
    """imagefolder streams as 1 shard (rows interleaved), webdataset has 3 shards and parquet 2 (shards or rows)."""
    cfg = with_(sources[kind], streaming=streaming, shuffle_buffer=4)
    seen = [[i for batch in loader_for(cfg, tokenizer, num_processes=2, process_index=p) for i in batch["ids"]]
            for p in range(2)]
    assert sorted(seen[0] + seen[1]) == sorted(i for i, _ in EXPECTED_TRAIN)
    assert abs(len(seen[0]) - len(seen[1])) <= 2  # balanced: at most one row per worker apart


def test_training_loader_is_endless_with_full_batches(sources, tokenizer):
    """2 processes x 1 worker, 6 rows each per epoch, batches of 4: 6 batches are exactly 4 epochs."""
    loaders = [loader_for(sources["parquet"], tokenizer, num_processes=2, process_index=p, epochs=None,
                          num_workers=0, batch_size=4) for p in range(2)]
    batches = [b for loader in loaders for _, b in zip(range(6), loader, strict=False)]
    assert len(batches) == 12 and all(len(b["ids"]) == 4 for b in batches)
    assert Counter(i for b in batches for i in b["ids"]) == {i: 4 for i, _ in EXPECTED_TRAIN}
    assert loaders[0].epoch == 3  # the epoch of the last delivered example (epochs count from 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batches_for_a_gpu_come_in_pinned_memory(sources, tokenizer):
    """Page-locked batches: the trainer's `.to(device, non_blocking=True)` is then an asynchronous copy."""
    for pin in (True, False):
        batch = next(iter(loader_for(sources["parquet"], tokenizer, pin_memory=pin)))
        assert batch["images"].is_pinned() == pin and batch["input_ids"].is_pinned() == pin
        assert batch["ids"] and isinstance(batch["ids"][0], str)  # the non-tensor fields pass through


@pytest.mark.parametrize("streaming,workers", [(False, 0), (False, 2), (True, 0), (True, 2)])
def test_resume_neither_replays_nor_skips(sources, tokenizer, streaming, workers):
    cfg = with_(sources["webdataset"], streaming=streaming, shuffle_buffer=3)
    first = loader_for(cfg, tokenizer, num_workers=workers, batch_size=2)
    before = [i for _, b in zip(range(3), first, strict=False) for i in b["ids"]]
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint is JSON
    resumed = loader_for(cfg, tokenizer, num_workers=workers, batch_size=2)
    resumed.load_state_dict(state)
    after = [i for b in resumed for i in b["ids"]]
    assert len(before) == 6 and sorted(before + after) == sorted(i for i, _ in EXPECTED_TRAIN)


def test_resume_continues_the_exact_sequence_across_epochs(sources, tokenizer):
    cfg = with_(sources["webdataset"], streaming=True, shuffle_buffer=5)
    whole = [b["ids"] for _, b in zip(range(9), loader_for(cfg, tokenizer, epochs=None, num_workers=0),
                                      strict=False)]
    first = loader_for(cfg, tokenizer, epochs=None, num_workers=0)
    head = [b["ids"] for _, b in zip(range(5), first, strict=False)]
    resumed = loader_for(cfg, tokenizer, epochs=None, num_workers=0)
    resumed.load_state_dict(first.state_dict())
    tail = [b["ids"] for _, b in zip(range(4), resumed, strict=False)]
    assert head + tail == whole  # 27 examples: two epochs of 12 and a bit, shuffled differently each epoch
    assert sorted(sum(whole[:4], [])) == sorted(i for i, _ in EXPECTED_TRAIN)  # first 12 = one epoch


def test_resume_mid_row_with_several_captions(tmp_path, tokenizer):
    """A row with 3 captions gives 3 examples; a checkpoint can fall between them."""
    (tmp_path / "train").mkdir()
    rows = []
    for i in range(5):
        (tmp_path / "train" / f"{i}.png").write_bytes(png(i))
        rows.append({"file_name": f"{i}.png", "id": f"r{i}", "captions": [f"one {i}", f"two {i}", f"three {i}"]})
    (tmp_path / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    first = loader_for(cfg, tokenizer, num_workers=0, batch_size=4)
    before = [c for _, b in zip(range(2), first, strict=False) for c in b["captions"]]
    resumed = loader_for(cfg, tokenizer, num_workers=0, batch_size=4)
    resumed.load_state_dict(first.state_dict())
    after = [c for b in resumed for c in b["captions"]]
    assert sorted(before + after) == sorted(f"{w} {i}" for i in range(5) for w in ("one", "two", "three"))
    assert resumed.stats.rows == 5  # the row split by the checkpoint is counted once


def gathered_state(loaders) -> dict:
    """The state one process per loader would save: `state_dict` gathers every process's position, as JSON."""
    states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]
    return {**states[0], "ranks": [s["ranks"][0] for s in states]}


def run_layout(cfg, tokenizer, processes, workers, state=None, batches=None, **kw) -> tuple[list, list]:
    """(the captions `processes` x `workers` slots deliver, their loaders): `batches` per process, or to the end."""
    loaders = [loader_for(cfg, tokenizer, num_processes=processes, process_index=p, num_workers=workers, **kw)
               for p in range(processes)]
    seen = []
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
        seen += [c for _, b in zip(range(batches or 10**6), loader, strict=False) for c in b["captions"]]
    return seen, loaders


@pytest.mark.parametrize("then,now", [((1, 2), (1, 0)), ((1, 0), (1, 3)), ((2, 2), (1, 1)), ((1, 2), (2, 2)),
                                      ((2, 1), (3, 0))])
@pytest.mark.parametrize("epochs", [1, 2])
def test_resume_with_other_processes_or_workers_neither_repeats_nor_skips(tmp_path, tokenizer, then, now, epochs):
    """(processes, workers) change between the runs; rows of 1-3 captions, so checkpoints fall inside rows too.
    Before + after is what an uninterrupted run delivers: every caption `epochs` times."""
    (tmp_path / "train").mkdir()
    rows, captions = [], []
    for i in range(11):
        (tmp_path / "train" / f"{i}.png").write_bytes(png(i))
        rows.append({"file_name": f"{i}.png", "id": f"r{i}", "captions": [f"c{j} {i}" for j in range(1 + i % 3)]})
        captions += rows[-1]["captions"]
    (tmp_path / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    before, old = run_layout(cfg, tokenizer, *then, batches=2, epochs=epochs)
    after, new = run_layout(cfg, tokenizer, *now, state=gathered_state(old), epochs=epochs)
    assert Counter(before + after) == {c: epochs for c in captions}
    assert all(loader.resharded_from == (then[0], max(1, then[1])) for loader in new)
    assert sum(loader.stats.rows for loader in new) == 11 * epochs  # the counts so far carried over, once


def test_a_second_resume_with_yet_another_layout_neither_repeats_nor_skips(sources, tokenizer):
    """Each resume carries what every earlier layout delivered: 2 workers, then 1, then 3 to the end of epoch 1."""
    cfg, whole = sources["parquet"], sorted([c for _, c in EXPECTED_TRAIN] * 2)
    first, loaders = run_layout(cfg, tokenizer, 1, 2, batches=3, epochs=2, batch_size=2)
    second, loaders = run_layout(cfg, tokenizer, 1, 0, state=gathered_state(loaders), batches=2, epochs=2,
                                 batch_size=2)
    third, _ = run_layout(cfg, tokenizer, 1, 3, state=gathered_state(loaders), epochs=2, batch_size=2)
    assert sorted(first + second + third) == whole
    assert len(first) == 6 and len(second) == 4  # the third starts inside epoch 0, carrying both before it


def test_a_stream_refuses_another_layout_naming_both(sources, tokenizer):
    cfg = with_(sources["parquet"], streaming=True)
    state = loader_for(cfg, tokenizer, num_workers=2).state_dict()
    with pytest.raises(DataError, match=r"1 process x 2 workers, now 1 process x 1 worker.*data.num_workers=2"):
        loader_for(cfg, tokenizer, num_workers=0).load_state_dict(state)


DISTRIBUTED_SCRIPT = """
import json, sys
import torch.distributed as dist
from med_train.config import DataConfig
from med_train.data import build_dataloader
from med_train.tokenizer import train_tokenizer

dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = DataConfig(source=sys.argv[1], streaming=True, shuffle_buffer=4, cache_dir=sys.argv[3])
tok = train_tokenizer(["a picture number 1"], vocab_size=100)
def loader():
    return build_dataloader(cfg, "train", train=True, batch_size=2, image_size=8,
                            tokenizer=tok, max_length=16, seed=3, epochs=1, num_workers=2, num_processes=2,
                            process_index=rank)
first = loader()
head = [i for _, b in zip(range(1), first) for i in b["ids"]]
state = first.state_dict()  # a collective: every process calls it
resumed = loader()
resumed.load_state_dict(state)
tail = [i for b in resumed for i in b["ids"]]
with open(f"{sys.argv[2]}/rank{rank}.json", "w") as f:
    json.dump({"head": head, "tail": tail, "ranks": len(state["ranks"])}, f)
dist.destroy_process_group()
"""


def test_torchrun_two_processes_see_every_row_once_and_resume(sources, tmp_path):
    """Real processes (torchrun + gloo, about 12 s): 3 shards for 2 x 2 slots, and a gathered checkpoint."""
    script = tmp_path / "shard_check.py"
    script.write_text(textwrap.dedent(DISTRIBUTED_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), sources["webdataset"].source, str(tmp_path), sources["webdataset"].cache_dir],
                   check=True, env=env, timeout=300, capture_output=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["ranks"] == 2 for r in results)  # the state holds both processes' positions
    seen = [i for r in results for i in r["head"] + r["tail"]]
    assert sorted(seen) == sorted(i for i, _ in EXPECTED_TRAIN)


# ---- text -----------------------------------------------------------------------------------------------------------

def test_clean_caption_like_blip():
    assert clean_caption('  A Dog (left) runs!!  "fast"; #1: ok.  ', 30) == "a dog left runs fast 1 ok"
    assert clean_caption("one two three four", 2) == "one two"
    assert clean_caption("a red/blue ball, isn't it?", 30) == "a red blue ball, isn't it"
    assert clean_captions(["x!", "", None, "  ...  ", "Y"], 30) == ["x", "y"]
    with pytest.raises(Exception, match="empty") as empty:
        clean_captions(" ... ", 30)
    assert empty.value.reason == "caption_empty"
    with pytest.raises(Exception) as number:
        clean_captions(42, 30)
    assert number.value.reason == "caption_not_string"


def test_collate_masks_prompt_and_pads_and_keeps_sep(tokenizer):
    prompt = "a picture of "
    collate = make_collate(tokenizer, prompt, max_length=12)
    image = torch.zeros(3, 4, 4)
    batch = collate([{"image": image, "caption": "red circle", "id": "a"},
                     {"image": image, "caption": "blue square above a small green triangle on the left",
                      "id": "b"}])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert batch["images"].shape == (2, 3, 4, 4) and batch["ids"] == ["a", "b"]
    assert ids.shape == (2, 12)  # the long caption is truncated at max_length
    assert (ids[:, 0] == tokenizer.bos_token_id).all()  # [DEC] replaces [CLS]
    n_prompt = prompt_length(tokenizer, prompt)
    assert n_prompt == 4 and (labels[:, :n_prompt] == -100).all()
    short = int(mask[0].sum())
    assert ids[0, short - 1] == tokenizer.sep_token_id and labels[0, short - 1] == tokenizer.sep_token_id
    assert (labels[0, short:] == -100).all() and (ids[0, short:] == tokenizer.pad_token_id).all()
    assert ids[1, -1] == tokenizer.sep_token_id and labels[1, -1] == tokenizer.sep_token_id  # [SEP] kept
    assert torch.equal(labels[0, n_prompt:short], ids[0, n_prompt:short])


# ---- images ---------------------------------------------------------------------------------------------------------

def rgb_of(image: Image.Image) -> tuple[int, int, int]:
    out = to_rgb(image)
    assert out.mode == "RGB"
    return out.getpixel((0, 0))


def test_every_mode_becomes_the_right_rgb():
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0
    assert rgb_of(Image.new("L", (2, 2), 128)) == (128, 128, 128)
    assert rgb_of(Image.new("LA", (2, 2), (0, 0))) == (255, 255, 255)  # transparent black: white
    assert rgb_of(Image.new("LA", (2, 2), (0, 255))) == (0, 0, 0)
    assert rgb_of(palette) == (255, 255, 255) and to_rgb(palette).getpixel((1, 1)) == (255, 0, 0)
    assert rgb_of(Image.new("RGBA", (2, 2), (255, 0, 0, 0))) == (255, 255, 255)
    assert rgb_of(Image.new("RGBA", (2, 2), (0, 0, 255, 255))) == (0, 0, 255)
    assert rgb_of(Image.new("RGBA", (2, 2), (255, 0, 0, 128))) == pytest.approx((255, 127, 127), abs=1)
    assert rgb_of(Image.new("CMYK", (2, 2), (0, 255, 255, 0))) == (255, 0, 0)
    assert rgb_of(Image.new("I;16", (2, 2), 65535)) == (255, 255, 255)
    assert rgb_of(Image.new("I;16", (2, 2), 32896)) == (128, 128, 128)  # 16-bit scaled, not clipped to white
    assert rgb_of(Image.new("I", (2, 2), 65535)) == (255, 255, 255)
    assert rgb_of(Image.new("I", (2, 2), 100)) == (100, 100, 100)  # 8-bit values stored as 32-bit
    assert rgb_of(Image.new("F", (2, 2), 0.5)) == (128, 128, 128)  # floats in 0..1
    assert rgb_of(Image.new("1", (2, 2), 1)) == (255, 255, 255)


def test_load_image_from_files_bytes_and_cells(tmp_path):
    for mode, value, fmt in (("I;16", 65535, "PNG"), ("CMYK", (0, 255, 255, 0), "TIFF"), ("LA", (0, 0), "PNG")):
        buffer = io.BytesIO()
        Image.new(mode, (3, 3), value).save(buffer, fmt)
        assert load_image(buffer.getvalue()).getpixel((1, 1)) in ((255, 255, 255), (255, 0, 0))
    wide = Image.new("RGB", (2, 1), (255, 0, 0))
    wide.putpixel((1, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    wide.save(tmp_path / "rotated.png", exif=exif)
    upright = load_image(str(tmp_path / "rotated.png"))
    assert upright.size == (1, 2) and upright.getpixel((0, 0)) == (255, 0, 0)
    assert load_image({"bytes": None, "path": str(tmp_path / "rotated.png")}).size == (1, 2)
    with pytest.raises(BadImage, match="nope.png") as missing:
        load_image(str(tmp_path / "nope.png"))
    assert missing.value.reason == "image_missing"
    (tmp_path / "cut.png").write_bytes(png(1, size=64)[:70])
    with pytest.raises(BadImage, match="cut.png") as cut:
        load_image(tmp_path / "cut.png")
    assert cut.value.reason == "image_unreadable"
    with pytest.raises(BadImage, match="over the limit") as bomb:
        load_image(png(1, size=50), max_pixels=2000)
    assert bomb.value.reason == "image_too_large"


def test_transforms_give_uint8_pixels_and_the_model_normalises_them():
    from med_train.model import normalize_images

    image = Image.new("RGB", (40, 30), (255, 0, 51))
    mean, std = (0.5, 0.25, 0.5), (0.5, 0.25, 0.5)
    for train in (True, False):
        out = build_transform(train=train, image_size=16, randaugment=False)(image)
        assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
        assert out[:, 8, 8].tolist() == [255, 0, 51]
        # what torchvision's ToTensor + Normalize gave before: (x / 255 - mean) / std, in float32
        reference = T.Normalize(mean, std)(T.ToTensor()(image.resize((16, 16))))
        assert torch.equal(normalize_images(out[None], mean, std)[0], reference)
        assert normalize_images(reference, mean, std) is reference  # float input: normalised already
    augment = build_transform(train=True, image_size=16, randaugment=True, hflip=True)
    assert augment(image).shape == (3, 16, 16) and augment(image).dtype == torch.uint8
    from med_train.data import CaptionRandAugment

    ops = CaptionRandAugment()._augmentation_space(31, (16, 16))
    assert "Solarize" not in ops and "Color" not in ops and "Rotate" in ops
