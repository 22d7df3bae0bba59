"""The decoder's key/value cache for step-by-step decoding, and the interface its attention uses (as transformers'
`cache_utils`: attention never asks which cache it has; every variant lives apart and answers the same calls).

For the layer `module.layer_idx` (a `med.BertSelfAttention`), a cache answers
- `self_attention(module, query, key, value, attention_mask, is_causal)`: keeps this step's key and value and
  attends the query over every position so far (the plain cache: `update`, then the module's own attention);
- `cross_attention(module, query, encoder_hidden_states, attention_mask)`: attends the query to the image, whose
  K/V are made from `encoder_hidden_states` at the prompt and kept for the steps;
and, for `med.BertModel`, `position_ids` and `self_attention_mask` (where the new tokens stand and what they see),
then `advance` after each forward; for decoding, `reorder` (beams) and `keep_images` (finished images leave).

    cache = DecoderCache()
    out = decoder(prompt_ids, encoder_hidden_states=image_embeds, cache=cache, use_cache=True)
    out = decoder(next_ids[:, None], cache=cache, use_cache=True)   # no image: its K/V are cached
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def attend_per_image(attention, query, key, value, *args, **kwargs) -> torch.Tensor:
    """`attention(query, key, value, *args, **kwargs)` where the query batch may be k times the key batch (k text
    rows per image, image-major: beams or samples sharing one copy of their image's K/V). Each image's rows fold
    into the query length, (B_img*k, nh, T, hs) -> (B_img, nh, k*T, hs), and back: exact where the rows do not see
    each other (cross-attention has no causal mask)."""
    b, nh, t, hs = query.shape
    group = b // key.shape[0]  # text rows per image; 1 in training
    if group > 1:
        query = query.view(-1, group, nh, t, hs).transpose(1, 2).reshape(-1, nh, group * t, hs)
    context = attention(query, key, value, *args, **kwargs)
    if group > 1:
        context = context.view(-1, nh, group, t, hs).transpose(1, 2).reshape(b, nh, t, hs)
    return context


@dataclass
class DecoderCache:
    """Key/value cache for step-by-step decoding.

    `self_kv[i]`: layer i's self-attention (K, V), each (B, heads, T_past, head_dim), grown by one step per token.
    `cross_kv[i]`: layer i's cross-attention (K, V), each (B_img, heads, N_img, head_dim), computed once per image.
    The text batch may be `B_img * k` rows (k beams or samples per image, image-major): cross K/V are shared.
    `cross_mask`: the image tokens' additive mask (B_img, 1, 1, N_img) the cross K/V were made with, or None; the
    steps after it attend with it.

    A variant overrides what it does differently: where it keeps K/V (`update`, `keep_image_kv`,
    `image_entries_of`), how it attends (`self_attention`, `cross_attention`), or where its steps stand
    (`position_ids`, `self_attention_mask`, `advance`).
    """

    self_kv: list = field(default_factory=list)
    cross_kv: list = field(default_factory=list)
    cross_mask: torch.Tensor | None = None

    def __len__(self) -> int:  # tokens already cached
        return 0 if not self.self_kv or self.self_kv[0] is None else self.self_kv[0][0].shape[2]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's key and value (B, nh, T, hs) to layer `layer_idx`'s and return them all,
        (B, nh, T_past + T, hs) each."""
        if layer_idx < len(self.self_kv):
            past_key, past_value = self.self_kv[layer_idx]
            key, value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
            self.self_kv[layer_idx] = (key, value)
        else:
            self.self_kv.append((key, value))
        return key, value

    def self_attention(self, module, query, key, value, attention_mask=None, is_causal: bool = False):
        key, value = self.update(key, value, module.layer_idx)
        return module.attend(query, key, value, attention_mask, is_causal)

    def cross_attention(self, module, query, encoder_hidden_states, attention_mask=None):
        key, value = self.image_entry(module, encoder_hidden_states)
        return module.attend(query, key, value, attention_mask)

    def image_entry(self, module, encoder_hidden_states):
        """Layer `module.layer_idx`'s image entry: kept from the prompt, or made now from the image tokens
        (B_img, N, E) and kept (`keep_image_kv`)."""
        layer = module.layer_idx
        if layer < len(self.cross_kv):
            return self.cross_kv[layer]
        if encoder_hidden_states is None:
            raise ValueError("mode='multimodal' needs encoder_hidden_states (the image tokens)")
        self.cross_kv.append(self.keep_image_kv(*module.image_key_value(encoder_hidden_states)))
        return self.cross_kv[layer]

    def keep_image_kv(self, key: torch.Tensor, value: torch.Tensor) -> tuple:
        """The image K/V (B_img, nh, N, hs) as the cache keeps them for the steps."""
        return key, value

    def position_ids(self, seq_length: int, device: torch.device) -> torch.Tensor:
        """The new tokens' positions (1, T): after the cached ones."""
        past = len(self)
        return torch.arange(past, past + seq_length, device=device)[None]

    def self_attention_mask(self, attention_mask, dtype: torch.dtype) -> torch.Tensor | None:
        """An additive self-attention mask of the cache's own (one whose keys are not just the cached positions and
        the new ones), or None: the model's causal and padding mask over them applies."""
        return None

    def advance(self, tokens: int) -> None:
        """Called after a forward over `tokens` new positions (a cache whose length is not its tensors' counts)."""

    def reorder(self, index: torch.Tensor) -> None:
        """Select text rows (beam reordering / expansion); cross K/V are per image and never move."""
        self.self_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.self_kv]

    def keep_images(self, images: torch.Tensor, rows: torch.Tensor) -> None:
        """Keep only `images` (indices into the image batch) and their text `rows`, in that order: decoding goes on
        without the images that are finished."""
        self.reorder(rows)
        self.cross_kv = self.image_entries_of(images)
        if self.cross_mask is not None:
            self.cross_mask = self.cross_mask.index_select(0, images)

    def image_entries_of(self, images: torch.Tensor) -> list:
        """Every layer's image entry for `images` only, in that order."""
        return [(k.index_select(0, images), v.index_select(0, images)) for k, v in self.cross_kv]
