"""Image-caption sources: from a hub id, a folder or an annotation file to checked rows and RGB images.

Every source goes through `datasets.load_dataset`, streamed or not, so a hub dataset and a local folder take the
same path. Image columns are read undecoded (`Image(decode=False)`) so that a broken image is a counted bad row
here rather than an exception inside `datasets`. Likewise an annotation file (metadata.jsonl|csv, a .jsonl list)
with lines `datasets` cannot read is read through a cleaned copy whose bad lines are counted bad rows named
`FILE:LINE` (med_train.metadata), a .json list's bad entries too, named `FILE[INDEX]` (one cut short is a DataError
naming where), and a split with no caption column is one DataError naming its columns.

    table = open_split(cfg, "train")                  # datasets.Dataset, or IterableDataset if cfg.streaming
    for label, raw in iter_table(table, "train"):
        row = parse_row(raw, cfg, label, image_root(cfg))   # Row(id, image, caption cell, objects, image_id)
        captions = clean_captions(row.captions, 30)   # raises BadRow("caption_empty" | "caption_not_string")
        image = load_image(row.image)                 # RGB, EXIF-rotated; raises BadImage naming the file
    clean_caption("A dog (left) runs!", 30)           # -> "a dog left runs"

Supported layouts (`data.format: auto` guesses from the path):
- hub: `load_dataset(source, config_name, split=...)`.
- imagefolder: `source/<split>/` (or `source/` with split-named files) holding images + `metadata.jsonl|csv`.
- blip_json: a BLIP/Karpathy annotation list `[{"image": relative path, "caption": str | [str], ...}]`;
  `source` may contain `{split}` (e.g. `ann/coco_karpathy_{split}.json`); paths are relative to `image_root`
  (default: the JSON's folder).
- webdataset: `.tar` shards with `<key>.jpg|png` + `<key>.txt|json`; parquet: image bytes + caption columns.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from med_train.config import DataConfig
from med_train.metadata import BAD_LINE, readable_copies

IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")  # tried in order when `image_column` is absent
CAPTION_COLUMNS = ("caption", "captions", "text", "txt", "sentences")
ID_COLUMNS = ("id", "image_id", "__key__")
_METADATA = ("metadata.jsonl", "metadata.csv")  # an image folder's annotations (datasets also reads .parquet)
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_PUNCTUATION = re.compile(r"[.!?\"()\[\]{}*#:;~`_<>|\\/]")  # BLIP's pre_caption set plus brackets and slashes


class DataError(ValueError):
    """A source that cannot be read, or is mostly bad. The message names the source."""


class BadRow(ValueError):
    """One unusable row: `reason` is a short key counted in BadRowStats, the message says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class BadImage(BadRow):
    """An image that is missing, unreadable, truncated or too large; the message names the file."""


# ---- bad-row accounting ---------------------------------------------------------------------------------------------

@dataclass
class BadRowStats:
    """Rows read and rows skipped by reason, with the first few (row id, reason, detail) kept as examples.

    Dataloader workers and processes each keep their own; `merge` adds them up."""

    rows: int = 0
    bad_reasons: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)
    max_examples: int = 20

    @property
    def bad(self) -> int:
        return sum(self.bad_reasons.values())

    @property
    def ok(self) -> int:
        return self.rows - self.bad

    def add_bad(self, row_id: str, reason: str, detail: str = "") -> None:
        """Count a bad row (it must also have been counted in `rows`)."""
        self.bad_reasons[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append({"id": row_id, "reason": reason, "detail": detail})

    def merge(self, other: BadRowStats | dict) -> None:
        other = BadRowStats.from_dict(other) if isinstance(other, dict) else other
        self.rows += other.rows
        self.bad_reasons.update(other.bad_reasons)
        self.examples.extend(other.examples[: max(0, self.max_examples - len(self.examples))])

    def to_dict(self) -> dict:
        return {"rows": self.rows, "ok": self.ok, "bad": self.bad, "bad_reasons": dict(self.bad_reasons),
                "examples": list(self.examples)}

    @classmethod
    def from_dict(cls, data: dict) -> BadRowStats:
        return cls(rows=data["rows"], bad_reasons=Counter(data["bad_reasons"]), examples=list(data["examples"]))

    def summary(self) -> str:
        """One line, e.g. `120 rows: 117 ok, 3 bad (image_missing 2, caption_empty 1); first: train:7 image_missing`."""
        text = f"{self.rows} rows: {self.ok} ok, {self.bad} bad"
        if self.bad:
            reasons = ", ".join(f"{reason} {n}" for reason, n in self.bad_reasons.most_common())
            first = "; ".join(f"{e['id']} {e['reason']}" for e in self.examples[:3])
            text += f" ({reasons}); first: {first}"
        return text

    def check(self, source: str, max_bad_fraction: float) -> None:
        """Raise DataError when more than `max_bad_fraction` of the rows seen are bad."""
        if self.rows and self.bad > max_bad_fraction * self.rows:
            raise DataError(f"data source {source!r} is mostly bad: {self.summary()} "
                            f"(data.max_bad_fraction is {max_bad_fraction})")


# ---- captions -------------------------------------------------------------------------------------------------------

def clean_caption(text: str, max_words: int | None) -> str:
    """BLIP's `pre_caption`: lower-case, punctuation to spaces, whitespace collapsed, at most `max_words` words."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])


@dataclass(frozen=True)
class Unreadable:
    """The caption cell of a row made from an annotation line that could not be read: clean_captions raises."""

    reason: str
    detail: str


def clean_captions(cell: Any, max_words: int | None) -> list[str]:
    """The usable cleaned captions of a cell (a string or a list of strings); BadRow if there are none."""
    if isinstance(cell, Unreadable):
        raise BadRow(cell.reason, cell.detail)
    items = list(cell) if isinstance(cell, list | tuple) else [cell]
    texts = [clean_caption(c, max_words) for c in items if isinstance(c, str)]
    texts = [t for t in texts if t]
    if texts:
        return texts
    if any(isinstance(c, str) for c in items):
        raise BadRow("caption_empty", "the caption is empty after cleaning")
    raise BadRow("caption_not_string", f"the caption is {type(cell).__name__} {str(cell)[:40]!r}, not text")


# ---- images ---------------------------------------------------------------------------------------------------------

def load_image(source: Any, *, max_pixels: int | None = None) -> Image.Image:
    """An RGB PIL image, EXIF orientation applied, from a path, bytes, a `{"bytes", "path"}` cell or a PIL image.

    Raises BadImage (reason image_missing | image_unreadable | image_too_large) with a message naming the file."""
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source))
    data, path = _bytes_and_path(source)
    name = path or f"<{len(data) if data is not None else 0} bytes>"
    if data is None:
        if not path or not Path(path).is_file():
            raise BadImage("image_missing", f"{name}: no such image file")
        data = Path(path).read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides below
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # read from the header, before decoding any pixel
            if max_pixels is not None and width * height > max_pixels:
                raise BadImage("image_too_large", f"{name}: {width}x{height} pixels is over the limit of "
                                                  f"{max_pixels} (a decompression bomb?)")
            image.load()
    except Image.DecompressionBombError as exc:
        raise BadImage("image_too_large", f"{name}: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # unidentified, truncated or corrupt data
        if isinstance(exc, BadImage):
            raise
        raise BadImage("image_unreadable", f"{name}: {exc}") from None
    try:
        return to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError) as exc:
        raise BadImage("image_unreadable", f"{name}: cannot convert mode {image.mode} to RGB ({exc})") from None


def _bytes_and_path(source: Any) -> tuple[bytes | None, str | None]:
    if isinstance(source, dict):
        return source.get("bytes"), source.get("path")
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), None
    if isinstance(source, str | Path):
        return None, str(source)
    raise BadImage("image_unreadable", f"the image cell is {type(source).__name__}, not a path, bytes or image")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency composited on white, 16-bit and float greyscale rescaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        # convert("L") would clip 16-bit and 0..1 float data to white or black, so rescale by hand.
        pixels = np.asarray(image).astype(np.float64)
        if mode == "F":
            finite = pixels[np.isfinite(pixels)]
            scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0  # floats in 0..1, else in 0..255
        else:
            scale = 255.0 / 65535.0 if mode.startswith("I;16") or pixels.max() > 255 else 1.0
        grey = np.clip(np.nan_to_num(pixels * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image.convert("RGB"), mask=image.getchannel("A"))
        return white
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, RGB from P


# ---- opening a split ------------------------------------------------------------------------------------------------

def detect_format(cfg: DataConfig) -> str:
    """`cfg.format`, or a guess from the source: a .json file, a folder of .tar or .parquet files, an image folder,
    and otherwise a hub dataset id."""
    if cfg.format != "auto":
        return cfg.format
    path = Path(cfg.source.replace("{split}", cfg.train_split))
    if path.is_file():
        return {".json": "blip_json", ".jsonl": "blip_json", ".tar": "webdataset"}.get(path.suffix, "parquet")
    if path.is_dir():
        suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
        return "webdataset" if ".tar" in suffixes else "parquet" if ".parquet" in suffixes else "imagefolder"
    return "hub"


def open_split(cfg: DataConfig, split: str):
    """One split as a `datasets.Dataset` (or `IterableDataset` when `cfg.streaming`), images left undecoded."""
    import datasets

    fmt = detect_format(cfg)
    if fmt == "hub" and cfg.source.startswith(("/", ".", "~")) and not Path(cfg.source).exists():
        raise DataError(f"data source {cfg.source!r}: no such file or folder")
    kwargs = dict(streaming=cfg.streaming, cache_dir=cfg.cache_dir)
    try:
        if fmt == "hub":
            table = datasets.load_dataset(cfg.source, cfg.config_name, split=split, **kwargs)
        elif fmt == "blip_json":
            files = [cfg.source.replace("{split}", split)]
            copies = readable_copies(files, cfg, imagefolder=False) if Path(files[0]).is_file() else None
            table = datasets.load_dataset("json", data_files=copies or files, split="train", **kwargs)
        else:
            root = Path(cfg.source)
            if (root / split).is_dir():  # one folder per split: splits may have different columns
                files = [str(p) for p in sorted((root / split).rglob("*")) if _belongs(p, fmt)]
                table = _read_cleaned(fmt, files, cfg, kwargs)
                if table is None:
                    table = datasets.load_dataset(fmt, data_files={"train": files}, split="train", **kwargs)
            elif root.is_file():
                table = datasets.load_dataset(fmt, data_files={"train": [str(root)]}, split="train", **kwargs)
            else:  # split-named files (train-00000.tar), found by datasets' own patterns; this split's only,
                # because datasets would otherwise require every split to have the same columns
                from datasets.data_files import get_data_patterns, resolve_pattern

                patterns = {str(name): p for name, p in get_data_patterns(str(root)).items()}
                if split not in patterns:
                    raise DataError(f"data source {cfg.source!r} has no split {split!r} (found: "
                                    f"{', '.join(patterns) or 'none'})")
                files = [f for p in patterns[split] for f in resolve_pattern(p, base_path=str(root))
                         if Path(f).name in _METADATA] if fmt == "imagefolder" else []
                table = _read_cleaned(fmt, files, cfg, kwargs)
                if table is None:
                    table = datasets.load_dataset(fmt, data_dir=str(root), data_files={split: patterns[split]},
                                                  split=split, **kwargs)
    except DataError:
        raise
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"cannot open split {split!r} of data source {cfg.source!r} (format {fmt}): {exc}") from exc
    _check_caption_column(table, cfg, split)
    for name, feature in (table.features or {}).items():
        if isinstance(feature, datasets.Image) and feature.decode:
            table = table.cast_column(name, datasets.Image(decode=False))
    return table


def _read_cleaned(fmt: str, files: list[str], cfg: DataConfig, kwargs: dict):
    """An image folder's table read through cleaned copies of its metadata files when one has lines that datasets
    cannot read (med_train.metadata); None when datasets reads them as they are."""
    import datasets

    metadata = [f for f in files if Path(f).name in _METADATA] if fmt == "imagefolder" else []
    copies = readable_copies(metadata, cfg, imagefolder=True) if metadata else None
    return None if copies is None else datasets.load_dataset("json", data_files={"train": copies}, split="train",
                                                             **kwargs)


def _check_caption_column(table, cfg: DataConfig, split: str) -> None:
    """A DataError naming the columns when none of them can hold the captions (columns known before reading:
    every source but a streamed JSON file and webdataset, whose .json member may hold them)."""
    import difflib

    columns = list(table.column_names or [])
    if not columns or "json" in columns or cfg.caption_column in columns or set(CAPTION_COLUMNS) & set(columns):
        return
    close = difflib.get_close_matches(cfg.caption_column, columns, n=1)
    hint = f"; did you mean --set data.caption_column={close[0]}?" if close else \
        " (set data.caption_column to the one that holds the captions)"
    raise DataError(f"data source {cfg.source!r} [{split}] has no caption column {cfg.caption_column!r} "
                    f"(data.caption_column); its columns: {', '.join(columns)}{hint}")


def _belongs(path: Path, fmt: str) -> bool:
    if fmt == "imagefolder":
        return path.suffix.lower() in _IMAGE_SUFFIXES or path.name in _METADATA
    return path.suffix == {"webdataset": ".tar", "parquet": ".parquet"}.get(fmt, path.suffix)


def iter_table(table, split: str, shard: int | None = None) -> Iterator[tuple[str, dict]]:
    """(row label, raw row) in stored order; the label (`split:row` or `split:shard:row`) is the fallback id.

    A streamed table is read shard by shard through `.iter()`, which unlike `iter(table)` does not re-split the
    shards among dataloader workers: data.py assigns the work itself."""
    if not hasattr(table, "num_shards"):  # map-style, read in slices: a row at a time costs ~20x more
        for start in range(0, len(table), 256):
            columns = table[start:start + 256]
            for i, values in enumerate(zip(*columns.values(), strict=True), start=start):
                yield f"{split}:{i}", dict(zip(columns.keys(), values, strict=True))
        return
    shards = range(table.num_shards) if shard is None else [shard]
    for j in shards:
        part = table.shard(num_shards=table.num_shards, index=j, contiguous=True)
        i = 0
        for batch in part.iter(batch_size=64):
            for values in zip(*batch.values(), strict=True):
                yield f"{split}:{j}:{i}", dict(zip(batch.keys(), values, strict=True))
                i += 1


# ---- rows -----------------------------------------------------------------------------------------------------------

@dataclass
class Row:
    id: str
    image: Any  # a path, bytes, a {"bytes", "path"} cell or a PIL image
    captions: Any  # the raw caption cell: a string, a list of strings, or something unusable
    objects: list | None = None  # the true content of a shapes image
    image_id: str | None = None  # rows with the same image_id show the same image


def image_root(cfg: DataConfig) -> str | None:
    """The folder relative image paths are under: `cfg.image_root`, else a BLIP JSON's own folder."""
    if cfg.image_root or detect_format(cfg) != "blip_json":
        return cfg.image_root
    return str(Path(cfg.source).parent)


def parse_row(raw: dict, cfg: DataConfig, label: str, root: str | None = None) -> Row:
    """Pick the image, caption, id and objects of a raw row whatever the source's column names; relative image
    paths are joined to `root` (see image_root)."""
    if raw.get(BAD_LINE):  # a line of an annotation file that could not be read (med_train.metadata)
        reason, where, detail = raw[BAD_LINE].split("\t", 2)
        return Row(where, raw.get("image"), Unreadable(reason, detail))
    if isinstance(raw.get("json"), dict):  # webdataset: the .json member holds the caption and the rest
        raw = {**raw["json"], **{k: v for k, v in raw.items() if k != "json"}}
    image = raw.get(cfg.image_column)
    if image is None:
        image = next((raw[c] for c in IMAGE_COLUMNS if raw.get(c) is not None), None)
    caption_column = cfg.caption_column if cfg.caption_column in raw else next(
        (c for c in CAPTION_COLUMNS if c in raw), cfg.caption_column)
    path = image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
    if path and root and not Path(path).is_absolute():
        path = str(Path(root) / path)
        image = path if isinstance(image, str) else {**image, "path": path}
    ids = [cfg.id_column] if cfg.id_column else ID_COLUMNS
    row_id = next((str(raw[c]) for c in ids if raw.get(c) is not None), None) or path or label
    image_id = None if raw.get("image_id") is None else str(raw["image_id"])
    return Row(row_id, image, raw.get(caption_column), raw.get("objects"), image_id)


def image_key(row: Row) -> str:
    """Which image a row shows: its image_id, else a hash of its image bytes, else its path, else its id.
    (Bytes before path: some datasets give every embedded image the same file name.)"""
    if row.image_id is not None:
        return f"image_id:{row.image_id}"
    data, path = _bytes_and_path(row.image) if isinstance(row.image, dict | bytes | str | Path) else (None, None)
    if data is not None:
        return "sha1:" + hashlib.sha1(data).hexdigest()
    return f"path:{path}" if path else f"id:{row.id}"


def group_rows(rows: Iterator[Row]) -> list[Row]:
    """Held-out rows, one per image (image_key): the caption cells of an image's rows become one list of
    (row id, caption cell) pairs, in first-seen order. Holds the split in memory (held-out splits are small)."""
    groups: dict[str, Row] = {}
    for row in rows:
        key = image_key(row)
        if key not in groups:
            groups[key] = Row(row.id, row.image, [], row.objects, row.image_id)
        groups[key].captions.append((row.id, row.captions))
    return list(groups.values())


# ---- a held-out slice of a split ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Holdout:
    """The images of a split set aside for validation: those whose hash of (seed, image key) falls in the first
    `fraction` of the hash range. A rule, not a list: every process and worker decides alone, a stream needs no
    first pass, and the same seed holds out the same images in every run. Paths are hashed relative to `base` (the
    source's folder), so that moving the data does not change the slice. A training stream skips these images,
    a held-out stream reads only them (data.CaptionStream)."""

    fraction: float
    seed: int
    base: str | None = None

    RULE = "sha1(f'{seed}:{image key}') as a 64-bit big-endian number < fraction * 2**64"

    @classmethod
    def of(cls, cfg: DataConfig, seed: int) -> Holdout:
        source = Path(image_root(cfg) or cfg.source.replace("{split}", cfg.train_split))
        base = source.parent if source.is_file() else source if source.is_dir() else None
        return cls(cfg.val_holdout, seed, str(base.resolve()) if base else None)

    def key(self, row: Row) -> str:
        key = image_key(row)
        if key.startswith("path:") and self.base:
            path = Path(key.removeprefix("path:"))
            if path.is_relative_to(self.base):
                key = "path:" + path.relative_to(self.base).as_posix()
        return key

    def __contains__(self, row: Row) -> bool:
        digest = hashlib.sha1(f"{self.seed}:{self.key(row)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") < self.fraction * 2**64


def has_split(cfg: DataConfig, split: str) -> bool:
    """Whether the source holds a split of that name (one file alone holds only the training split)."""
    fmt = detect_format(cfg)
    if fmt == "hub":
        import datasets

        return split in datasets.get_dataset_split_names(cfg.source, cfg.config_name)
    if fmt == "blip_json":
        if "{split}" not in cfg.source:
            return split == cfg.train_split
        return Path(cfg.source.replace("{split}", split)).is_file()
    root = Path(cfg.source)
    if root.is_file():
        return split == cfg.train_split
    if (root / split).is_dir():
        return True
    from datasets.data_files import get_data_patterns

    try:
        return split in {str(name) for name in get_data_patterns(str(root))}
    except FileNotFoundError:  # no data files at all: open_split says so
        return False


# ---- packing into shards --------------------------------------------------------------------------------------------

_SUFFIX_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def pack(cfg: DataConfig, out: str | Path, *, fmt: str = "webdataset", shard_size: int = 1000,
         splits: list[str] | None = None, seed: int = 0, progress=None) -> dict[str, BadRowStats]:
    """Rewrite splits as `OUT/<split>/<split>-00000.tar|.parquet` shards for parallel streaming.

    Each written row holds the image bytes, a `captions` list (held-out splits: every reference of the image),
    `id` and `objects` when the source has them. Bad rows are left out and counted. A non-streamed training split
    is shuffled first, since a stream only shuffles within its buffer. In a tar every image takes the suffix of the
    split's first image (datasets' webdataset reader wants one suffix per shard); others are re-encoded to it.
    `progress`: a tqdm bar advanced by each row (an image) written or left out."""
    if fmt not in ("webdataset", "parquet"):
        raise ValueError(f"pack format must be webdataset or parquet, got {fmt!r}")
    all_stats = {}
    defaults = dict.fromkeys(s for s in (cfg.train_split, cfg.val_split, cfg.eval_split) if s)  # in order, once
    for split in splits or list(defaults):
        try:
            table = open_split(cfg, split)
        except DataError:
            if splits:  # asked for by name
                raise
            continue  # a default split the source does not have
        if split == cfg.train_split and not cfg.streaming:
            table = table.shuffle(seed=seed)
        root = image_root(cfg)
        rows = (parse_row(raw, cfg, label, root) for label, raw in iter_table(table, split))
        groups = group_rows(rows) if split != cfg.train_split else (
            Row(r.id, r.image, [(r.id, r.captions)], r.objects, r.image_id) for r in rows)
        all_stats[split] = stats = BadRowStats()
        writer = _ShardWriter(Path(out) / split, split, fmt, shard_size)
        for group in groups:
            stats.rows += 1
            if progress is not None:
                progress.update()
            try:
                captions = [c for _, cell in group.captions for c in _raw_texts(cell, cfg.max_words)]
                if not captions:
                    clean_captions(group.captions[0][1], cfg.max_words)  # raises with the reason
                writer.add(group, captions, load_image(group.image, max_pixels=cfg.max_image_pixels))
            except BadRow as exc:
                stats.add_bad(group.id, exc.reason, str(exc))
        writer.close()
    return all_stats


def _raw_texts(cell: Any, max_words: int) -> list[str]:
    """The caption strings of a cell that survive cleaning, kept as written (cleaning happens when reading)."""
    items = list(cell) if isinstance(cell, list | tuple) else [cell]
    return [c for c in items if isinstance(c, str) and clean_caption(c, max_words)]


class _ShardWriter:
    def __init__(self, folder: Path, split: str, fmt: str, shard_size: int) -> None:
        self.folder, self.split, self.fmt, self.shard_size = folder, split, fmt, max(1, shard_size)
        self.rows: list[dict] = []
        self.shards = self.count = 0
        self.suffix: str | None = None
        if folder.is_dir() and any(folder.iterdir()):  # old shards left beside new ones would be read as data
            raise DataError(f"{folder} is not empty: remove it or pack somewhere else")
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, group: Row, captions: list[str], rgb: Image.Image) -> None:
        data, path = _bytes_and_path(group.image) if not isinstance(group.image, Image.Image) else (None, None)
        if data is None and path:
            data = Path(path).read_bytes()
        suffix = _SUFFIX_OF_FORMAT.get(Image.open(io.BytesIO(data)).format) if data else None
        target = self.suffix or suffix or "png"
        if self.fmt == "webdataset":
            self.suffix = target
        if suffix != target:  # another format than the shard's, or no bytes at all: re-encode the decoded RGB
            buffer = io.BytesIO()
            rgb.save(buffer, "JPEG" if target == "jpg" else target.upper(), quality=95)
            data = buffer.getvalue()
        row = {"id": group.id, "captions": captions, "image": data, "suffix": target}
        if group.objects is not None:
            row["objects"] = group.objects
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.shard_size:
            self._flush()

    def close(self) -> None:
        if self.rows:
            self._flush()

    def _flush(self) -> None:
        import json
        import tarfile

        name = self.folder / f"{self.split}-{self.shards:05d}.{'tar' if self.fmt == 'webdataset' else 'parquet'}"
        first = self.count - len(self.rows)
        if self.fmt == "webdataset":
            with tarfile.open(name, "w") as tar:
                for i, row in enumerate(self.rows, start=first):
                    meta = {k: v for k, v in row.items() if k not in ("image", "suffix")}
                    for member, payload in ((f"{i:08d}.{row['suffix']}", row["image"]),
                                            (f"{i:08d}.json", json.dumps(meta).encode())):
                        info = tarfile.TarInfo(member)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
        else:
            import datasets

            records = [{**{k: v for k, v in row.items() if k != "suffix"},
                        "image": {"bytes": row["image"], "path": f"{i:08d}.{row['suffix']}"}}
                       for i, row in enumerate(self.rows, start=first)]
            table = datasets.Dataset.from_list(records).cast_column("image", datasets.Image())
            table.to_parquet(str(name))
        self.rows, self.shards = [], self.shards + 1
