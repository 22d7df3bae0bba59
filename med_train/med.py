"""The multimodal BERT ("MED") of BLIP: every layer has self-attention, then cross-attention from the text to the
image tokens, then the feed-forward block. `BertLMHeadModel` is the caption decoder.

This follows the seed (a walk-through of BLIP's `models/med.py`): same class names, forward signatures and
state-dict names, so BLIP's released weights and transformers' `BlipTextLMHeadModel` weights load unchanged. What
differs from BLIP's code, on purpose:
- attention runs through `F.scaled_dot_product_attention` (fused), equal in value to matmul/softmax/mask, except
  in CPU decoding: cross-attention in fp32 runs in the few-row kernel's fused attention (`few_rows.attend`, over
  keys stored transposed), and a step's few self-attention queries through two products (`few_query_attention`);
- a `DecoderCache` keeps self-attention K/V (grown one step at a time) and cross-attention K/V (computed once per
  image for the whole decode; a query batch that is a multiple of the image batch, e.g. beams, shares them
  without copies), or, when a CPU decode asks each image few queries (greedy), the image tokens themselves, with
  the key and value projections folded into the queries (`folded_cross_attention`);
- for decoding on the CPU (fp32, where the few-row kernel is built), a `HistoryCache` writes each step's
  self-attention K/V once, where they were computed, and follows the beams' reordering in a table of stored rows
  (`Lineage`) instead of copying every layer's K/V;
- for decoding on a GPU, a `StaticDecoderCache` keeps every tensor in place (self-attention K/V in preallocated
  slots, written at a device-side position), so that a decoding step can be captured in a CUDA graph;
- gradient checkpointing works;
- with labels, the LM head runs only where there is a target (`output_logits=False` skips the full logits), and
  then the layers run on the real tokens only (`Packing`: padding is neither computed nor kept for backward);
- with labels, the tied word embeddings' lookup has a sparse gradient, which the LM head's dense one absorbs in
  place (`TiedTable`: no zero-filled vocabulary-sized gradient is made per step, nor a copy of the head's).

    config = med_config(vocab_size=30524, encoder_width=768)  # a transformers.BertConfig
    decoder = BertLMHeadModel(config)
    out = decoder(input_ids, attention_mask, encoder_hidden_states=image_embeds, labels=labels)
    out.loss, out.logits
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig

from med_train import few_rows
from med_train.ops import Linear, ReleasesPackedOnTrain, gelu_linear, kept_copy, linear


def med_config(**kwargs) -> BertConfig:
    """A BertConfig carrying BLIP's extra keys: `encoder_width` (image-token width), `add_cross_attention`."""
    kwargs.setdefault("encoder_width", 768)
    kwargs.setdefault("add_cross_attention", True)
    kwargs.setdefault("hidden_act", "gelu")
    return BertConfig(**kwargs)


@dataclass(frozen=True)
class ImageTokens:
    """A folding `DecoderCache`'s cross-attention entry: the image tokens (B_img, N, E) as the vision model gave
    them; each layer's attention folds its key and value projections into the queries (`folded_cross_attention`).
    Where the few-row kernel runs the folded products, the tokens are also kept in its layout, once for all layers
    and steps: `panels()`."""

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


@dataclass
class DecoderCache:
    """Key/value cache for step-by-step decoding.

    `self_kv[i]`: layer i's self-attention (K, V), each (B, heads, T_past, head_dim), grown by one step per token.
    `cross_kv[i]`: layer i's cross-attention (K, V), each (B_img, heads, N_img, head_dim), computed once per image;
    or, in a cache made by `DecoderCache.folding` (CPU decoding that asks each image few queries), every layer's
    entry is the one `ImageTokens`: the image tokens themselves, never projected (see `folded_cross_attention`).
    The text batch may be `B_img * k` rows (k beams or samples per image, image-major): cross K/V are shared.
    `cross_mask`: the image tokens' additive mask (B_img, 1, 1, N_img) the cross K/V were made with, or None; the
    steps after it attend with it.
    """

    self_kv: list = field(default_factory=list)
    cross_kv: list = field(default_factory=list)
    cross_mask: torch.Tensor | None = None

    @classmethod
    def folding(cls, image_embeds: torch.Tensor, num_layers: int) -> DecoderCache:
        """An empty cache whose cross-attention will attend to `image_embeds` (B_img, N, E) through
        `folded_cross_attention` in every layer, instead of projecting them to K/V. For decoding (no dropout)."""
        return cls(cross_kv=[ImageTokens(image_embeds)] * num_layers)

    def __len__(self) -> int:  # tokens already cached
        return 0 if not self.self_kv or self.self_kv[0] is None else self.self_kv[0][0].shape[2]

    def advance(self, tokens: int) -> None:
        """Called after a forward over `tokens` new positions (a cache whose length is not its tensors' counts)."""

    def reorder(self, index: torch.Tensor) -> None:
        """Select text rows (beam reordering / expansion); cross K/V are per image and never move."""
        self.self_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.self_kv]

    def keep_images(self, images: torch.Tensor, rows: torch.Tensor) -> None:
        """Keep only `images` (indices into the image batch) and their text `rows`, in that order: decoding goes on
        without the images that are finished."""
        self.reorder(rows)
        if self.cross_kv and isinstance(self.cross_kv[0], ImageTokens):  # a folding cache: one entry for all layers
            self.cross_kv = [self.cross_kv[0].select(images)] * len(self.cross_kv)
        else:
            self.cross_kv = [(_select_images(k, images), _select_images(v, images)) for k, v in self.cross_kv]
        if self.cross_mask is not None:
            self.cross_mask = self.cross_mask.index_select(0, images)


def _select_images(kv: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """`kv.index_select(0, images)` in kv's own memory layout, where it is a permutation of a dense tensor (the
    kernel's cross keys are stored transposed and its values as projected: `_kernel_keys`)."""
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


class StaticDecoderCache(DecoderCache):
    """A `DecoderCache` whose tensors never move or change shape, so that a decoding step can be captured in a CUDA
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

    def self_attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask (1, 1, 1, capacity) of a step at `position`: the positions after it are hidden."""
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
        source = self.lineage.source[:, : position + 1]
        if source.shape[0] != rows or int(source.min()) < 0 or int(source.max()) >= self.key.shape[1]:
            raise ValueError(f"the HistoryCache's lineage ({source.shape[0]} rows) does not fit {rows} tokens and "
                             f"{self.key.shape[1]} stored rows")
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


class HistoryCache(DecoderCache):
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

    def advance(self, tokens: int) -> None:
        self.lineage.length += tokens

    def reorder(self, index: torch.Tensor) -> None:
        self.lineage.reorder(index)


def history_pays(decoder: nn.Module, image_embeds: torch.Tensor) -> bool:
    """Whether a decode continues its prompt in a `HistoryCache`: CPU inference in fp32 (no autocast), a decoder
    in eval mode (no attention dropout), where the few-row kernel is built."""
    return (not decoder.training and _cpu_inference(image_embeds) and image_embeds.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and few_rows.available())


def cpu_savings_pay(device: torch.device) -> bool:
    """Whether the training forward skips the decoder's padding (`Packing`) and makes the word embeddings'
    gradient sparse. Both save work on the CPU; on a GPU, where a BERT-base decoder at BLIP's batch sizes is bound
    by kernel launches rather than by arithmetic, they cost more than they save (an H100, batch 32 at 384 px, bf16:
    83 ms a step without either, 90 ms with both; see the README's Speed section)."""
    return torch.device(device).type == "cpu"


@dataclass
class Packing:
    """Where the real tokens of a right- or left-padded (B, T) batch are. With a packing, the decoder layers run their
    per-token work (projections, feed-forward, LayerNorms) on the N real tokens only, as (N, H); attention scatters
    them back to (B, T) with zeros at the padding, which the attention mask hides. Exact for every real token:
    padding is never a key, and its own outputs are dropped. In BLIP-length batches a third of the slots are
    padding."""

    index: torch.Tensor  # (N,) flat positions b * T + t of the real tokens
    batch: int
    length: int

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> Packing:
        return cls(attention_mask.flatten().nonzero().squeeze(1), *attention_mask.shape)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)"""
        return x.flatten(0, 1).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at the padding."""
        rest = x.shape[1:]
        return x.new_zeros(self.batch * self.length, *rest).index_copy(0, self.index, x).view(
            self.batch, self.length, *rest)


@dataclass
class BertModelOutput:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    cache: DecoderCache | None = None


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: DecoderCache | None = None


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm, dropout (no token types, as in BLIP)."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=False)

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, past_key_values_length: int = 0,
                sparse_grad: bool = False, word_weight: torch.Tensor | None = None):
        """`sparse_grad=True`: the word embeddings' gradient is the looked-up rows only, not a dense (vocab, H)
        tensor. For a table tied to an LM head that is in the same loss, look up in `word_weight`, the lookup's
        alias of the table from `TiedTable`: the head's dense gradient takes those rows in place, so neither the
        zero-filled table-sized gradient nor the sum of the two is ever made."""
        seq_length = (input_ids if input_ids is not None else inputs_embeds[..., 0]).shape[1]
        if position_ids is None:  # positions continue after the cached tokens
            position_ids = self.position_ids[:, past_key_values_length : past_key_values_length + seq_length]
        if inputs_embeds is None:
            table = self.word_embeddings
            weight = table.weight if word_weight is None else word_weight
            inputs_embeds = F.embedding(input_ids, weight, table.padding_idx, sparse=sparse_grad)
        embeddings = inputs_embeds + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class TiedTable(torch.autograd.Function):
    """The word embeddings' table, tied to the LM head, handed out as two aliases, (lookup's, head's), so that the
    two gradients meet here and not in autograd's own accumulation, which adds a sparse gradient to a dense one by
    copying the dense one: a vocabulary-sized copy every step (30524 x 768: about 40 ms of a CPU training step,
    profiled). Here the lookup's sparse rows are added into the head's dense gradient in place."""

    @staticmethod
    def forward(ctx, weight):
        ctx.set_materialize_grads(False)
        return weight.view_as(weight), weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_lookup, grad_head):
        if grad_head is None or grad_lookup is None:
            return grad_lookup if grad_head is None else grad_head
        if not grad_head.is_contiguous():  # not a product's fresh output: leave it be
            return grad_head + grad_lookup
        return grad_head.add_(grad_lookup)  # the head's gradient is this node's alone: it came from its product


# Below this many queries per key/value set (a decoding step: 1 per image, or its beams folded in), CPU inference
# attends with two matrix products instead of SDPA's kernel, which is slower there (12 cross-attention layers
# over ViT-B's 197 image tokens, batch 8: one query 10 -> 7.5 ms, three 16 -> 14 ms; equal from four).
FEW_QUERIES = 4


def _cpu_inference(x: torch.Tensor) -> bool:
    """No autograd graph is recorded and `x` is on the CPU: decoding there, where the cached image K/V are copied
    once into the layout their attention reads (`_kernel_keys`), a step's few queries attend through
    `few_query_attention` or `few_rows.attend`, and the image projections may be folded (`folding_pays`): all
    measured on the CPU only."""
    return x.device.type == "cpu" and not torch.is_grad_enabled()


def few_query_attention(query, key, value, attention_mask=None):
    """softmax(q k^T / sqrt(d) + mask) v as two batched products, the softmax in fp32 (as SDPA accumulates).
    query (B, nh, T, hs), key/value (B, nh, S, hs), attention_mask an additive bias broadcastable to (B, nh, T, S)."""
    hs = query.shape[-1]
    scores = torch.matmul(query * hs**-0.5, key.transpose(-1, -2))
    if attention_mask is not None:
        scores = scores + attention_mask
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(value.dtype), value)


def _kernel_keys(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention K/V (B_img, nh, S, hs), heads of the projections' rows, to keep for a CPU decode. Where the
    few-row kernel attends (`_attends_in_kernel`, fp32): the keys stored transposed, each head's keys as hs rows of
    S (the returned tensor is that memory seen as (B_img, nh, S, hs)), and the values as projected (the kernel
    reads each head's rows at their stride, fetching the next head's as it goes: as fast as a contiguous copy,
    which took about 10 ms of the bench's beam-3 decode). Elsewhere both contiguous, which makes each step's read
    of them sequential (a greedy step's cross-attention, ViT-B image tokens: 17 -> 10 ms with bmm)."""
    if key.dtype == value.dtype == torch.float32 and few_rows.available():
        return key.transpose(-1, -2).contiguous().transpose(-1, -2), value
    return key.contiguous(), value.contiguous()


def _attends_in_kernel(query, key, value, attention_mask) -> bool:
    """Whether `few_rows.attend` takes this cross-attention: CPU inference in fp32 over keys that `_kernel_keys`
    stored transposed. The bench's beam-3 decode (8 images, 3 beams, ViT-B/16 tokens), a layer's step: 0.69 ms
    against 0.75 with the keys and values packed for two few-row products (and their packing once per decode),
    1.7 with matmul; the data (9.7 MB of K/V a layer) come from memory every step, which bounds it (0.37 ms)."""
    return (query.dtype == key.dtype == value.dtype == torch.float32 and key.transpose(-1, -2).is_contiguous()
            and (attention_mask is None or attention_mask.dtype == torch.float32)
            and _cpu_inference(query) and few_rows.available())


# A CPU decode folds the image projections into the queries (`DecoderCache.folding`) when its estimated cost is
# below this fraction of projecting K/V: per image and layer, projecting costs 2*N*E*H multiply-adds once; folding
# costs 2*(heads*N*E + E*H) per query row (prompt and steps, every beam), at a lower rate (batched products of a
# few rows). Measured on the bench's shapes (ViT-B/16 224 px tokens, BERT-base, batch 8, one thread), 12 layers'
# cross-attention over a decode of 15 steps: 1 row per step (0.39 of projecting's multiply-adds) 0.58 -> 0.36 s;
# 3 rows per step (1.02 of them) 0.83 -> 0.79 s.
FOLD_BELOW = 0.6


def folding_pays(config, image_embeds: torch.Tensor, rows_per_image: int) -> bool:
    """Whether a decode that asks each image's cross-attention `rows_per_image` queries in all (the prompt's
    tokens, then one per beam or sample each step) is cheaper folded (see FOLD_BELOW). Only in fp32 on the CPU,
    where it was measured: under bf16 autocast the projections run about twice as fast, and folding saved nothing
    (the bench's greedy decode 0.872 s projected, 0.878 s folded)."""
    if not (_cpu_inference(image_embeds) and image_embeds.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")):
        return False
    hidden, width, tokens = config.hidden_size, config.encoder_width, image_embeds.shape[1]
    projecting = tokens * width * hidden
    return rows_per_image * (config.num_attention_heads * tokens * width + width * hidden) < FOLD_BELOW * projecting


def folded_cross_attention(query, image: ImageTokens, key: nn.Linear, value: nn.Linear, attention_mask=None):
    """Cross-attention to image tokens that were never projected: with q_h the scaled query of head h and Wk_h, Wv_h
    its rows of the key and value weights, softmax(q_h (x Wk_h^T + bk_h)^T) (x Wv_h^T + bv_h) equals
    softmax((q_h Wk_h) x^T) x Wv_h^T + bv_h, since q_h bk_h shifts a query's scores alike (the softmax ignores it)
    and the probabilities sum to 1. So each query is carried to the image tokens' width, attends there, and comes
    back: the work grows with the queries instead of the image tokens (MLA's weight absorption).
    query (B_img, nh, T, hs), image.tokens x (B_img, N, E), attention_mask additive, broadcastable to
    (B_img, nh, T, N); returns (B_img, nh, T, hs) as SDPA would on the projected K/V. The softmax runs in fp32.
    In fp32 where the few-row kernel is built, its four products run there (`_folded_panels`), else as bmm."""
    b, nh, t, hs = query.shape
    tokens = image.tokens
    width = tokens.shape[-1]
    kernel = _folded_panels(query, image, key, value)

    def times(x, name: str, b):  # x @ b for b (batch, K, N): in the kernel with b's panels, else torch.bmm
        return few_rows.matmul(x, kernel[name], b.shape[-1]) if kernel else torch.bmm(x, b.to(x.dtype))

    heads_first = (query * hs**-0.5).transpose(0, 1).reshape(nh, b * t, hs)
    carried = times(heads_first, "carry", key.weight.view(nh, hs, width))  # (nh, B*T, E)
    carried = carried.view(nh, b, t, width).transpose(0, 1).reshape(b, nh * t, width)
    scores = times(carried, "scores", tokens.transpose(1, 2)).view(b, nh, t, -1)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = scores.softmax(-1, dtype=torch.float32).to(carried.dtype).view(b, nh * t, -1)
    mixed = times(probs, "mix", tokens)  # (B_img, nh*T, E): the image tokens each query sees
    mixed = mixed.view(b, nh, t, width).transpose(0, 1).reshape(nh, b * t, width)
    context = times(mixed, "back", value.weight.view(nh, hs, width).transpose(1, 2))  # (nh, B*T, hs)
    context = context.view(nh, b, t, hs).transpose(0, 1)
    return context if value.bias is None else context + value.bias.view(nh, 1, hs).to(context.dtype)


def _folded_panels(query, image: ImageTokens, key: nn.Linear, value: nn.Linear) -> dict | None:
    """The few-row kernel's panels for `folded_cross_attention`'s four products, or None where they run as bmm
    (not fp32, no kernel, or a weight's first use: see ops.kept_copy): per head h, Wk_h (hs, E) to carry and
    Wv_h^T (E, hs) to come back, kept with the weights; per image, the tokens transposed (E, N) for the scores and
    the tokens (N, E) for the mix, kept with the cache's `ImageTokens` for the decode.

    Measured on the bench's greedy decode (ViT-B/16 tokens, BERT-base, batch 8, one thread), a layer's four bmm
    take 0.34 + 0.69 + 0.62 + 0.33 ms a step with the weights and tokens cold in cache, about 40 GFLOP/s."""
    tokens = image.tokens
    if not (query.dtype == tokens.dtype == key.weight.dtype == value.weight.dtype == torch.float32
            and query.device.type == "cpu" and few_rows.available()):
        return None
    nh, hs = query.shape[1], query.shape[3]
    carry = kept_copy(key.weight, ("folded carry", nh), lambda w: few_rows.pack(w.view(nh, hs, -1)))
    back = kept_copy(value.weight, ("folded back", nh), lambda w: few_rows.pack(w.view(nh, hs, -1).transpose(1, 2)))
    if carry is None or back is None:
        return None
    scores, mix = image.panels()
    return {"carry": carry, "scores": scores, "mix": mix, "back": back}


class BertSelfAttention(nn.Module):
    """Multi-head attention. Self-attention when `encoder_hidden_states` is None, else cross-attention whose queries
    are text and whose keys/values are image tokens (projected from `encoder_width` to `hidden_size`)."""

    def __init__(self, config, is_cross_attention: bool):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = config.hidden_size
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = Linear(config.hidden_size, self.all_head_size)
        self.key = Linear(kv_width, self.all_head_size)
        self.value = Linear(kv_width, self.all_head_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.is_cross_attention = is_cross_attention

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                past_key_value=None, is_causal: bool = False, packing: Packing | None = None):
        """Returns (context (B, T, H), key/value pair to cache or None); with a `packing`, hidden states and
        context are the real tokens only, (N, H).

        `attention_mask` is an additive bias broadcastable to (B, nh, T, S), or None. `past_key_value` holds the
        cached (K, V): for self-attention the new K/V are appended; for cross-attention they are reused as is.
        `is_causal` lets SDPA build the causal mask itself (no padding, no cache).
        """
        def heads(projected):  # (B, T, H) or packed (N, H) -> (B, nh, T, hs)
            return self.transpose_for_scores(projected if packing is None else packing.pad(projected))

        query = heads(self.query(hidden_states))  # (B, nh, T, hs)
        folded = isinstance(past_key_value, ImageTokens)
        if self.is_cross_attention:
            attention_mask = encoder_attention_mask
            if folded:  # (B_img, N, E), never projected: attended through folded_cross_attention below
                key = value = past_key_value.tokens
            elif past_key_value is not None:
                key, value = past_key_value
            else:
                key = self.transpose_for_scores(self.key(encoder_hidden_states))  # (B_img, nh, N, hs)
                value = self.transpose_for_scores(self.value(encoder_hidden_states))
                if _cpu_inference(key):  # decoding keeps these for every step, laid out as its attention reads them
                    key, value = _kernel_keys(key, value)
        else:
            key = heads(self.key(hidden_states))
            value = heads(self.value(hidden_states))
            if isinstance(past_key_value, History):  # written and attended in place below (History.attend)
                pass
            elif isinstance(past_key_value, Slots):  # a static cache: write this step's K/V in its slot
                past_key_value.key.index_copy_(2, past_key_value.position, key.to(past_key_value.key.dtype))
                past_key_value.value.index_copy_(2, past_key_value.position, value.to(past_key_value.value.dtype))
                key, value = past_key_value.key, past_key_value.value
            elif past_key_value is not None:
                key = torch.cat([past_key_value[0], key], dim=2)
                value = torch.cat([past_key_value[1], value], dim=2)

        b, nh, t, hs = query.shape
        group = b // key.shape[0]  # text rows per image (beams); 1 in training
        if group > 1:
            # Fold each image's rows into the query length so they all attend to the one copy of its K/V:
            # (B_img*k, nh, T, hs) -> (B_img, nh, k*T, hs). Cross-attention has no causal mask, so this is exact.
            query = query.view(-1, group, nh, t, hs).transpose(1, 2).reshape(-1, nh, group * t, hs)
        dropout_p = self.dropout_p if self.training else 0.0
        if folded:
            context = folded_cross_attention(query, past_key_value, self.key, self.value, attention_mask)
        elif isinstance(past_key_value, History):
            context = past_key_value.attend(query, key, value, attention_mask)
        elif self.is_cross_attention and dropout_p == 0.0 and _attends_in_kernel(query, key, value, attention_mask):
            context = few_rows.attend(query, key.transpose(-1, -2), value, attention_mask)
        elif query.shape[2] < FEW_QUERIES and dropout_p == 0.0 and not is_causal and _cpu_inference(query):
            context = few_query_attention(query, key, value, attention_mask)
        else:
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                     dropout_p=dropout_p, is_causal=is_causal and attention_mask is None)
        if group > 1:
            context = context.view(-1, nh, group, t, hs).transpose(1, 2).reshape(b, nh, t, hs)
        context = context.transpose(1, 2).reshape(b, t, self.all_head_size)  # (B, T, H)
        kept = past_key_value if folded or isinstance(past_key_value, (Slots, History)) else (key, value)
        return (context if packing is None else packing.unpad(context)), kept


class BertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    """Attention followed by its output projection, residual and LayerNorm."""

    def __init__(self, config, is_cross_attention: bool = False):
        super().__init__()
        self.self = BertSelfAttention(config, is_cross_attention)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                past_key_value=None, is_causal: bool = False, packing: Packing | None = None):
        context, key_value = self.self(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                       past_key_value, is_causal, packing)
        return self.output(context, hidden_states), key_value


class BertIntermediate(nn.Module):
    """The feed-forward block's first half: dense, then BERT's exact (erf) GELU (applied in BertLayer.feed_forward)."""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)


class BertOutput(nn.Module):
    """The second half: dense, dropout, residual, LayerNorm (BertLayer.feed_forward)."""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)


class BertLayer(nn.Module):
    """Self-attention, then (mode 'multimodal') cross-attention to the image tokens, then the feed-forward block."""

    def __init__(self, config, layer_num: int):
        super().__init__()
        self.layer_num = layer_num
        self.attention = BertAttention(config)
        if config.add_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                self_kv=None, cross_kv=None, mode: str = "multimodal", is_causal: bool = False,
                packing: Packing | None = None):
        """Returns (hidden_states, self K/V, cross K/V or None). With a `packing`, hidden states are (N, H)."""
        hidden_states, self_kv = self.attention(hidden_states, attention_mask, past_key_value=self_kv,
                                                is_causal=is_causal, packing=packing)
        if mode == "multimodal":
            if not hasattr(self, "crossattention"):
                raise ValueError("mode='multimodal' needs a decoder built with add_cross_attention=True")
            if encoder_hidden_states is None and cross_kv is None:
                raise ValueError("mode='multimodal' needs encoder_hidden_states (the image tokens)")
            hidden_states, cross_kv = self.crossattention(hidden_states, None, encoder_hidden_states,
                                                          encoder_attention_mask, past_key_value=cross_kv,
                                                          packing=packing)
        else:
            cross_kv = None
        return self.feed_forward(hidden_states), self_kv, cross_kv

    def feed_forward(self, hidden_states):
        """intermediate (dense, GELU), then output (dense, dropout, residual, LayerNorm), with the GELU folded into
        the output's dense (`gelu_linear`: the wide hidden activation is kept once for backward, not twice)."""
        out = self.output
        wide = gelu_linear(self.intermediate.dense(hidden_states), out.dense.weight, out.dense.bias,
                           packed=not self.training)
        return out.LayerNorm(out.dropout(wide) + hidden_states)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BertLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                cache: DecoderCache | None = None, use_cache: bool = False, mode: str = "multimodal",
                is_causal: bool = False, packing: Packing | None = None):
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        use_cache = use_cache and not checkpointing  # a cache is for decoding, never for a checkpointed backward
        new_self_kv, new_cross_kv = [], []
        for i, layer_module in enumerate(self.layer):
            self_kv = cache.self_kv[i] if cache is not None and cache.self_kv else None
            cross_kv = cache.cross_kv[i] if cache is not None and cache.cross_kv else None
            args = (hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, self_kv, cross_kv,
                    mode, is_causal, packing)
            if checkpointing:
                # Non-reentrant checkpointing recomputes the layer in backward; BLIP's reentrant version was broken.
                hidden_states, self_kv, cross_kv = checkpoint(layer_module, *args, use_reentrant=False)
            else:
                hidden_states, self_kv, cross_kv = layer_module(*args)
            new_self_kv.append(self_kv)
            new_cross_kv.append(cross_kv)
        if not use_cache:
            return hidden_states, None
        if cache is None:
            cache = DecoderCache()
        cache.self_kv = new_self_kv
        cache.cross_kv = new_cross_kv if mode == "multimodal" else []
        cache.advance(hidden_states.shape[1])
        return hidden_states, cache


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))  # the first ([CLS]/[DEC]) token


class BertModel(nn.Module):
    def __init__(self, config, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def get_extended_attention_mask(self, attention_mask, input_shape, past_length: int, is_decoder: bool, dtype):
        """An additive bias (B, 1, T, past+T) from a 0/1 padding mask (B, past+T): causal `j <= i` times padding
        when decoding, padding alone otherwise. None when nothing is masked and SDPA can do causality itself."""
        batch, seq_length = input_shape
        if is_decoder:
            seq_ids = torch.arange(seq_length, device=attention_mask.device)
            causal = seq_ids[None, :] <= seq_ids[:, None]  # (T, T): query i sees key j <= i
            # Cached keys come before the new queries: all visible.
            causal = torch.cat([causal.new_ones(seq_length, past_length), causal], dim=1)
            mask = causal[None, None] & attention_mask[:, None, None, :].bool()
        else:
            mask = attention_mask[:, None, None, :].bool()
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, cache: DecoderCache | None = None,
                use_cache: bool | None = None, is_decoder: bool = False, mode: str = "multimodal",
                pack_padding: bool = False, sparse_grad: bool = False, word_weight: torch.Tensor | None = None):
        """`pack_padding=True` (with an `attention_mask`, no cache): the layers run on the real tokens only (see
        `Packing`); the last hidden state is zero at the padding instead of a value nobody should use.
        `sparse_grad`, `word_weight`: see `BertEmbeddings`."""
        static = isinstance(cache, StaticDecoderCache)
        if static:
            if encoder_hidden_states is not None or attention_mask is not None or input_ids.shape[1] != 1:
                raise ValueError("a StaticDecoderCache takes decoding steps: one token per row, no masks, no images")
            position_ids = cache.position.view(1, 1)
        past_length = 0 if static else len(cache) if cache is not None else 0
        embedding_output = self.embeddings(input_ids=input_ids, position_ids=position_ids,
                                           inputs_embeds=inputs_embeds, past_key_values_length=past_length,
                                           sparse_grad=sparse_grad, word_weight=word_weight)
        batch, seq_length = embedding_output.shape[:2]
        dtype = embedding_output.dtype

        is_causal = False
        if static:
            extended_attention_mask = cache.self_attention_mask(dtype)  # the slots up to this step's position
        elif attention_mask is None and past_length == 0 and is_decoder:
            extended_attention_mask, is_causal = None, True  # SDPA's own causal mask: the fast path
        elif attention_mask is None and (past_length == 0 or seq_length == 1):
            extended_attention_mask = None  # nothing to mask: one new token sees every cached one
        else:
            if attention_mask is None:
                attention_mask = torch.ones(batch, past_length + seq_length, device=embedding_output.device)
            extended_attention_mask = self.get_extended_attention_mask(
                attention_mask, (batch, seq_length), past_length, is_decoder, dtype)

        if encoder_attention_mask is not None and mode == "multimodal":
            # (B_img, N) 0/1 -> additive (B_img, 1, 1, N); cross K/V are per image, so is this mask
            encoder_attention_mask = torch.zeros(encoder_attention_mask.shape, dtype=dtype,
                                                 device=encoder_attention_mask.device).masked_fill(
                encoder_attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]
        elif encoder_hidden_states is None and cache is not None and mode == "multimodal":
            encoder_attention_mask = cache.cross_mask  # a step over cached image K/V: the mask they came with

        packing = None
        if pack_padding and attention_mask is not None and cache is None and not use_cache:
            packing = Packing.from_mask(attention_mask)
            if packing.index.numel() == batch * seq_length:
                packing = None  # no padding in this batch: nothing to skip
            else:
                embedding_output = packing.unpad(embedding_output)
        sequence_output, cache = self.encoder(
            embedding_output, attention_mask=extended_attention_mask,
            encoder_hidden_states=encoder_hidden_states if mode == "multimodal" else None,
            encoder_attention_mask=encoder_attention_mask, cache=cache, use_cache=bool(use_cache), mode=mode,
            is_causal=is_causal, packing=packing)
        if cache is not None and encoder_hidden_states is not None and mode == "multimodal":
            cache.cross_mask = encoder_attention_mask
        if packing is not None:
            sequence_output = packing.pad(sequence_output)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        return BertModelOutput(last_hidden_state=sequence_output, pooler_output=pooled_output, cache=cache)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = nn.GELU()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    """Transform, then project onto the vocabulary with the (tied) word embeddings plus a per-token bias."""

    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states, weight: torch.Tensor | None = None):
        """`weight`: the projection to use instead of `decoder.weight` (its alias from `TiedTable`)."""
        weight = self.decoder.weight if weight is None else weight
        return linear(self.transform(hidden_states), weight, self.bias, packed=not self.training)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output, weight: torch.Tensor | None = None):
        return self.predictions(sequence_output, weight)


class BertLMHeadModel(ReleasesPackedOnTrain, nn.Module):
    """The caption decoder: `BertModel` without pooler + LM head tied to the word embeddings, next-token loss."""

    def __init__(self, config, label_smoothing: float = 0.1):
        super().__init__()
        self.config = config
        self.label_smoothing = label_smoothing
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module):
        """BERT's initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorm."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def tie_weights(self):
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def set_gradient_checkpointing(self, enable: bool = True):
        self.bert.encoder.gradient_checkpointing = enable

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, encoder_hidden_states=None,
                encoder_attention_mask=None, labels=None, cache: DecoderCache | None = None,
                use_cache: bool | None = None, return_logits: bool = False, is_decoder: bool = True,
                reduction: str = "mean", mode: str = "multimodal", output_logits: bool = True,
                logits_to_keep: int = 0):
        """Next-token loss on `logits[:, :-1]` vs `labels[:, 1:]` (-100 ignored, label smoothing).

        `reduction='mean'` averages over target tokens, `'none'` gives one summed loss per sequence.
        `return_logits=True` returns the shifted logits tensor (B, T-1, V) itself, as BLIP does.
        `output_logits=False` (with labels) skips the full (B, T, V) logits and runs the LM head only on the
        positions that have a target, and the layers only on the tokens that `attention_mask` keeps: the same loss
        for less work, as long as padding has no target (-100, as the collate makes it).
        `logits_to_keep=n` (no labels): logits for the last n positions only, (B, n, V), as transformers' models
        take it (decoding's prompt needs its last position's); 0 keeps them all.
        """
        if logits_to_keep and (labels is not None or return_logits):
            raise ValueError("logits_to_keep is for inference: it cannot be combined with labels or return_logits")
        # Only the targets' hidden states are read when the full logits are not wanted: padding can be skipped.
        target_only = labels is not None and not output_logits and not return_logits
        on_cpu = input_ids is not None and cpu_savings_pay(input_ids.device)
        # Where the targets are, found before the layers run: on a GPU, finding them (and the packing's real
        # tokens, next) waits for the queued work once, here, rather than again after the whole forward.
        target_rows = (labels[:, 1:] != -100).nonzero(as_tuple=True) if target_only else None
        # With a loss, the (tied) LM head's dense gradient takes the embedding rows' sparse one in place
        # (`TiedTable`; torch.compile keeps the dense lookup: it does not trace sparse gradients).
        tied = self.cls.predictions.decoder.weight is self.bert.embeddings.word_embeddings.weight
        sparse_grad = (on_cpu and labels is not None and tied and torch.is_grad_enabled()
                       and not torch.compiler.is_compiling())
        word_weight = head_weight = None
        if sparse_grad:
            word_weight, head_weight = TiedTable.apply(self.cls.predictions.decoder.weight)
        outputs = self.bert(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            encoder_hidden_states=encoder_hidden_states,
                            encoder_attention_mask=encoder_attention_mask, cache=cache, use_cache=use_cache,
                            is_decoder=is_decoder, mode=mode, pack_padding=target_only and on_cpu,
                            sparse_grad=sparse_grad, word_weight=word_weight)
        sequence_output = outputs.last_hidden_state  # (B, T, H)
        if return_logits:
            return self.cls(sequence_output, head_weight)[:, :-1, :].contiguous()

        kept = sequence_output[:, -logits_to_keep:] if logits_to_keep else sequence_output
        logits = self.cls(kept, head_weight) if (output_logits or labels is None) else None
        loss = None
        if labels is not None:
            targets = labels[:, 1:]  # (B, T-1)
            if logits is not None:
                token_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             reduction="none", label_smoothing=self.label_smoothing)
                token_loss = token_loss.view(targets.shape)
                valid = targets != -100
                if reduction == "none":
                    loss = token_loss.sum(1)
                else:
                    loss = token_loss.sum() / valid.sum()
            else:
                loss = self._target_only_loss(sequence_output[:, :-1], targets, target_rows, reduction, head_weight)
        return CausalLMOutput(loss=loss, logits=logits, cache=outputs.cache)

    def _target_only_loss(self, hidden, targets, rows, reduction, head_weight=None):
        """The loss with the LM head (the largest matmul) applied only at positions with a target, `rows`."""
        valid = targets != -100  # (B, T-1)
        token_loss = F.cross_entropy(self.cls(hidden[rows], head_weight), targets[rows], reduction="none",
                                     label_smoothing=self.label_smoothing)
        if reduction == "none":  # per-sequence sums
            return torch.zeros(targets.shape[0], dtype=token_loss.dtype,
                               device=token_loss.device).index_add(0, rows[0], token_loss)
        return token_loss.sum() / valid.sum()
