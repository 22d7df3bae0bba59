"""The shapes demo set: 1-3 coloured shapes at five places, captions that say what and where, a content scorer.

    generate("data/shapes", train=5000, val=200, test=200, seed=0)   # or: med data shapes data/shapes
    score_content(["a small red circle in the centre"],
                  [[{"kind": "circle", "colour": "red", "size": "small", "position": "centre"}]])
    # -> {"content_colour": 1.0, "content_shape": 1.0, ..., "content_exact": 1.0}

Layout (imagefolder): OUT/train/metadata.jsonl has one `caption` per image (what cross-entropy training reads), and
its five phrasings as `references` (what self-critical training scores against: configs/shapes_scst.yaml);
OUT/val/ (what training validates on) and OUT/test/ (what `med eval` reports) a `captions` list with the five
phrasings; every row has `id` and
`objects` (its true content: kind, colour, size, position). Each split draws from its own seeded generator, so
adding or resizing one split leaves the others' files as they were.

Designed to be learnable by a small ViT at 64-96 px: shapes are large, flat-coloured and upright; the five places
(the four corners and the centre) are far apart and objects never overlap; backgrounds are pale, low-saturation
greys with gradients, so every shape colour stands out. Counts, places, kinds, colours and sizes are each drawn
from a shuffled deck, so every value is about equally frequent and no caption habit predicts the content; objects
are named in random order. Train with `data.crop_scale_min` near 1 and no flip: a crop moves the corners.

BLEU and CIDEr flatter templated captions, so `score_content` parses generated captions back into objects and
scores them against the truth: per-attribute accuracy after the best matching of named to true objects (missing
and extra objects count as wrong), count accuracy, and exact content (every object of the image right).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from pathlib import Path

from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "star", "cross")
COLOURS = {"red": (215, 35, 35), "orange": (250, 125, 15), "yellow": (235, 215, 30), "green": (35, 155, 55),
           "blue": (35, 75, 215), "purple": (135, 45, 175)}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
ATTRIBUTES = ("kind", "colour", "size", "position")

# Geometry as fractions of the image side: corner anchors at 0.21 / 0.79, the centre at 0.5. With the largest
# radius and jitter a corner shape ends at 0.21 + 0.015 + 0.12 = 0.345 and a centre one starts at 0.365: no overlap.
_ANCHOR = {"top left": (0.21, 0.21), "top right": (0.79, 0.21), "bottom left": (0.21, 0.79),
           "bottom right": (0.79, 0.79), "centre": (0.5, 0.5)}
_RADIUS = {"small": 0.08, "large": 0.12}
_JITTER = 0.015
_SUPERSAMPLE = 4  # shapes are drawn 4x larger and scaled down, for smooth edges

# Five phrasings: (place words, size words, prefix), each object said as "a <size> <colour> <kind> <place>". At most
# 27 words and 34 tokens with the prompt for three objects: within data.max_words (30) and tokenizer.max_length (40).
_PLACE_WORDS = {
    "in": {"top left": "in the top left", "top right": "in the top right", "bottom left": "in the bottom left",
           "bottom right": "in the bottom right", "centre": "in the centre"},
    "at": {"top left": "at the top left", "top right": "at the top right", "bottom left": "at the bottom left",
           "bottom right": "at the bottom right", "centre": "in the middle"},
    "upper": {"top left": "in the upper left", "top right": "in the upper right", "bottom left": "in the lower left",
              "bottom right": "in the lower right", "centre": "in the center"},
}
_PLAIN, _CASUAL = {"small": "small", "large": "large"}, {"small": "little", "large": "big"}
PHRASINGS = (
    (_PLACE_WORDS["in"], _PLAIN, ""),              # a small red triangle in the top left and a large ...
    (_PLACE_WORDS["at"], _CASUAL, ""),             # a little red triangle at the top left and a big ... in the middle
    (_PLACE_WORDS["upper"], _PLAIN, "there is "),  # there is a small red triangle in the upper left, a large ...
    (_PLACE_WORDS["in"], _PLAIN, "{count}, "),     # two shapes, a small red triangle in the top left and ...
    (_PLACE_WORDS["upper"], _CASUAL, ""),          # a little red triangle in the lower right and a big ...
)
_COUNT_WORDS = {1: "one shape", 2: "two shapes", 3: "three shapes"}


# ---- generation -----------------------------------------------------------------------------------------------------

class _Deck:
    """Draws values so that each is about equally frequent: a shuffled copy of all values, refilled when empty."""

    def __init__(self, values, rng: random.Random) -> None:
        self.values, self.rng, self.cards = list(values), rng, []

    def draw(self, exclude=()):
        while True:
            for i, card in enumerate(self.cards):
                if card not in exclude:
                    return self.cards.pop(i)
            self.cards += self.rng.sample(self.values, len(self.values))


def sample_objects(count: int, decks: dict[str, _Deck]) -> list[dict]:
    """`count` objects at different places, in POSITIONS order."""
    places: list[str] = []
    for _ in range(count):
        places.append(decks["position"].draw(exclude=places))
    objects = [{"kind": decks["kind"].draw(), "colour": decks["colour"].draw(), "size": decks["size"].draw(),
                "position": place} for place in places]
    return sorted(objects, key=lambda o: POSITIONS.index(o["position"]))


def caption(objects: list[dict], phrasing: int, rng: random.Random) -> str:
    """One phrasing of the objects, named in random order."""
    places, sizes, prefix = PHRASINGS[phrasing]
    order = rng.sample(objects, len(objects))
    parts = [f"a {sizes[o['size']]} {o['colour']} {o['kind']} {places[o['position']]}" for o in order]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return prefix.format(count=_COUNT_WORDS[len(objects)]) + text


def draw(objects: list[dict], size: int, rng: random.Random) -> Image.Image:
    """An RGB image of the objects on a pale, nearly grey background (flat, or a horizontal or vertical gradient).

    Drawn at 4x the size and box-filtered down, for smooth edges."""
    grey, shift = rng.randint(150, 215), rng.randint(-30, 30)
    base = tuple(grey + rng.randint(-10, 10) for _ in range(3))
    other = tuple(min(255, max(0, c + shift + rng.randint(-6, 6))) for c in base)
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), base)
    gradient = rng.choice(("flat", "horizontal", "vertical"))
    if gradient != "flat":
        ramp = Image.linear_gradient("L").resize((big, big))  # 0 at the top, 255 at the bottom
        ramp = ramp if gradient == "vertical" else ramp.transpose(Image.Transpose.ROTATE_90)
        image = Image.composite(Image.new("RGB", (big, big), other), image, ramp)
    pen = ImageDraw.Draw(image)
    for obj in objects:
        ax, ay = _ANCHOR[obj["position"]]
        cx = (ax + rng.uniform(-_JITTER, _JITTER)) * big
        cy = (ay + rng.uniform(-_JITTER, _JITTER)) * big
        r = _RADIUS[obj["size"]] * rng.uniform(0.93, 1.0) * big
        colour = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLOURS[obj["colour"]])
        _draw_shape(pen, obj["kind"], cx, cy, r, colour)
    return image.resize((size, size), Image.Resampling.BOX)


def _draw_shape(pen: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, colour: tuple) -> None:
    """An upright shape filling most of the box of half-side r around (cx, cy)."""
    if kind == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        pen.rectangle([cx - 0.82 * r, cy - 0.82 * r, cx + 0.82 * r, cy + 0.82 * r], fill=colour)
    elif kind == "triangle":  # apex up; the box is filled top to bottom
        pen.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=colour)
    elif kind == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else 0.45 * r
            angle = -90 + 36 * i
            points.append((cx + radius * math.cos(math.radians(angle)), cy + radius * math.sin(math.radians(angle))))
        pen.polygon(points, fill=colour)
    elif kind == "cross":
        arm = 0.38 * r
        pen.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=colour)
        pen.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=colour)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def generate(out: str | Path, *, train: int = 5000, val: int = 200, test: int = 200, seed: int = 0,
             image_size: int = 96) -> Path:
    """Write the demo set to `out` (imagefolder layout, see the module docstring); returns `out`. `val=0` writes
    no validation split (training then holds out some training images: data.val_holdout)."""
    out = Path(out)
    for split, n in (("train", train), ("val", val), ("test", test)):
        if n == 0:
            continue
        rng = random.Random(f"shapes:{seed}:{split}")  # a string seed is stable across Python runs
        decks = {name: _Deck(values, rng) for name, values in
                 (("count", (1, 2, 3)), ("position", POSITIONS), ("kind", KINDS), ("colour", tuple(COLOURS)),
                  ("size", SIZES))}
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):  # a larger earlier set's leftovers
            old.unlink()
        with open(folder / "metadata.jsonl", "w") as metadata:
            for i in range(n):
                objects = sample_objects(decks["count"].draw(), decks)
                name = f"{i:06d}.png"
                draw(objects, image_size, rng).save(folder / name)
                row = {"file_name": name, "id": f"{split}/{i:06d}"}
                if split == "train":
                    row["caption"] = caption(objects, rng.randrange(len(PHRASINGS)), rng)
                    # every phrasing too, for training that scores samples against all of them (SCST); from a
                    # generator of the image's own, so that the split's other draws stay as they were
                    own = random.Random(f"shapes:{seed}:{split}:{i}")
                    row["references"] = [caption(objects, k, own) for k in range(len(PHRASINGS))]
                else:
                    row["captions"] = [caption(objects, k, rng) for k in range(len(PHRASINGS))]
                row["objects"] = objects
                metadata.write(json.dumps(row) + "\n")
    return out


# ---- scoring --------------------------------------------------------------------------------------------------------

_KIND_WORDS = {k: k for k in KINDS} | {k + "s": k for k in KINDS if k != "cross"} | {"crosses": "cross"}
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_COLOUR_WORDS = {c: c for c in COLOURS} | {"violet": "purple"}


def parse_caption(text: str) -> list[dict]:
    """The objects a caption names: each kind word takes the size and colour words just before it and the place
    named in its clause (clauses split at commas and "and"). Unknown attributes are None."""
    objects = []
    for clause in re.split(r",|\band\b|;", text.lower()):
        words = re.findall(r"[a-z]+", clause)
        place = _place(words)
        start = 0
        for i, word in enumerate(words):
            if word in _KIND_WORDS:
                before = words[start:i]
                objects.append({"kind": _KIND_WORDS[word],
                                "colour": next((_COLOUR_WORDS[w] for w in reversed(before) if w in _COLOUR_WORDS),
                                               None),
                                "size": next((_SIZE_WORDS[w] for w in reversed(before) if w in _SIZE_WORDS), None),
                                "position": place})
                start = i + 1
    return objects


def _place(words: list[str]) -> str | None:
    found = set(words)
    vertical = "top" if found & {"top", "upper"} else "bottom" if found & {"bottom", "lower"} else None
    side = "left" if "left" in found else "right" if "right" in found else None
    if vertical and side:
        return f"{vertical} {side}"
    return "centre" if found & {"centre", "center", "middle"} else None


def score_content(captions: list[str], objects: list[list[dict]]) -> dict[str, float]:
    """Content accuracy of generated captions against the true objects of each image.

    content_colour / _shape / _size / _position: per object, after the matching of named to true objects that
    agrees on most attributes; the denominator is max(named, true) per image, so missing and extra objects count
    as wrong. content_count: images with the right number of objects. content_exact: images whose named objects
    are exactly the true ones."""
    if len(captions) != len(objects):
        raise ValueError(f"{len(captions)} captions for {len(objects)} images")
    right = dict.fromkeys(ATTRIBUTES, 0)
    slots = counts = exact = 0
    for text, truth in zip(captions, objects, strict=True):
        named = parse_caption(text)[:8]  # a runaway caption: cap the matching cost
        truth = [{a: o[a] for a in ATTRIBUTES} for o in truth]
        slots += max(len(named), len(truth))
        counts += len(named) == len(truth)
        exact += sorted(map(_as_tuple, named), key=str) == sorted(map(_as_tuple, truth), key=str)
        for a, n in _best_match(named, truth).items():
            right[a] += n
    total = max(1, slots)
    return {"content_colour": right["colour"] / total, "content_shape": right["kind"] / total,
            "content_size": right["size"] / total, "content_position": right["position"] / total,
            "content_count": counts / max(1, len(captions)), "content_exact": exact / max(1, len(captions))}


def _as_tuple(obj: dict) -> tuple:
    return tuple(obj[a] for a in ATTRIBUTES)


def _best_match(named: list[dict], truth: list[dict]) -> dict[str, int]:
    """Attribute agreements of the pairing of named and true objects with the most agreements."""
    best = dict.fromkeys(ATTRIBUTES, 0)
    small, large = (named, truth) if len(named) <= len(truth) else (truth, named)
    for chosen in itertools.permutations(large, len(small)):
        agree = {a: sum(x[a] == y[a] for x, y in zip(small, chosen, strict=True)) for a in ATTRIBUTES}
        if sum(agree.values()) > sum(best.values()):
            best = agree
    return best
