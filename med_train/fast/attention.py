"""The decoder's attention by the routes measured faster on the CPU, for decoding: a step's few queries through two
batched products (`few_query_attention`), cross-attention in the few-row kernel's fused attention over keys stored
transposed (`few_rows.attend`, `kernel_keys`), or, when a decode asks each image few queries, with the image key and
value projections folded into the queries (`folded_cross_attention`). Each equals the module's own attention
(`med.BertSelfAttention.attend`, SDPA) in value; `attend` picks the route, and the caches of `fast.caches` call it.
"""

from __future__ import annotations

import torch
from torch import nn

from med_train.cache import attend_per_image
from med_train.fast import few_rows
from med_train.fast.ops import few_rows_ready

# Below this many queries per key/value set (a decoding step: 1 per image, or its beams folded in), CPU inference
# attends with two matrix products instead of SDPA's kernel, which is slower there (12 cross-attention layers
# over ViT-B's 197 image tokens, batch 8: one query 10 -> 7.5 ms, three 16 -> 14 ms; equal from four).
FEW_QUERIES = 4


def _cpu_inference(x: torch.Tensor) -> bool:
    """No autograd graph is recorded and `x` is on the CPU: decoding there, where the cached image K/V are copied
    once into the layout their attention reads (`kernel_keys`), a step's few queries attend through
    `few_query_attention` or `few_rows.attend`, and the image projections may be folded (`folding_pays`): all
    measured on the CPU only."""
    return x.device.type == "cpu" and not torch.is_grad_enabled()


def attend(module, query, key, value, attention_mask=None, is_causal: bool = False) -> torch.Tensor:
    """`module.attend(query, key, value, attention_mask, is_causal)` by the fastest route measured for it: the
    few-row kernel's attention for cross-attention over keys `kernel_keys` stored transposed, two products for
    fewer than FEW_QUERIES queries per key/value set (image rows folded in), else the module's own (SDPA)."""
    if module.training and module.dropout_p:
        return module.attend(query, key, value, attention_mask, is_causal)
    if module.is_cross_attention and _attends_in_kernel(query, key, value, attention_mask):
        return attend_per_image(_kernel_attention, query, key, value, attention_mask)
    queries = query.shape[2] * (query.shape[0] // key.shape[0])  # with each image's rows folded in
    if queries < FEW_QUERIES and not is_causal and _cpu_inference(query):
        return attend_per_image(few_query_attention, query, key, value, attention_mask)
    return module.attend(query, key, value, attention_mask, is_causal)


def _kernel_attention(query, key, value, attention_mask):
    return few_rows.attend(query, key.transpose(-1, -2), value, attention_mask)


def few_query_attention(query, key, value, attention_mask=None):
    """softmax(q k^T / sqrt(d) + mask) v as two batched products, the softmax in fp32 (as SDPA accumulates).
    query (B, nh, T, hs), key/value (B, nh, S, hs), attention_mask an additive bias broadcastable to (B, nh, T, S)."""
    hs = query.shape[-1]
    scores = torch.matmul(query * hs**-0.5, key.transpose(-1, -2))
    if attention_mask is not None:
        scores = scores + attention_mask
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(value.dtype), value)


def kernel_keys(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention K/V (B_img, nh, S, hs), heads of the projections' rows, to keep for a CPU decode. Where the
    few-row kernel attends (`_attends_in_kernel`, fp32): the keys stored transposed, each head's keys as hs rows of
    S (the returned tensor is that memory seen as (B_img, nh, S, hs)), and the values as projected (the kernel
    reads each head's rows at their stride, fetching the next head's as it goes: as fast as a contiguous copy,
    which took about 10 ms of the bench's beam-3 decode). Elsewhere both contiguous, which makes each step's read
    of them sequential (a greedy step's cross-attention, ViT-B image tokens: 17 -> 10 ms with bmm)."""
    if key.dtype == value.dtype == torch.float32 and few_rows_ready():
        return key.transpose(-1, -2).contiguous().transpose(-1, -2), value
    return key.contiguous(), value.contiguous()


def _attends_in_kernel(query, key, value, attention_mask) -> bool:
    """Whether `few_rows.attend` takes this cross-attention: CPU inference in fp32 over keys that `kernel_keys`
    stored transposed. The bench's beam-3 decode (8 images, 3 beams, ViT-B/16 tokens), a layer's step: 0.69 ms
    against 0.75 with the keys and values packed for two few-row products (and their packing once per decode),
    1.7 with matmul; the data (9.7 MB of K/V a layer) come from memory every step, which bounds it (0.37 ms)."""
    return (query.dtype == key.dtype == value.dtype == torch.float32 and key.transpose(-1, -2).is_contiguous()
            and (attention_mask is None or attention_mask.dtype == torch.float32)
            and _cpu_inference(query) and few_rows_ready())


def history_pays(decoder: nn.Module, image_embeds: torch.Tensor) -> bool:
    """Whether a decode continues its prompt in a `HistoryCache`: CPU inference in fp32 (no autocast), a decoder
    in eval mode (no attention dropout), where the few-row kernel is built."""
    return (not decoder.training and _cpu_inference(image_embeds) and image_embeds.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and few_rows_ready())


# A CPU decode folds the image projections into the queries (`FastDecoderCache.folding`) when its estimated cost is
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


def folded_cross_attention(query, image, key: nn.Linear, value: nn.Linear, attention_mask=None):
    """Cross-attention to image tokens that were never projected: with q_h the scaled query of head h and Wk_h, Wv_h
    its rows of the key and value weights, softmax(q_h (x Wk_h^T + bk_h)^T) (x Wv_h^T + bv_h) equals
    softmax((q_h Wk_h) x^T) x Wv_h^T + bv_h, since q_h bk_h shifts a query's scores alike (the softmax ignores it)
    and the probabilities sum to 1. So each query is carried to the image tokens' width, attends there, and comes
    back: the work grows with the queries instead of the image tokens (MLA's weight absorption).
    query (B_img, nh, T, hs), image (`caches.ImageTokens`) tokens x (B_img, N, E), attention_mask additive,
    broadcastable to (B_img, nh, T, N); returns (B_img, nh, T, hs) as SDPA would on the projected K/V. The softmax
    runs in fp32. In fp32 where the few-row kernel is built, its four products run there (`_folded_panels`), else
    as bmm."""
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


def _folded_panels(query, image, key: nn.Linear, value: nn.Linear) -> dict | None:
    """The few-row kernel's panels for `folded_cross_attention`'s four products, or None where they run as bmm
    (not fp32, no kernel, linears that are not `FastLinear`s, or a weight's first use: see `FastLinear.kept`): per
    head h, Wk_h (hs, E) to carry and
    Wv_h^T (E, hs) to come back, kept with the weights; per image, the tokens transposed (E, N) for the scores and
    the tokens (N, E) for the mix, kept with the cache's `ImageTokens` for the decode.

    Measured on the bench's greedy decode (ViT-B/16 tokens, BERT-base, batch 8, one thread), a layer's four bmm
    take 0.34 + 0.69 + 0.62 + 0.33 ms a step with the weights and tokens cold in cache, about 40 GFLOP/s."""
    tokens = image.tokens
    if not (query.dtype == tokens.dtype == key.weight.dtype == value.weight.dtype == torch.float32
            and query.device.type == "cpu" and few_rows_ready() and hasattr(key, "kept") and hasattr(value, "kept")):
        return None
    nh, hs = query.shape[1], query.shape[3]
    carry = key.kept(("folded carry", nh), lambda w: few_rows.pack(w.view(nh, hs, -1)))
    back = value.kept(("folded back", nh), lambda w: few_rows.pack(w.view(nh, hs, -1).transpose(1, 2)))
    if carry is None or back is None:
        return None
    scores, mix = image.panels()
    return {"carry": carry, "scores": scores, "mix": mix, "back": back}
