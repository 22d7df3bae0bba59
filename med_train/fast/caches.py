"""Decoding caches that save work or launches, each a `cache.DecoderCache` answering the same calls:

- `FastDecoderCache`: attends by the CPU's measured routes (`attention.attend`), keeps the image K/V in the layout
  the few-row kernel reads, and, made by `folding` (a CPU decode that asks each image few queries), keeps the
  image tokens themselves, with the key and value projections folded into the queries (`folded_cross_attention`);
- `HistoryCache` (CPU, fp32, where the few-row kernel is built): writes each step's self-attention K/V once, where
  they were computed, and follows the beams' reordering in a table of stored rows (`Lineage`) instead of copying
  every layer's K/V;
- `StaticDecoderCache` (GPU): keeps every tensor in place (self-attention K/V in preallocated slots, written at a
  device-side position), so that a decoding step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from med_train.cache import DecoderCache, attend_per_image
from med_train.fast import few_rows
from med_train.fast.attention import _cpu_inference, attend, folded_cross_attention, kernel_keys

STEPS_ONLY = "takes decoding steps: one token per row, no masks, no images"


@dataclass(frozen=True)
class ImageTokens:
    """A folding cache's cross-attention entry: the image tokens (B_img, N, E) as the vision model gave them; each
    layer's attention folds its key and value projections into the queries (`folded_cross_attention`). Where the
    few-row kernel runs the folded products, the tokens are also kept in its layout, once for all layers and
    steps: `panels()`."""

    tokens: torch.Tensor
    _panels: tuple | None = field(default=None, repr=False, compare=False)

    def panels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`few_rows.pack` of the tokens transposed (B_img, E, N), for the scores, and of the tokens (B_img, N, E),
        for the mix: made at the first call."""
        if self._panels is None:  # a cache of the frozen entry's tokens, made once
            panels = (few_rows.pack(self.tokens.transpose(1, 2)), few_rows.pack(self.tokens))
            object.__setattr__(self, "_panels", panels)
        return self._panels

    def select(self, images: torch.Tensor) -> ImageTokens:
        """These images' tokens (and panels, if made), in that order."""
        panels = None if self._panels is None else tuple(p.index_select(0, images) for p in self._panels)
        return ImageTokens(self.tokens.index_select(0, images), panels)


class FastDecoderCache(DecoderCache):
    """A `DecoderCache` whose attention takes the CPU's faster routes where they apply (`attention.attend`; the
    module's own elsewhere), and whose projected image K/V are kept as those routes read them (`kernel_keys`).
    Made by `folding`, every layer's cross-attention entry is the one `ImageTokens`: the image tokens themselves,
    never projected."""

    @classmethod
    def folding(cls, image_embeds: torch.Tensor, num_layers: int) -> FastDecoderCache:
        """An empty cache whose cross-attention will attend to `image_embeds` (B_img, N, E) through
        `folded_cross_attention` in every layer, instead of projecting them to K/V. For decoding (no dropout)."""
        return cls(cross_kv=[ImageTokens(image_embeds)] * num_layers)

    def self_attention(self, module, query, key, value, attention_mask=None, is_causal: bool = False):
        key, value = self.update(key, value, module.layer_idx)
        return attend(module, query, key, value, attention_mask, is_causal)

    def cross_attention(self, module, query, encoder_hidden_states, attention_mask=None):
        entry = self.image_entry(module, encoder_hidden_states)
        if isinstance(entry, ImageTokens):  # the image tokens, to attend with the projections folded in
            def folded(query, tokens, _, mask):
                return folded_cross_attention(query, entry, module.key, module.value, mask)

            return attend_per_image(folded, query, entry.tokens, entry.tokens, attention_mask)
        return attend(module, query, *entry, attention_mask)

    def keep_image_kv(self, key, value):  # decoding keeps these for every step, laid out as its attention reads them
        return kernel_keys(key, value) if _cpu_inference(key) else (key, value)

    def image_entries_of(self, images: torch.Tensor) -> list:
        if self.cross_kv and isinstance(self.cross_kv[0], ImageTokens):  # folding: one entry for all layers
            return [self.cross_kv[0].select(images)] * len(self.cross_kv)
        return [(_select_images(k, images), _select_images(v, images)) for k, v in self.cross_kv]


def _select_images(kv: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """`kv.index_select(0, images)` in kv's own memory layout, where it is a permutation of a dense tensor (the
    kernel's cross keys are stored transposed and its values as projected: `kernel_keys`)."""
    order = sorted(range(kv.dim()), key=lambda d: -kv.stride(d))  # dimensions as laid out, outermost first
    dense = kv.permute(order)
    if kv.is_contiguous() or not dense.is_contiguous():
        return kv.index_select(0, images)
    return dense.index_select(order.index(0), images).permute([order.index(d) for d in range(kv.dim())])


class Slots(NamedTuple):
    """A `StaticDecoderCache`'s self-attention entry for one layer: preallocated key and value buffers
    (R, heads, capacity, head_dim), into which each step writes its K/V at `position` ((1,) long)."""

    key: torch.Tensor
    value: torch.Tensor
    position: torch.Tensor


class StaticDecoderCache(FastDecoderCache):
    """A decoding cache whose tensors never move or change shape, so that a decoding step can be captured in a CUDA
    graph and replayed (`decode`). Self-attention K/V live in `Slots` of `capacity` positions: a step writes its
    token's K/V at `position` (a device tensor, not a Python int: the replayed graph reads it) and attends over all
    of them with a mask that hides the positions after it. Cross-attention K/V and their mask are copied into
    buffers of their own. Make one with `like`, fill it with `load`, reorder its rows in place with `reorder`."""

    def __init__(self, self_kv, cross_kv, cross_mask, position: torch.Tensor):
        super().__init__(self_kv=self_kv, cross_kv=cross_kv, cross_mask=cross_mask)
        self.position = position
        self.capacity = self_kv[0].key.shape[2]

    @classmethod
    def like(cls, cache: DecoderCache, rows: int, capacity: int) -> StaticDecoderCache:
        """Empty buffers for `rows` text rows and `capacity` positions, shaped after `cache` (a prefilled
        `DecoderCache` with projected cross K/V)."""
        position = torch.zeros(1, dtype=torch.long, device=cache.self_kv[0][0].device)
        self_kv = []
        for key, value in cache.self_kv:
            shape = (rows, key.shape[1], capacity, key.shape[3])
            self_kv.append(Slots(key.new_zeros(shape), value.new_zeros(shape), position))
        cross_kv = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in cache.cross_kv]
        cross_mask = None if cache.cross_mask is None else torch.zeros_like(cache.cross_mask)
        return cls(self_kv, cross_kv, cross_mask, position)

    def fits(self, cache: DecoderCache, rows: int, capacity: int) -> bool:
        """Whether these buffers are the ones `like(cache, rows, capacity)` would make."""
        def alike(a, b):
            return a is None and b is None or (a is not None and b is not None and a.shape == b.shape
                                               and a.dtype == b.dtype and a.device == b.device)

        key, slot = cache.self_kv[0][0], self.self_kv[0].key
        return (len(cache.self_kv) == len(self.self_kv) and len(cache.cross_kv) == len(self.cross_kv)
                and slot.shape == (rows, key.shape[1], capacity, key.shape[3])
                and slot.dtype == key.dtype and slot.device == key.device
                and all(alike(a, b) for a, b in zip(self.cross_kv[0], cache.cross_kv[0], strict=True))
                and alike(self.cross_mask, cache.cross_mask))

    def load(self, cache: DecoderCache, rows: torch.Tensor | None = None) -> None:
        """Copy a prefilled `cache` in: its self K/V (text `rows` of it, e.g. each image's row k times for k beams;
        all when None) at positions 0..T-1, its cross K/V and mask; the next token goes at position T."""
        length = len(cache)
        for slots, (key, value) in zip(self.self_kv, cache.self_kv, strict=True):
            slots.key[:, :, :length].copy_(key if rows is None else key.index_select(0, rows))
            slots.value[:, :, :length].copy_(value if rows is None else value.index_select(0, rows))
        for (key, value), (new_key, new_value) in zip(self.cross_kv, cache.cross_kv, strict=True):
            key.copy_(new_key)
            value.copy_(new_value)
        if self.cross_mask is not None:
            self.cross_mask.copy_(cache.cross_mask)
        self.position.fill_(length)

    def __len__(self) -> int:
        raise TypeError("a StaticDecoderCache's length is a device tensor (`position`), not a Python int")

    def __bool__(self) -> bool:  # `if cache:` must not reach __len__
        return True

    def update(self, key, value, layer_idx):
        """Write this step's K/V (R, nh, 1, hs) in layer `layer_idx`'s slots at `position`; return all the slots
        (`self_attention_mask` hides those after it)."""
        slots = self.self_kv[layer_idx]
        slots.key.index_copy_(2, slots.position, key.to(slots.key.dtype))
        slots.value.index_copy_(2, slots.position, value.to(slots.value.dtype))
        return slots.key, slots.value

    def cross_attention(self, module, query, encoder_hidden_states, attention_mask=None):
        if encoder_hidden_states is not None:
            raise ValueError(f"a StaticDecoderCache {STEPS_ONLY}")
        return super().cross_attention(module, query, encoder_hidden_states, attention_mask)

    def position_ids(self, seq_length: int, device: torch.device) -> torch.Tensor:
        if seq_length != 1:
            raise ValueError(f"a StaticDecoderCache {STEPS_ONLY}")
        return self.position.view(1, 1)

    def self_attention_mask(self, attention_mask, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask (1, 1, 1, capacity) of a step at `position`: the positions after it are hidden."""
        if attention_mask is not None:
            raise ValueError(f"a StaticDecoderCache {STEPS_ONLY}")
        later = torch.arange(self.capacity, device=self.position.device) > self.position
        return torch.zeros(self.capacity, dtype=dtype, device=later.device).masked_fill(
            later, torch.finfo(dtype).min)[None, None, None]

    def reorder(self, index: torch.Tensor) -> None:
        """Select text rows (beam reordering), in place."""
        for slots in self.self_kv:
            slots.key.copy_(slots.key.index_select(0, index))
            slots.value.copy_(slots.value.index_select(0, index))

    def keep_images(self, images: torch.Tensor, rows: torch.Tensor) -> None:
        raise TypeError("a StaticDecoderCache keeps every image to the end (its shapes never change)")


@dataclass
class Lineage:
    """Where each text row's self-attention history lies in a `HistoryCache`, shared by all its layers: `source`
    (text rows, capacity), the stored row that holds text row r's K/V at position p, and `length`, the positions
    written. (The layers' entries point here, not at the cache: no reference cycle keeps a finished decode's
    memory alive until the garbage collector runs.)"""

    source: torch.Tensor
    length: int
    checked: tuple | None = None  # (length, stored rows, source): what `History.step_sources` last found in bounds

    def reorder(self, index: torch.Tensor) -> None:
        """Text row i continues text row index[i]'s history (beam reordering; fewer rows: images dropped)."""
        source = torch.arange(index.shape[0])[:, None].repeat(1, self.source.shape[1])
        source[:, : self.length] = self.source.index_select(0, index)[:, : self.length]
        self.source = source


class History(NamedTuple):
    """A `HistoryCache`'s self-attention entry for one layer: every position's K/V where it was computed, never
    moved: key and value (capacity, stored rows, heads, head_dim), and the cache's `Lineage`."""

    key: torch.Tensor
    value: torch.Tensor
    lineage: Lineage

    def step_sources(self, rows: int) -> tuple[int, torch.Tensor]:
        """For a step of `rows` text rows: the position it writes, and the stored row of each text row's history at
        positions 0 .. that one, (rows, position + 1); a clear error where the store is full or the lineage does
        not fit (the kernel would read outside the store)."""
        position = self.lineage.length
        if position >= self.key.shape[0] or rows > self.key.shape[1]:
            raise ValueError(f"the HistoryCache holds {self.key.shape[0]} positions of {self.key.shape[1]} rows; "
                             f"position {position} of {rows} rows asked")
        lineage, stored = self.lineage, self.key.shape[1]
        source = lineage.source[:, : position + 1]
        if source.shape[0] != rows:
            raise ValueError(f"the HistoryCache's lineage ({source.shape[0]} rows) does not fit {rows} tokens")
        checked = lineage.checked
        if checked is None or checked[0] != position or checked[1] != stored or checked[2] is not lineage.source:
            # once per step, not per layer: the layers share the lineage and its store's shape
            if int(source.min()) < 0 or int(source.max()) >= stored:
                raise ValueError(f"the HistoryCache's lineage points outside its {stored} stored rows")
            lineage.checked = (position, stored, lineage.source)
        return position, source

    def attend(self, query, key, value, attention_mask) -> torch.Tensor:
        """Write this step's key and value (R, nh, 1, hs) at position `length` and attend the query (R, nh, 1, hs)
        over positions 0 .. length of each text row's history: (R, nh, 1, hs)."""
        if query.shape[2] != 1 or attention_mask is not None:
            raise ValueError("a HistoryCache takes decoding steps: one token per row, no attention mask")
        rows = query.shape[0]
        position, source = self.step_sources(rows)
        self.key[position, :rows].copy_(key[:, :, 0])
        self.value[position, :rows].copy_(value[:, :, 0])
        return few_rows._attend_history(query[:, :, 0].contiguous(), self.key, self.value, source,
                                        query.shape[-1] ** -0.5)[:, :, None]


class HistoryCache(FastDecoderCache):
    """A CPU decoding cache whose self-attention K/V are written once, where they were computed, and never copied:
    instead of reordering every layer's K/V when beams are reordered (and growing them with a copy each step), it
    reorders its `Lineage`. A step writes its K/V at position `length` in stored rows 0 .. R-1 and attends there
    through `few_rows.attend_history`. Cross K/V and mask are the prefilled cache's. Make one with `following`.

    The bench's beam-3 decode: a layer's step of self-attention 0.58 ms (the growing cache's copy, the beams'
    reordering and two products) -> 0.26 ms (the kernel 0.17 ms, the rest writing K/V and Python)."""

    def __init__(self, self_kv, cross_kv, cross_mask, lineage: Lineage):
        super().__init__(self_kv=self_kv, cross_kv=cross_kv, cross_mask=cross_mask)
        self.lineage = lineage

    @classmethod
    def following(cls, cache: DecoderCache, rows: torch.Tensor, capacity: int) -> HistoryCache:
        """The prefilled `cache` (its prompt K/V, one row per image) continued for text `rows` (the image of each:
        e.g. each image k times for k beams), with room for `capacity` positions in all."""
        length = len(cache)
        capacity = max(capacity, length)  # a prompt as long as the caption's limit: no step will follow
        source = torch.arange(rows.shape[0])[:, None].repeat(1, capacity)
        source[:, :length] = rows[:, None]
        lineage = Lineage(source, length)
        stored = max(rows.shape[0], cache.self_kv[0][0].shape[0])
        self_kv = []
        for key, value in cache.self_kv:  # (B_img, nh, P, hs) -> positions first; unwritten slots are never read
            b, nh, _, hs = key.shape
            keys, values = (key.new_empty(capacity, stored, nh, hs) for _ in range(2))
            keys[:length, :b].copy_(key.permute(2, 0, 1, 3))
            values[:length, :b].copy_(value.permute(2, 0, 1, 3))
            self_kv.append(History(keys, values, lineage))
        return cls(self_kv, cache.cross_kv, cache.cross_mask, lineage)

    def __len__(self) -> int:
        return self.lineage.length

    def update(self, key, value, layer_idx):
        raise TypeError("a HistoryCache attends where it keeps its K/V (`self_attention`): it hands none out")

    def self_attention(self, module, query, key, value, attention_mask=None, is_causal: bool = False):
        return self.self_kv[module.layer_idx].attend(query, key, value, attention_mask)

    def advance(self, tokens: int) -> None:
        self.lineage.length += tokens

    def reorder(self, index: torch.Tensor) -> None:
        self.lineage.reorder(index)
