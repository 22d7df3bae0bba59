"""Batches for training and evaluation: rows -> clean -> transform -> tokenise, sharded, resumable.

    loader = build_dataloader(cfg.data, "train", train=True, batch_size=32, image_size=224,
                              tokenizer=tok, prompt="a picture of ", max_length=40, seed=42,
                              num_processes=accelerator.num_processes, process_index=accelerator.process_index)
    accelerator.register_for_checkpointing(loader)   # NOT accelerator.prepare(loader): see "Sharding" below
    for step, batch in zip(range(start_step, max_steps), loader):   # a training loader never ends
        loss = model(batch["images"].to(device), batch["input_ids"].to(device), ...)

Images come as uint8 (B, 3, S, S): the model normalises them on its device (`med_train.model.normalize_images`),
which keeps float work out of the loader workers and quarters the bytes copied to a GPU.

Sharding (one mechanism, ours): every (process, dataloader worker) pair is a "slot"; slot = process_index *
num_workers + worker_id. A non-streamed split is permuted per epoch with a seed shared by all processes and slot s
takes positions s, s + slots, ...; a streamed split gives whole shards to slots when the shard count divides
evenly, otherwise every slot reads every row and keeps one in `slots`. Either way, in each epoch every row goes to
exactly one slot. accelerate must not shard again (REFERENCE.md): do not pass the loader through
`accelerator.prepare`; move batches to the device yourself.

Training loaders are endless: each slot goes on to its next epoch by itself and batches are always full, so every
process takes the same number of steps whatever the split size. Evaluation loaders make one pass over the held-out
split, one row per image with all its references; processes may get different numbers of batches, so gather
results once at the end (`gather_object`), not per batch.

Resume is exact: each slot's position (epoch, row, caption) after its last delivered batch is in `state_dict()`.
A non-streamed split jumps straight there; a stream re-reads rows up to it without decoding images, so its shuffle
buffer is rebuilt exactly. Under torch.distributed `state_dict()` gathers every process's position (call it on all
processes, as `accelerator.save_state` does); `load_state_dict` picks this process's.

Resuming with another number of processes or workers (another slot layout): a non-streamed split turns the old
slots' positions into the set of rows each epoch has delivered ("carried", with rows stopped part-way through their
captions) and shares the rest of those epochs among the new slots; no row is repeated or skipped, only their order
differs from an uninterrupted run's. A stream has no such global order (each slot shuffles its own rows), so
`load_state_dict` refuses another layout there with a DataError naming the old and new numbers.
"""

from __future__ import annotations

import base64
import itertools
import logging
import signal
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torchvision import transforms as T

from med_train.config import DataConfig
from med_train.sources import (
    BadRow,
    BadRowStats,
    DataError,
    Holdout,
    Row,
    clean_caption,
    clean_captions,
    detect_format,
    group_rows,
    image_key,
    image_root,
    iter_table,
    load_image,
    open_split,
    parse_row,
)

__all__ = ["BadRowStats", "CaptionLoader", "CaptionStream", "DataError", "EvalCollate", "Holdout", "build_dataloader",
           "build_dataset", "build_transform", "check", "clean_caption", "iter_captions", "load_image",
           "make_collate"]
logger = logging.getLogger(__name__)
BAD_WINDOW = 100  # the mostly-bad check judges a pass's first rows (or the whole pass when it is shorter)
_LOGGED_BAD_ROWS = 100  # bad rows logged one by one; later ones are only counted


# ---- transforms ----------------------------------------------------------------------------------------------------

def build_transform(*, train: bool, image_size: int, crop_scale_min: float = 0.5, randaugment: bool = False,
                    hflip: bool = False) -> Callable:
    """PIL RGB -> uint8 (3, S, S) tensor (normalised later, by the model). Train: RandomResizedCrop(scale=
    (crop_scale_min, 1), bicubic), then optional RandAugment and flip; eval: a bicubic resize to S x S."""
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        steps = [T.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), interpolation=bicubic)]
        if randaugment:
            steps.append(CaptionRandAugment())
        if hflip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps = [T.Resize((image_size, image_size), interpolation=bicubic)]
    return T.Compose([*steps, T.PILToTensor()])


class CaptionRandAugment(T.RandAugment):
    """BLIP's RandomAugment(2, 5): 2 ops at half strength, without the ops that change colours (Color, Contrast,
    Posterize, Solarize) since captions name colours. torchvision has 31 magnitude bins: BLIP's 5 of 10 is 15."""

    def __init__(self) -> None:
        super().__init__(num_ops=2, magnitude=15, num_magnitude_bins=31)

    def _augmentation_space(self, num_bins: int, image_size: tuple[int, int]) -> dict:
        space = super()._augmentation_space(num_bins, image_size)
        return {k: v for k, v in space.items() if k not in ("Color", "Contrast", "Posterize", "Solarize")}


# ---- the stream -----------------------------------------------------------------------------------------------------

class CaptionStream(torch.utils.data.IterableDataset):
    """Examples of one split for this process: `{"image", "caption", "id"}` when training (one per caption),
    `{"image", "references", "id", "objects"}` for held-out rows (one per image). See the module docstring.

    `per_image=True` makes a training stream give one example per image with all its references, as held-out
    streams do (what SCST scores samples against): a caption list in one row, or several rows showing the same
    image (sources.image_key). A map-style split is grouped at load time (one pass without decoding images; each
    epoch then permutes the images); a stream groups the rows of each shard within a look-back window of the last
    GROUP_WINDOW images, so an image's rows must lie that close together in one shard (rows further apart give
    the image twice, each time with part of its references).

    `epochs=None` runs forever (training); held-out splits always make one pass. Iterated in this process, bad
    rows are counted into `stats`; in dataloader workers, `CaptionLoader` collects them. With a `holdout`, a
    training stream skips its images (they are neither read nor counted) and a held-out stream reads only them."""

    def __init__(self, cfg: DataConfig, split: str, *, train: bool, transform: Callable, seed: int = 0,
                 num_processes: int = 1, process_index: int = 0, epochs: int | None = 1,
                 stats: BadRowStats | None = None, holdout: Holdout | None = None, per_image: bool = False) -> None:
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is not in [0, {num_processes})")
        self.cfg, self.split, self.train, self.transform, self.seed = cfg, split, train, transform, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.epochs = epochs if train else 1
        self.stats = stats if stats is not None else BadRowStats()
        self.table, self.root, self.holdout = open_split(cfg, split), image_root(cfg), holdout
        rows = (parse_row(raw, cfg, label, self.root) for label, raw in iter_table(self.table, split))
        self.groups = None if train else group_rows(rows if holdout is None else (r for r in rows if r in holdout))
        self.per_image = per_image or not train
        # a map-style training split grouped by image: each image's row indices (outside the holdout)
        self.image_rows = _image_rows(self.table, split, cfg, self.root, holdout) if (
            train and per_image and not hasattr(self.table, "num_shards")) else None
        self.first_epoch = 0
        self.start: dict[int, tuple[int, int, int]] = {}  # worker id -> (epoch, row, caption) to start from
        # epoch -> {"consumed": bool per position of the epoch's order, "partial": {position: first caption}}: what
        # slots of an earlier layout delivered (module docstring); the new slots share out the rest
        self.carried: dict[int, dict] = {}

    def __iter__(self) -> Iterator[dict]:
        tally = _Tally(self.cfg, self.split, self.stats)
        for example, meta in self.iter_with_meta():
            tally.add(meta)
            if example is not None:
                yield example
        tally.end()

    def epoch_size(self) -> int:
        """The examples of one training epoch, all slots together: one per usable caption of each row outside the
        holdout (per_image: one per image with a usable caption), counted in one pass without decoding images (so an
        unreadable image still counts)."""
        if self.image_rows is not None:
            return sum(any(True for _ in _usable_captions(((f"{self.split}:{i}", self.table[i]) for i in rows),
                                                            self.cfg, self.root, None)) for rows in self.image_rows)
        rows = iter_table(self.table, self.split)
        return sum(1 for _ in _usable_captions(rows, self.cfg, self.root, self.holdout))

    def iter_with_meta(self) -> Iterator[tuple[dict | None, dict]]:
        """(example, meta) pairs; meta: this worker, its position after the example, the rows read and bad rows
        met since the previous pair. A last `(None, meta)` carries the counts of trailing bad rows."""
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        slots = self.num_processes * num_workers
        slot = self.process_index * num_workers + worker
        epoch, row0, sub0 = self.start.get(worker, (self.first_epoch, 0, 0))
        pending = {"rows": 0, "bad": []}

        def meta(position: tuple[int, int, int]) -> dict:
            nonlocal pending
            out = {"worker": worker, "position": position, **pending}
            pending = {"rows": 0, "bad": []}
            return out

        while self.epochs is None or epoch < self.first_epoch + self.epochs:
            seen = 0
            for r, row, carried_first in self._epoch_rows(epoch, slot, slots, row0):
                if not self.per_image and self.holdout is not None and row in self.holdout:
                    continue  # a validation image: never trained on
                seen += 1
                first = max(sub0 if r == row0 else 0, carried_first)
                # A group counts its source rows; a row resumed mid-way was counted before the checkpoint.
                n_rows = 0 if first else len(row.captions) if self.per_image else 1
                pending["rows"] += n_rows
                examples, total = self._examples(row, first, pending)
                for sub, example in examples:
                    yield example, meta((epoch, r, sub + 1) if sub + 1 < total else (epoch, r + 1, 0))
                if pending["rows"] >= BAD_WINDOW:  # rows but no example for a while: report the counts
                    yield None, meta((epoch, r + 1, 0))
            if seen == 0 and row0 == 0 and self.epochs is None and epoch not in self.carried:
                raise DataError(f"data source {self.cfg.source!r} [{self.split}] has no rows for process "
                                f"{self.process_index} worker {worker}: fewer rows than processes x workers?")
            epoch, row0, sub0 = epoch + 1, 0, 0
        if pending["rows"] or pending["bad"]:
            yield None, meta((epoch, 0, 0))

    def _epoch_rows(self, epoch: int, slot: int, slots: int, start: int) -> Iterator[tuple[int, Row, int]]:
        """(position, row, first caption) of this slot's share of one epoch, from position `start` on; the first
        caption is not 0 only for a row an earlier slot layout stopped in."""
        if self.groups is not None:  # held-out: fixed order, one row per image
            mine = self.groups[slot::slots]
            yield from ((r, mine[r], 0) for r in range(start, len(mine)))
            return
        rng = np.random.default_rng([self.seed, epoch])
        if not hasattr(self.table, "num_shards"):  # map-style: a full permutation, and jumping ahead is free
            order = rng.permutation(self.epoch_length())
            carried = self.carried.get(epoch)
            left = (np.arange(len(order)) if carried is None else np.flatnonzero(~carried["consumed"]))
            mine = left[slot::slots]  # positions in `order`
            partial = {} if carried is None else carried["partial"]
            for r in range(start, len(mine)):
                yield r, self._row(int(order[mine[r]])), partial.get(int(mine[r]), 0)
            return
        rows = _buffered(self._stream_rows(rng.permutation(self.table.num_shards), slot, slots),
                         self.cfg.shuffle_buffer, np.random.default_rng([self.seed, epoch, slot]))
        for r, item in enumerate(rows):
            if r >= start:  # earlier rows were delivered before the resume: skip them undecoded
                yield r, item if self.per_image else parse_row(item[1], self.cfg, item[0], self.root), 0

    def epoch_length(self) -> int:
        """What a map-style training epoch permutes: rows, or images (per_image)."""
        return len(self.image_rows) if self.image_rows is not None else len(self.table)

    def _row(self, i: int) -> Row:
        """Row `i` of a map-style split, or (per_image) image `i`'s rows as one group."""
        if self.image_rows is None:
            return parse_row(self.table[i], self.cfg, f"{self.split}:{i}", self.root)
        return group_rows(parse_row(self.table[j], self.cfg, f"{self.split}:{j}", self.root)
                          for j in self.image_rows[i])[0]

    def _stream_rows(self, shard_order: np.ndarray, slot: int, slots: int) -> Iterator:
        """This slot's (label, raw row) pairs, or (per_image) groups, of a streamed split."""
        if len(shard_order) % slots == 0:  # whole shards per slot: each slot reads only its own files
            for j in shard_order[slot::slots]:
                yield from self._shard_items(int(j))
            return
        # too few shards: every slot reads every row (group) and keeps one in `slots`
        items = (item for j in shard_order for item in self._shard_items(int(j)))
        yield from itertools.islice(items, slot, None, slots)

    def _shard_items(self, shard: int) -> Iterator:
        items = iter_table(self.table, self.split, shard=shard)
        return _group_nearby(items, self.cfg, self.root, self.holdout) if self.per_image else items

    def _examples(self, row: Row, first: int, pending: dict) -> tuple[list, int]:
        """([(caption index, example)] from caption `first` on, number of captions); bad rows are recorded.

        Captions are checked before the image is decoded (cheap first); each caption gets its own crop."""
        def bad(row_id: str, exc: BadRow) -> None:
            pending["bad"].append({"id": row_id, "reason": exc.reason, "detail": str(exc)})

        if not self.per_image:  # a training row: one example per caption
            try:
                captions = clean_captions(row.captions, self.cfg.max_words)
                image = load_image(row.image, max_pixels=self.cfg.max_image_pixels)
            except BadRow as exc:
                bad(row.id, exc)
                return [], 0
            examples = [(i, {"image": self.transform(image), "caption": captions[i], "id": row.id})
                        for i in range(first, len(captions))]
            return examples, len(captions)
        references, good_ids = [], []
        for row_id, cell in row.captions:  # a held-out group: one (row id, caption cell) per source row
            try:
                references += clean_captions(cell, self.cfg.max_words)
                good_ids.append(row_id)
            except BadRow as exc:
                bad(row_id, exc)
        if not references:
            return [], 0
        try:
            image = load_image(row.image, max_pixels=self.cfg.max_image_pixels)
        except BadRow as exc:
            for row_id in good_ids:
                bad(row_id, exc)
            return [], 0
        example = {"image": self.transform(image), "references": references, "id": row.id}
        if row.objects is not None:
            example["objects"] = row.objects
        return [(0, example)], 1


GROUP_WINDOW = 64  # images a stream keeps open while grouping rows by image (CaptionStream, per_image)


def _image_rows(table, split: str, cfg: DataConfig, root: str | None, holdout: Holdout | None) -> list[list[int]]:
    """The row indices of each image of a map-style split (sources.image_key), first-seen order, holdout left out."""
    images: dict[str, list[int]] = {}
    for i, (label, raw) in enumerate(iter_table(table, split)):
        row = parse_row(raw, cfg, label, root)
        if holdout is None or row not in holdout:
            images.setdefault(image_key(row), []).append(i)
    return list(images.values())


def _group_nearby(items: Iterator[tuple[str, dict]], cfg: DataConfig, root: str | None,
                  holdout: Holdout | None) -> Iterator[Row]:
    """Streamed (label, raw) rows as one group per image (sources.group_rows), holdout left out: an image's group
    is closed once GROUP_WINDOW other images have started after it, or at the end."""
    open_images: dict[str, list[Row]] = {}
    for label, raw in items:
        row = parse_row(raw, cfg, label, root)
        if holdout is not None and row in holdout:
            continue
        key = image_key(row)
        if key not in open_images and len(open_images) >= GROUP_WINDOW:
            yield group_rows(open_images.pop(next(iter(open_images))))[0]
        open_images.setdefault(key, []).append(row)
    for rows in open_images.values():
        yield group_rows(rows)[0]


class _Tally:
    """One pass's bookkeeping: adds each meta's rows and bad rows to `stats`, logs the first bad rows by id, and
    stops a mostly-bad source (judged on the first BAD_WINDOW rows, or on the whole pass when it is shorter)."""

    def __init__(self, cfg: DataConfig, split: str, *stats: BadRowStats | None) -> None:
        self.cfg, self.split, self.mine = cfg, split, BadRowStats()
        self.stats = [s for s in (self.mine, *stats) if s is not None]

    def add(self, meta: dict) -> None:
        before = self.mine.rows
        for stats in self.stats:
            stats.rows += meta["rows"]
            for bad in meta["bad"]:
                stats.add_bad(bad["id"], bad["reason"], bad["detail"])
        logged = self.mine.bad - len(meta["bad"])  # bad rows before this meta: all logged, up to the limit
        for bad in meta["bad"][: max(0, _LOGGED_BAD_ROWS - logged)]:
            logger.warning("skipped row %s of %s [%s]: %s (%s)", bad["id"], self.cfg.source, self.split,
                           bad["reason"], bad["detail"])
        if before < BAD_WINDOW <= self.mine.rows:
            self.mine.check(f"{self.cfg.source} [{self.split}]", self.cfg.max_bad_fraction)

    def end(self) -> None:
        if self.mine.rows < BAD_WINDOW:
            self.mine.check(f"{self.cfg.source} [{self.split}]", self.cfg.max_bad_fraction)


def _buffered(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A shuffle buffer: keeps `size` items and yields a random one as each new item arrives."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


# ---- batches --------------------------------------------------------------------------------------------------------

class TrainCollate:
    """Training examples -> `{"images" (B, 3, H, W), "input_ids", "attention_mask", "labels" (B, T), "ids",
    "captions"}`: `[DEC] prompt caption [SEP]`, labels -100 on pads and prompt (tokenizer.encode_captions)."""

    def __init__(self, tokenizer, prompt: str, max_length: int) -> None:
        self.tokenizer, self.prompt, self.max_length = tokenizer, prompt, max_length

    def __call__(self, examples: list[dict]) -> dict:
        from med_train.tokenizer import encode_captions

        captions = [e["caption"] for e in examples]
        text = encode_captions(self.tokenizer, captions, self.prompt, self.max_length)
        return {"images": torch.stack([e["image"] for e in examples]), **text,
                "ids": [e["id"] for e in examples], "captions": captions}


class EvalCollate:
    """Held-out examples -> `{"images" (B, 3, H, W), "references": [[str]], "ids", "objects"}` (objects: one list
    per image, None where the source has none)."""

    def __call__(self, examples: list[dict]) -> dict:
        return {"images": torch.stack([e["image"] for e in examples]),
                "references": [e["references"] for e in examples], "ids": [e["id"] for e in examples],
                "objects": [e.get("objects") for e in examples]}


def make_collate(tokenizer, prompt: str, max_length: int) -> TrainCollate:
    return TrainCollate(tokenizer, prompt, max_length)


class _MetaStream(torch.utils.data.IterableDataset):
    def __init__(self, stream: CaptionStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[tuple[dict | None, dict]]:
        return self.stream.iter_with_meta()


class _MetaCollate:
    """Collates the examples and sums the meta of a worker's batch: its last position, rows read, bad rows."""

    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[dict | None, dict]]) -> dict:
        examples = [example for example, _ in items if example is not None]
        batch = self.collate(examples) if examples else {}
        metas = [meta for _, meta in items]
        batch["_meta"] = {"worker": metas[-1]["worker"], "position": metas[-1]["position"],
                          "rows": sum(m["rows"] for m in metas), "bad": [b for m in metas for b in m["bad"]]}
        return batch


def _ignore_stop_signals(_worker_id: int) -> None:
    """In each loader worker: SIGTERM and SIGINT sent to the whole process group (Ctrl-C, `timeout`, Slurm,
    Kubernetes) are for the training process, which finishes its step and saves a checkpoint with the workers'
    help; a worker they killed would stop the run at once. The workers end when the training process closes them."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


class CaptionLoader:
    """Batches of a CaptionStream from a torch DataLoader, keeping each worker's position for exact resume.

    A training loader is endless and a new `iter()` continues where the last delivered batch left off; a held-out
    loader makes a full pass on every `iter()`. `stats` counts rows and bad rows (held-out: the latest pass)."""

    def __init__(self, stream: CaptionStream, *, batch_size: int, collate: Callable, num_workers: int,
                 seed: int = 0, stats: BadRowStats | None = None, pin_memory: bool = False) -> None:
        self.stream, self.batch_size, self.collate = stream, batch_size, collate
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self.shared_stats = stats  # the caller's counter, added to as well
        self.stats = BadRowStats()
        self.positions: dict[int, tuple[int, int, int]] = {}  # worker -> position after its last batch
        self.batches = 0
        self.resharded_from: tuple[int, int] | None = None  # (processes, workers) of a resumed other layout

    @property
    def epoch(self) -> int:
        """The epoch of the slowest worker of this process (workers move on to a new epoch independently)."""
        return min((p[0] for p in self.positions.values()), default=self.stream.first_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Start the next `iter()` at the beginning of `epoch`."""
        self.stream.first_epoch, self.positions = epoch, {}

    def __iter__(self) -> Iterator[dict]:
        if not self.stream.train:
            self.positions, self.stats = {}, BadRowStats()
        self.stream.start = dict(self.positions)
        loader = torch.utils.data.DataLoader(
            _MetaStream(self.stream), batch_size=self.batch_size, num_workers=self.num_workers,
            collate_fn=_MetaCollate(self.collate), generator=torch.Generator().manual_seed(self.seed + self.batches),
            pin_memory=self.pin_memory, worker_init_fn=_ignore_stop_signals)
        tally = _Tally(self.stream.cfg, self.stream.split, self.stats, self.shared_stats)
        for batch in loader:
            meta = batch.pop("_meta")
            self.positions[meta["worker"]] = tuple(meta["position"])
            tally.add(meta)
            if "images" in batch:
                self.batches += 1
                yield batch
        tally.end()

    def state_dict(self) -> dict:
        """Every process's position (gathered under torch.distributed: call on all processes). JSON-safe."""
        local = {"process_index": self.stream.process_index, "num_processes": self.stream.num_processes,
                 "num_workers": max(1, self.num_workers), "first_epoch": self.stream.first_epoch,
                 "positions": {str(w): list(p) for w, p in self.positions.items()}, "batches": self.batches,
                 "stats": self.stats.to_dict()}
        ranks = [local]
        dist = torch.distributed
        if self.stream.num_processes > 1 and dist.is_available() and dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, local)
        slowest = min(epoch for saved in ranks for _, _, epoch, _, _ in _slot_positions(saved))
        return {"version": 2, "ranks": ranks, "carried": _pack_carried(self.stream.carried, slowest)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s position: exactly when the processes and workers are as they were;
        otherwise a non-streamed split shares the rest out anew, and a streamed one raises DataError."""
        ranks, stream = state["ranks"], self.stream
        then = (ranks[0]["num_processes"], ranks[0]["num_workers"])
        now = (stream.num_processes, max(1, self.num_workers))
        stream.carried = _unpack_carried(state.get("carried", {}))
        if any(len(c["consumed"]) != stream.epoch_length() for c in stream.carried.values()):
            raise DataError(f"{stream.cfg.source} [{stream.split}] has {stream.epoch_length()} rows now, not as many as "
                            "when the data position was saved: resume on the same data")
        if then != now:
            self._reshard(ranks, then, now)
            return
        saved = next(s for s in ranks if s["process_index"] == stream.process_index)
        stream.first_epoch = saved["first_epoch"]
        self.positions = {int(w): tuple(p) for w, p in saved["positions"].items()}
        self.batches = saved["batches"]
        self.stats = BadRowStats.from_dict(saved["stats"])

    def _reshard(self, ranks: list[dict], then: tuple[int, int], now: tuple[int, int]) -> None:
        stream = self.stream
        how = f"resume with {layout_text(*then)} (--set data.num_workers={then[1]})"
        if hasattr(stream.table, "num_shards"):
            raise DataError(f"data.streaming: the data position was saved with {layout_text(*then)}, now "
                            f"{layout_text(*now)}; a stream's rows cannot be shared out anew: {how}")
        if sorted(s["process_index"] for s in ranks) != list(range(then[0])):
            raise DataError(f"the data position lacks some of its {then[0]} processes' positions: {how}")
        first, stream.carried = _carry_over(ranks, stream.carried, stream.epoch_length())
        stream.first_epoch = ranks[0]["first_epoch"]
        self.positions = {w: (first, 0, 0) for w in range(now[1])}
        self.batches = max(s["batches"] for s in ranks)
        self.stats = BadRowStats()
        if stream.process_index == 0:  # the bad-row counts live on, once
            for saved in ranks:
                self.stats.merge(saved["stats"])
        self.resharded_from = then


def layout_text(processes: int, workers: int) -> str:
    """E.g. "2 processes x 1 worker"."""
    return f"{processes} process{'es' * (processes != 1)} x {workers} worker{'s' * (workers != 1)}"


def _carry_over(ranks: list[dict], carried: dict[int, dict], n_rows: int) -> tuple[int, dict[int, dict]]:
    """(the first epoch not yet delivered whole, every unfinished epoch's delivered rows): the positions saved by
    each slot of the old layout, which took `left[slot::slots]` of each epoch's positions still `left`, turned
    into sets that any layout can share the rest of."""
    slots = [slot for saved in ranks for slot in _slot_positions(saved)]
    first = min(s[2] for s in slots)
    out = {}
    for e in range(first, max([s[2] for s in slots] + list(carried)) + 1):
        consumed = carried[e]["consumed"].copy() if e in carried else np.zeros(n_rows, bool)
        partial = dict(carried[e]["partial"]) if e in carried else {}
        left = np.flatnonzero(~consumed)
        for slot, n_slots, epoch, r, sub in slots:
            mine = left[slot::n_slots]
            delivered = len(mine) if epoch > e else r if epoch == e else 0
            consumed[mine[:delivered]] = True
            if epoch == e and sub:
                partial[int(mine[r])] = sub
        out[e] = {"consumed": consumed, "partial": {p: c for p, c in partial.items() if not consumed[p]}}
    return first, out


def _slot_positions(saved: dict) -> Iterator[tuple[int, int, int, int, int]]:
    """(slot, slots, epoch, row, caption) for each worker of one process's saved state, where it stopped."""
    workers = saved["num_workers"]
    for w in range(workers):
        epoch, r, sub = saved["positions"].get(str(w), (saved["first_epoch"], 0, 0))
        yield saved["process_index"] * workers + w, saved["num_processes"] * workers, epoch, r, sub


def _pack_carried(carried: dict[int, dict], slowest: int) -> dict:
    """JSON-safe: a bit per position; epochs every worker has left behind are dropped."""
    return {str(e): {"rows": len(c["consumed"]), "partial": {str(p): s for p, s in c["partial"].items()},
                     "consumed": base64.b64encode(np.packbits(c["consumed"]).tobytes()).decode()}
            for e, c in carried.items() if e >= slowest}


def _unpack_carried(data: dict) -> dict[int, dict]:
    def bits(c: dict) -> np.ndarray:
        return np.unpackbits(np.frombuffer(base64.b64decode(c["consumed"]), np.uint8))[: c["rows"]].astype(bool)

    return {int(e): {"consumed": bits(c), "partial": {int(p): s for p, s in c["partial"].items()}}
            for e, c in data.items()}


# ---- entry points ---------------------------------------------------------------------------------------------------

def build_dataset(cfg: DataConfig, split: str, *, train: bool, image_size: int,
                  stats: BadRowStats | None = None, seed: int = 0, num_processes: int = 1, process_index: int = 0,
                  epochs: int | None = 1, holdout: Holdout | None = None, per_image: bool = False) -> CaptionStream:
    """The examples of `split` for this process (see CaptionStream); `epochs=None` runs forever; `holdout`: the
    images a training stream skips and a held-out stream reads; `per_image`: training examples one per image with
    all its references."""
    transform = build_transform(train=train, image_size=image_size, crop_scale_min=cfg.crop_scale_min,
                                randaugment=cfg.randaugment, hflip=cfg.hflip)
    return CaptionStream(cfg, split, train=train, transform=transform, seed=seed, num_processes=num_processes,
                         process_index=process_index, epochs=epochs, stats=stats, holdout=holdout,
                         per_image=per_image)


def build_dataloader(cfg: DataConfig, split: str, *, train: bool, batch_size: int, image_size: int,
                     tokenizer=None, prompt: str = "", max_length: int = 40, seed: int = 0, num_processes: int = 1,
                     process_index: int = 0, stats: BadRowStats | None = None, epochs: int | None = None,
                     num_workers: int | None = None, pin_memory: bool = False,
                     holdout: Holdout | None = None, per_image: bool = False) -> CaptionLoader:
    """Training (`train=True`, endless unless `epochs`) or held-out batches for this process. Do not hand the
    result to `accelerator.prepare`: it is sharded already (module docstring). `pin_memory` (for a CUDA device):
    batches arrive in page-locked memory, so `.to(device, non_blocking=True)` copies them asynchronously.
    `holdout`: images set aside for validation (training skips them, a held-out loader reads only them).
    `per_image`: training batches as held-out ones (EvalCollate: images with all their references), for SCST."""
    if train and tokenizer is None:
        raise ValueError("a training loader needs the tokenizer")
    stream = build_dataset(cfg, split, train=train, image_size=image_size, seed=seed,
                           num_processes=num_processes, process_index=process_index, epochs=epochs,
                           holdout=holdout, per_image=per_image)
    collate = make_collate(tokenizer, prompt, max_length) if train and not per_image else EvalCollate()
    workers = cfg.num_workers if num_workers is None else num_workers
    return CaptionLoader(stream, batch_size=batch_size, collate=collate, num_workers=workers, seed=seed,
                         stats=stats, pin_memory=pin_memory)


def iter_captions(cfg: DataConfig, split: str, limit: int | None = None, holdout: Holdout | None = None
                  ) -> Iterator[str]:
    """The cleaned captions of `split` in stored order (images not decoded), e.g. to train a tokenizer; without
    those of the images `holdout` sets aside for validation (training never sees them)."""
    rows = iter_table(open_split(cfg, split), split)
    yield from _usable_captions(itertools.islice(rows, limit), cfg, image_root(cfg), holdout)


def _usable_captions(rows: Iterator[tuple[str, dict]], cfg: DataConfig, root: str | None,
                     holdout: Holdout | None) -> Iterator[str]:
    """The cleaned captions of (label, raw) rows outside `holdout`, images not decoded; a bad row gives none."""
    for label, raw in rows:
        try:
            row = parse_row(raw, cfg, label, root)  # images: not needed
            captions = clean_captions(row.captions, cfg.max_words) if holdout is None or row not in holdout else []
        except BadRow:
            continue
        yield from captions


def check(cfg: DataConfig, split: str, *, tokenizer=None, image_size: int = 224, prompt: str = "",
          max_length: int = 40, limit: int | None = None, vocab_size: int = 2000, progress=None) -> dict:
    """Read a split in stored order and report: rows, ok, bad, bad_reasons, examples, images (distinct), caption
    words, tokenizer coverage (`unk_rate`; with no tokenizer, one is trained on these captions) and the
    decode + eval-transform speed in images/s. Captions cut short are counted: `over_max_words` (by cleaning, at
    data.max_words), `over_max_length` (by the tokenizer, at `max_length` tokens with the prompt: what the model
    trains on) and `truncated` (either). Source rows are counted as stored (held-out rows ungrouped).
    `progress`: a tqdm bar advanced by each row read."""
    from med_train.tokenizer import train_tokenizer

    transform = build_transform(train=False, image_size=image_size)
    stats, captions, keys, seconds, root = BadRowStats(), [], set(), 0.0, image_root(cfg)
    cut = []  # per caption: whether cleaning cut it to data.max_words
    for n, (label, raw) in enumerate(iter_table(open_split(cfg, split), split)):
        if limit is not None and n >= limit:
            break
        row = parse_row(raw, cfg, label, root)
        stats.rows += 1
        if progress is not None:
            progress.update()
        try:
            texts = clean_captions(row.captions, None)  # uncut, to count the captions that cleaning cuts
            start = time.perf_counter()
            transform(load_image(row.image, max_pixels=cfg.max_image_pixels))
            seconds += time.perf_counter() - start
        except BadRow as exc:
            stats.add_bad(row.id, exc.reason, str(exc))
            continue
        cut += [len(t.split()) > cfg.max_words for t in texts]
        captions += [" ".join(t.split()[: cfg.max_words]) for t in texts]
        keys.add(image_key(row))
    report = {"source": cfg.source, "split": split, "format": detect_format(cfg), **stats.to_dict(),
              "images": len(keys), "captions": len(captions), "over_max_words": sum(cut),
              "words": _spread([len(c.split()) for c in captions]),
              "vocabulary": len({w for c in captions for w in c.split()}),
              "images_per_s": round(stats.ok / seconds, 1) if seconds else None}
    if captions:
        report["tokenizer"] = getattr(tokenizer, "name_or_path", None) or "trained on these captions"
        tokenizer = tokenizer or train_tokenizer([prompt + c for c in captions], vocab_size)
        pieces = [t for ids in tokenizer(captions, add_special_tokens=False)["input_ids"] for t in ids]
        report["unk_rate"] = round(sum(t == tokenizer.unk_token_id for t in pieces) / max(1, len(pieces)), 5)
        lengths = [len(ids) for ids in tokenizer([prompt + c for c in captions])["input_ids"]]
        report["tokens"] = _spread(lengths)
        report["over_max_length"] = sum(n > max_length for n in lengths)
        report["truncated_fraction"] = round(report["over_max_length"] / len(lengths), 5)
        report["truncated"] = sum(w or n > max_length for w, n in zip(cut, lengths, strict=True))
    return report


def _spread(values: list[int]) -> dict:
    if not values:
        return {}
    array = np.asarray(values)
    return {"min": int(array.min()), "mean": round(float(array.mean()), 2), "p50": float(np.median(array)),
            "p95": float(np.percentile(array, 95)), "max": int(array.max())}
