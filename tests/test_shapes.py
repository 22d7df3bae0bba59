"""The shapes demo set: deterministic, balanced, pictures that match their metadata, and a content scorer that
reads its own captions back perfectly and catches wrong ones."""

from __future__ import annotations

import colorsys
import json
from collections import Counter
from itertools import combinations

import pytest
from PIL import Image
from typer.testing import CliRunner

from med_train import shapes
from med_train.cli import app
from med_train.config import DataConfig
from med_train.data import build_dataset
from med_train.shapes import (
    ATTRIBUTES,
    COLOURS,
    KINDS,
    POSITIONS,
    SIZES,
    generate,
    parse_caption,
    score_content,
)


def rows(folder, split) -> list[dict]:
    return [json.loads(line) for line in (folder / split / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("shapes"), train=240, val=10, test=20, seed=1)


def test_generation_is_deterministic(demo, tmp_path):
    generate(tmp_path / "again", train=250, val=12, test=25, seed=9)  # a bigger set first: rewriting removes its extras
    again = generate(tmp_path / "again", train=240, val=10, test=20, seed=1)
    assert len(list((again / "train").glob("*.png"))) == 240
    other = generate(tmp_path / "other", train=240, val=10, test=20, seed=2)
    for split in ("train", "val", "test"):
        assert rows(again, split) == rows(demo, split)
        assert rows(other, split) != rows(demo, split)
    assert (again / "train" / "000007.png").read_bytes() == (demo / "train" / "000007.png").read_bytes()


def test_layout_and_captions(demo):
    train, val, test = rows(demo, "train"), rows(demo, "val"), rows(demo, "test")
    assert len(train) == 240 and len(val) == 10 and len(test) == 20
    assert {r["id"] for r in val}.isdisjoint(r["id"] for r in test) and val[0]["objects"] != test[0]["objects"]
    for row in train + val + test:
        places = [o["position"] for o in row["objects"]]
        assert 1 <= len(places) <= 3 and len(set(places)) == len(places)
    assert all(isinstance(r["caption"], str) and "captions" not in r for r in train)
    for row in val + test:  # five different phrasings, each of at most 30 words (data.max_words)
        assert len(row["captions"]) == 5 and len(set(row["captions"])) == 5
        assert all(len(c.split()) <= 30 for c in row["captions"])
    for row in train:  # and a training image's five phrasings as its references (SCST), each of its objects
        assert len(set(row["references"])) == 5
        assert shapes.score_content(row["references"], [row["objects"]] * 5)["content_exact"] == 1.0


def test_every_attribute_value_is_about_equally_frequent(demo):
    objects = [o for r in rows(demo, "train") for o in r["objects"]]
    counts = Counter(len(r["objects"]) for r in rows(demo, "train"))
    assert set(counts) == {1, 2, 3} and max(counts.values()) - min(counts.values()) <= 1
    for attribute, values in (("kind", KINDS), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS)):
        seen = Counter(o[attribute] for o in objects)
        assert set(seen) == set(values)
        assert max(seen.values()) / min(seen.values()) < 1.1, (attribute, seen)
    first_named = Counter(parse_caption(r["caption"])[0]["position"] for r in rows(demo, "train"))
    assert max(first_named.values()) / min(first_named.values()) < 1.6  # named in random order, not by place


def test_pictures_show_their_objects(demo):
    for row in rows(demo, "train")[:60]:
        image = Image.open(demo / "train" / row["file_name"])
        assert image.mode == "RGB" and image.size == (96, 96)
        for obj in row["objects"]:
            x, y = shapes._ANCHOR[obj["position"]]
            pixel = image.getpixel((round(x * 96), round(y * 96)))
            assert all(abs(p - c) <= 16 for p, c in zip(pixel, COLOURS[obj["colour"]], strict=True)), (row, obj)
        empty = set(POSITIONS) - {o["position"] for o in row["objects"]}
        for place in empty:  # an empty place shows background: pale grey, not a shape colour
            x, y = shapes._ANCHOR[place]
            r, g, b = image.getpixel((round(x * 96), round(y * 96)))
            assert max(r, g, b) - min(r, g, b) < 60


def test_colours_are_what_they_are_called_and_far_apart():
    hues = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in COLOURS.items()}
    expected = {"red": (-15, 10), "orange": (20, 40), "yellow": (45, 65), "green": (100, 150),
                "blue": (210, 250), "purple": (270, 300)}
    for name, (low, high) in expected.items():
        hue = hues[name] - 360 if hues[name] > 345 else hues[name]
        assert low <= hue <= high, (name, hue)
    for a, b in combinations(COLOURS.values(), 2):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) >= 80


def test_places_are_far_enough_apart_that_shapes_never_overlap():
    reach = max(shapes._RADIUS.values()) + shapes._JITTER
    for a, b in combinations(POSITIONS, 2):
        (ax, ay), (bx, by) = shapes._ANCHOR[a], shapes._ANCHOR[b]
        assert max(abs(ax - bx), abs(ay - by)) > 2 * reach, (a, b)
    assert all(reach <= min(x, y, 1 - x, 1 - y) for x, y in shapes._ANCHOR.values())  # inside the picture


def test_the_scorer_reads_every_phrasing_back(demo):
    test = rows(demo, "test")
    for k in range(5):
        scores = score_content([r["captions"][k] for r in test], [r["objects"] for r in test])
        assert scores == {name: 1.0 for name in scores}, k
    train = rows(demo, "train")
    assert score_content([r["caption"] for r in train], [r["objects"] for r in train])["content_exact"] == 1.0


def test_the_scorer_catches_wrong_captions():
    truth = [[{"kind": "triangle", "colour": "red", "size": "small", "position": "top left"},
              {"kind": "circle", "colour": "blue", "size": "large", "position": "centre"}]]
    right = "a large blue circle in the middle and a small red triangle at the top left"
    assert score_content([right], truth)["content_exact"] == 1.0
    wrong_colour = score_content(["a small green triangle in the top left and a large blue circle in the centre"],
                                 truth)
    assert wrong_colour["content_colour"] == 0.5 and wrong_colour["content_exact"] == 0.0
    assert wrong_colour["content_shape"] == wrong_colour["content_position"] == 1.0
    swapped_places = score_content(["a small red triangle in the centre and a large blue circle in the top left"],
                                   truth)
    assert swapped_places["content_position"] == 0.0 and swapped_places["content_shape"] == 1.0
    one_missing = score_content(["a small red triangle in the top left"], truth)
    assert one_missing["content_count"] == 0.0 and one_missing["content_shape"] == 0.5
    extra = score_content([right + " and a small red star in the lower right"], truth)
    assert extra["content_count"] == 0.0 and extra["content_shape"] == pytest.approx(2 / 3)
    nothing = score_content(["a picture of something"], truth)
    assert all(v == 0.0 for v in nothing.values())
    assert parse_caption("a big circle at the top")[0] == {"kind": "circle", "colour": None, "size": "large",
                                                            "position": None}
    with pytest.raises(ValueError):
        score_content(["a"], [])


def test_shapes_command_writes_a_set_the_data_layer_reads(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["data", "shapes", str(out), "--train", "6", "--val", "2", "--test", "3",
                                      "--seed", "5"])
    assert result.exit_code == 0, result.output
    cfg = DataConfig(source=str(out), cache_dir=str(tmp_path / "cache"))
    for split, n in (("val", 2), ("test", 3)):
        held_out = list(build_dataset(cfg, split, train=False, image_size=32))
        assert len(held_out) == n and all(len(e["references"]) == 5 for e in held_out)
        assert all(set(e["objects"][0]) == set(ATTRIBUTES) for e in held_out)
    train = list(build_dataset(cfg, "train", train=True, image_size=32))
    assert len(train) == 6 and train[0]["image"].shape == (3, 32, 32)
