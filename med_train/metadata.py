"""Annotation files whose bad lines would stop `datasets`: found up front, then read around.

`datasets` reads a `metadata.jsonl` (imagefolder) or a `.jsonl` annotation list with pyarrow and a `metadata.csv`
with pandas, a block at a time: one line that is not UTF-8, not JSON or not CSV, or one caption cell of another
type than the rest (a number among strings), stops the whole split. So each such file is first read whole the same
way (fast, in C); a file that reads is used as it is. Otherwise it is streamed once, record by record, into a
cleaned JSON-lines copy in the datasets cache: good records as they were (caption cells as lists of strings, ids
as strings, imagefolder's `file_name` as an absolute `image` path), and each bad one as a row holding only where
it is and why (BAD_LINE), which `sources.parse_row` turns into a counted bad row named `FILE:LINE`.

A `.json` annotation list (BLIP / Karpathy: `[{"image": ..., "caption": ...}, ...]`) is one document: a file cut
short, which is not JSON at all, is one DataError naming the line and column where it stops. Its entries are
checked as lines are (an entry that is not an object, has no image, or no caption that is text, is bad) and the
file goes through a cleaned copy when one is; such a bad row is named `FILE[INDEX]`, the entry's place in the list.

    copies = readable_copies(["data/train/metadata.jsonl"], cfg, imagefolder=True)   # None: all read as they are
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from med_train.config import DataConfig

# The column of a cleaned copy that marks a bad line: "reason<TAB>FILE:LINE<TAB>detail", "" on good lines (one type in
# every row: pyarrow reads the copy in blocks, and a column missing from a block would change its type)
BAD_LINE = "_med_bad_line"
_SURROGATE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as decode(errors="surrogateescape") keeps it
logger = logging.getLogger(__name__)


def readable_copies(files: list[str], cfg: DataConfig, *, imagefolder: bool) -> list[str] | None:
    """None when every `.jsonl` and `.csv` of `files` reads as it is; else a cleaned copy of each one (module
    docstring). `imagefolder`: image paths are `file_name` cells relative to the file's folder (absolute in the
    copy)."""
    tables = [f for f in files if str(f).endswith((".jsonl", ".csv", ".json"))]
    if all(_list_reads_whole(*_identity(f), cfg.image_column, cfg.caption_column) if str(f).endswith(".json")
           else _reads_whole(*_identity(f)) for f in tables):
        return None
    return [_cleaned_copy(f, cfg, imagefolder) for f in tables]


def _identity(path: str) -> tuple[str, int, int]:
    stat = os.stat(path)
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _reads_whole(path: str, size: int, mtime_ns: int) -> bool:
    """Whether pyarrow (JSON lines) or pandas (CSV) reads the file, as datasets will (size and mtime: the cache's
    key, so an edited file is checked again)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.json as paj

    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")  # pyarrow keeps bad UTF-8 as it is, and datasets fails on it later
        if path.endswith(".csv"):
            pd.read_csv(io.BytesIO(data))
        else:
            paj.read_json(io.BytesIO(data))
    except (UnicodeDecodeError, pa.ArrowInvalid, pa.ArrowNotImplementedError, pd.errors.ParserError):
        return False
    return True


@functools.lru_cache(maxsize=64)
def _list_reads_whole(path: str, size: int, mtime_ns: int, image_column: str, caption_column: str) -> bool:
    """Whether a JSON annotation list is read as it is: every entry good (module docstring), and pyarrow reads them
    as datasets will (as JSON lines). A document that is not a list is left to datasets."""
    import pyarrow as pa
    import pyarrow.json as paj

    cfg = DataConfig(image_column=image_column, caption_column=caption_column)
    entries = []
    for _, entry in _list_entries(path, image_column):
        if isinstance(entry, tuple) or _clean_record(dict(entry), path, cfg, None)[BAD_LINE]:
            return False
        entries.append(entry)
    if not entries:  # not a list, or an empty one
        return True
    try:
        paj.read_json(io.BytesIO("\n".join(json.dumps(entry) for entry in entries).encode()))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def _cleaned_copy(path: str, cfg: DataConfig, imagefolder: bool) -> str:
    """The cleaned copy's path, written once per version of the file (atomically: processes may race)."""
    import datasets

    source, size, mtime_ns = _identity(path)
    key = hashlib.sha1(f"{source}|{size}|{mtime_ns}|{imagefolder}|{cfg.caption_column}|{cfg.image_column}"
                       .encode()).hexdigest()
    copy = Path(cfg.cache_dir or datasets.config.HF_DATASETS_CACHE) / "med_train_cleaned" / key[:16] / "data.jsonl"
    if copy.is_file():
        return str(copy)
    copy.parent.mkdir(parents=True, exist_ok=True)
    tmp = copy.with_name(f".{copy.name}.{os.getpid()}")
    folder, bad = Path(source).parent if imagefolder else None, []
    is_list = source.endswith(".json")
    records = _list_entries(source, cfg.image_column) if is_list else \
        (_csv_records if source.endswith(".csv") else _json_records)(source)
    with open(tmp, "w", encoding="utf-8") as out:
        for number, record in records:
            record = _clean_record(record, f"{source}[{number}]" if is_list else f"{source}:{number}", cfg, folder)
            if record[BAD_LINE]:
                bad.append((number, record[BAD_LINE].split("\t")[2]))
            out.write(json.dumps(record) + "\n")
    os.replace(tmp, copy)
    if bad:
        unit = "entry" if is_list else "line"
        logger.warning("%s: %d %s(s) cannot be read as they are and will be skipped as bad rows (first: %s %s, %s)",
                       source, len(bad), unit, unit, *bad[0])
    return str(copy)


def _json_records(path: str) -> Iterator[tuple[int, dict | tuple[str, str]]]:
    """(line number, the line's object, or (reason, detail) when it has none) for each non-blank line."""
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                record = "line_not_utf8", f"byte {exc.start} is not UTF-8 ({line[exc.start:exc.start + 4]!r})"
            except json.JSONDecodeError as exc:
                record = "line_not_json", f"not JSON ({exc.msg} at column {exc.colno})"
            if not isinstance(record, dict | tuple):
                record = "line_not_json", f"a JSON {type(record).__name__}, not an object"
            yield number, record


def _list_entries(path: str, image_column: str) -> Iterator[tuple[int, dict | tuple[str, str]]]:
    """(index, the entry, or (reason, detail) when it is no object or names no image) for each entry of a JSON
    list; a DataError naming the file and where parsing stopped when it is not JSON (cut short)."""
    from med_train.sources import IMAGE_COLUMNS, DataError

    data = Path(path).read_bytes()
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (byte {exc.start}: {data[exc.start:exc.start + 4]!r})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}): an "
                        "annotation list cut short?") from None
    for index, entry in enumerate(document if isinstance(document, list) else []):
        if not isinstance(entry, dict):
            entry = "entry_not_object", f"a JSON {type(entry).__name__}, not an object"
        elif all(entry.get(c) is None for c in (image_column, *IMAGE_COLUMNS)):
            entry = "image_missing", f"no image (no {image_column!r} key)"
        yield index, entry


def _csv_records(path: str) -> Iterator[tuple[int, dict | tuple[str, str]]]:
    """(first line number, the record as {header: cell}, or (reason, detail)) for each CSV record. Read as pandas
    reads for datasets: an empty cell is None, a record with fewer cells than the header is padded."""
    text = Path(path).read_bytes().decode("utf-8", errors="surrogateescape")  # bad bytes found per record
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    start = reader.line_num + 1
    for cells in reader:
        number, start = start, reader.line_num + 1
        if not cells:
            continue
        if len(cells) > len(header):
            yield number, ("line_not_csv", f"{len(cells)} cells, the header has {len(header)}")
        elif any(_SURROGATE.search(cell) for cell in cells):
            yield number, ("line_not_utf8", "bytes that are not UTF-8")
        else:
            yield number, {name: cell or None for name, cell in itertools.zip_longest(header, cells)}


def _clean_record(record: dict | tuple[str, str], where: str, cfg: DataConfig, folder: Path | None) -> dict:
    """One record as a row of the cleaned copy: as it was, or a BAD_LINE row saying why it is unusable."""
    from med_train.sources import CAPTION_COLUMNS, ID_COLUMNS, BadRow, clean_captions

    def bad(reason: str, detail: str, image: str | None = None) -> dict:
        return {"image": image, BAD_LINE: f"{reason}\t{where}\t{detail}"}

    if isinstance(record, tuple):
        return bad(*record)
    record[BAD_LINE] = ""
    if folder is not None:
        record, outside = _absolute_image_paths(record, folder)
        if outside:
            return bad("image_outside_folder", f"file_name {outside!r} is not a relative path inside {folder}")
    column = cfg.caption_column if cfg.caption_column in record else next(
        (c for c in CAPTION_COLUMNS if c in record), None)
    if column is not None:
        cell = record[column]
        items = cell if isinstance(cell, list) else [cell]
        kept = [c for c in items if isinstance(c, str)]
        if not kept and cell is not None and cell != []:
            try:
                clean_captions(cell, cfg.max_words)
            except BadRow as exc:
                return bad(exc.reason, str(exc), record.get("image"))
        record[column] = kept if cell is not None else None  # one type for every row: a list of strings
    for name in ID_COLUMNS:
        if record.get(name) is not None:
            record[name] = str(record[name])
    return record


def _absolute_image_paths(record: dict, folder: Path) -> tuple[dict, str | None]:
    """(the record with imagefolder's `file_name` and `<column>_file_name` cells as absolute paths under `folder`,
    the first such path that is not inside `folder`, refused as datasets refuses it)."""
    out: dict[str, Any] = {}
    for name, value in record.items():
        column = "image" if name == "file_name" else name.removesuffix("_file_name")
        if column == name or not isinstance(value, str):
            out[name] = value
            continue
        relative = os.path.normpath(value).replace("\\", "/")
        if "://" in value or os.path.isabs(value) or relative == ".." or relative.startswith("../"):
            return out, value
        out[column] = str(folder / relative)
    return out, None
