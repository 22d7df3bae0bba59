"""Bad and odd input: images of every kind through `med caption`, and property tests of text handling."""

import io
import json

import numpy as np
import pytest
import torch
from conftest import WORDS, tiny_model_config
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from med_train.cli import app
from med_train.model import Captioner
from med_train.sources import clean_caption
from med_train.tokenizer import encode_captions

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    Captioner(tiny_model_config(), tokenizer).save_pretrained(out)
    return out


def _odd_images(folder):
    """One file per fault or odd mode; returns (good, bad) path lists."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    good = {
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "gray16.png": Image.fromarray((rng.integers(0, 65535, (40, 50))).astype(np.uint16)),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "rgba.png": Image.fromarray(np.dstack([rgb, rng.integers(0, 255, (40, 50), dtype=np.uint8)]), "RGBA"),
        "gray_alpha.png": Image.fromarray(rgb).convert("LA"),
    }
    paths = []
    for name, image in good.items():
        image.save(folder / name)
        paths.append(folder / name)
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees
    rotated.save(folder / "exif_rotated.jpg", exif=exif)
    paths.append(folder / "exif_rotated.jpg")

    (folder / "empty.png").write_bytes(b"")
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "notes.png").write_text("this is not an image")
    Image.new("L", (12_000, 10_000)).save(folder / "bomb.png")  # 120 MP: over the 89 MP limit
    bad = [folder / n for n in ("missing.jpg", "empty.png", "truncated.png", "notes.png", "bomb.png")]
    return paths, bad


def test_caption_handles_every_bad_and_odd_image(model_dir, tmp_path):
    good, bad = _odd_images(tmp_path)
    result = runner.invoke(app, ["caption", *map(str, good + bad), "--model", str(model_dir), "--json",
                                 "--beams", "1"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    rows = json.loads(result.stdout)  # one document: every file in input order, the bad ones with their error
    assert [r["image"] for r in rows] == [str(p) for p in good + bad]
    assert [r["caption"] is not None for r in rows] == [True] * len(good) + [False] * len(bad)
    assert [r["error"] is None for r in rows] == [True] * len(good) + [False] * len(bad)
    errors = result.stderr.strip().splitlines()
    assert len(errors) == len(bad)
    for path, line in zip(bad, errors, strict=True):
        assert line.startswith(f"error: {path}")
    assert "no such image file" in errors[0]
    assert "over the limit" in errors[-1]


def test_odd_modes_become_the_right_rgb(tmp_path):
    from med_train.sources import load_image

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # composited on white
    tall = Image.new("RGB", (10, 20))
    exif = tall.getexif()
    exif[0x0112] = 6
    tall.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 10)


punctuation = st.sampled_from(list(".!\"()*#:;~,?'-/") + [" ", "  ", "\n", "\t"])
text = st.lists(st.one_of(st.sampled_from(WORDS + ["Red", "BLUE", "Dog's"]), punctuation), max_size=60).map("".join)


@settings(max_examples=200, deadline=None)
@given(text, st.integers(1, 40))
def test_caption_cleaning_properties(raw, max_words):
    cleaned = clean_caption(raw, max_words)
    assert cleaned == cleaned.lower().strip()
    assert "  " not in cleaned and "\n" not in cleaned
    assert len(cleaned.split()) <= max_words
    assert not set(cleaned) & set(".!\"()*#:;~")
    assert clean_caption(cleaned, max_words) == cleaned  # idempotent


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12))
def test_tokenisation_round_trip(tokenizer, words):
    caption = " ".join(words)
    batch = encode_captions(tokenizer, [caption], "a picture of ", max_length=40)
    ids = batch["input_ids"][0]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids[4:], skip_special_tokens=True) == caption
    labels = batch["labels"][0]
    assert (labels[:4] == -100).all() and labels[-1] == tokenizer.sep_token_id
    assert torch.equal(labels[4:], ids[4:])
