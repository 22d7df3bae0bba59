"""CPU decoding steps over a `HistoryCache` run straight through the few-row kernel (few_rows.py), without the
decoder's modules: the same arithmetic as `decoder(tokens[:, None], cache=cache, use_cache=True)`, in fewer calls.

    steps = KernelSteps.for_decoder(decoder)   # None where it does not apply (see there)
    logits = steps.step(tokens, cache)          # (R, V), as the decoder's logits[:, -1]; the cache advances

Why: a step of the bench's beam-3 decode (24 rows, BERT-base, one thread) spends about 56 ms in its products and
8 ms in cross-attention, and took 83 to 95 ms through the modules: their calls, checks and copies (ten modules a
layer, each product looking up its kept weight, views and transposes, a copy of every new K/V into the cache, the
GELU and the residual adds as passes of their own) cost more than the attention does. Here each layer is nine
kernel calls and a few views: the products read prepared weights, the key and value products write straight into
the cache's history, GELU is applied in the first feed-forward product as it stores, and each residual add and
LayerNorm is one pass (`few_rows.Norm`). The step takes 68 to 70 ms (96% of it in the kernel); the bench batch's
beam-3 decode 1.95 -> 1.73 s, greedy 0.99 -> 0.81 s (medians of 5, alternating, the same captions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from med_train import med
from med_train.fast import few_rows
from med_train.fast.attention import folded_cross_attention
from med_train.fast.caches import HistoryCache, ImageTokens
from med_train.fast.ops import FastLinear, few_rows_ready


def _product(linear: FastLinear, *, bias: torch.Tensor | None = None) -> few_rows.Product:
    weight = linear.weight
    return few_rows.Product(linear.few_row_panels(), weight.shape[0], linear.bias if bias is None else bias)


def _norm(layer_norm) -> few_rows.Norm:
    return few_rows.Norm(layer_norm.weight, layer_norm.bias, layer_norm.eps)


class _Layer:
    """One BertLayer's weights as the kernel reads them."""

    def __init__(self, layer):
        attention, cross = layer.attention, layer.crossattention
        self.query, self.key, self.value = (_product(attention.self.query), _product(attention.self.key),
                                            _product(attention.self.value))
        self.attention_out, self.attention_norm = _product(attention.output.dense), _norm(attention.output.LayerNorm)
        self.cross = cross.self  # its key and value projections, for a folding cache's cross-attention
        self.cross_query = _product(cross.self.query)
        self.cross_out, self.cross_norm = _product(cross.output.dense), _norm(cross.output.LayerNorm)
        self.widen, self.narrow = _product(layer.intermediate.dense), _product(layer.output.dense)
        self.output_norm = _norm(layer.output.LayerNorm)


class KernelSteps:
    """A decoder's weights prepared for `step` (the kernel's panels are the ones its `FastLinear`s keep: no copy of
    its own). Make one per decode with `for_decoder`: it reads the weights as they are then."""

    def __init__(self, decoder):
        bert, head = decoder.bert, decoder.cls.predictions
        config = decoder.config
        self.heads, self.width = config.num_attention_heads, config.hidden_size
        self.head_size = self.width // self.heads
        embeddings = bert.embeddings
        self.words, self.positions = embeddings.word_embeddings.weight, embeddings.position_embeddings.weight
        self.embedding_norm = _norm(embeddings.LayerNorm)
        self.layers = [_Layer(layer) for layer in bert.encoder.layer]
        self.transform, self.transform_norm = _product(head.transform.dense), _norm(head.transform.LayerNorm)
        self.vocabulary = _product(head.decoder, bias=head.bias)

    @classmethod
    def for_decoder(cls, decoder) -> KernelSteps | None:
        """The steps for `decoder`, or None where they do not apply: only a `med.BertLMHeadModel` with
        cross-attention whose linears are `FastLinear`s (`fast.prepare`), in eval mode, with fp32 CPU weights,
        outside autocast and autograd, where the kernel is built and chosen (the decoder's own forward runs
        everywhere else). Forward hooks on its modules are not called here."""
        if not (isinstance(decoder, med.BertLMHeadModel) and decoder.config.add_cross_attention
                and not decoder.training and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and few_rows_ready()):
            return None
        if not all(isinstance(m, FastLinear) for m in decoder.modules() if isinstance(m, torch.nn.Linear)):
            return None
        if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in decoder.parameters()):
            return None
        return cls(decoder)

    def step(self, tokens: torch.Tensor, cache: HistoryCache) -> torch.Tensor:
        """Feed one token per text row, tokens (R,), after the `cache`'s positions: returns the logits (R, V) and
        advances the cache by one position, writing each layer's new K/V into its history."""
        rows = tokens.shape[0]
        position, source = cache.self_kv[0].step_sources(rows)  # (R, T): the stored row of each position
        nh, hs, scale = self.heads, self.head_size, self.head_size**-0.5
        hidden = F.embedding(tokens, self.words)  # (R, H)
        hidden += self.positions[position]
        hidden = self.embedding_norm(hidden)
        for layer, history, cross in zip(self.layers, cache.self_kv, cache.cross_kv, strict=True):
            # self-attention: this position's K/V are written where the history keeps them, (R, nh, hs) each
            layer.key(hidden, out=history.key[position, :rows].view(rows, -1))
            layer.value(hidden, out=history.value[position, :rows].view(rows, -1))
            query = layer.query(hidden).view(rows, nh, hs)
            context = few_rows._attend_history(query, history.key, history.value, source, scale)
            hidden = layer.attention_norm(layer.attention_out(context.view(rows, -1)), hidden)
            # cross-attention: an image's rows (its beams) ask their queries together, (B_img, nh, k, hs)
            query = layer.cross_query(hidden)
            context = self._cross_attention(layer, query, cross, cache.cross_mask)
            hidden = layer.cross_norm(layer.cross_out(context), hidden)
            hidden = layer.output_norm(layer.narrow(layer.widen(hidden, gelu=True)), hidden)
        cache.advance(1)
        return self.vocabulary(self.transform_norm(self.transform(hidden, gelu=True)))

    def _cross_attention(self, layer: _Layer, query: torch.Tensor, cross, mask) -> torch.Tensor:
        """query (R, H) of B_img images' k rows each (image-major) against their image's cached K/V (or tokens, in
        a folding cache): the context (R, H)."""
        rows, nh, hs = query.shape[0], self.heads, self.head_size
        if isinstance(cross, ImageTokens):
            images = cross.tokens.shape[0]
            query = query.view(images, rows // images, nh, hs).transpose(1, 2)  # (B_img, nh, k, hs)
            context = folded_cross_attention(query, cross, layer.cross.key, layer.cross.value, mask)
            return context.transpose(1, 2).reshape(rows, nh * hs)
        key, value = cross
        images = key.shape[0]
        context = query.new_empty(rows, nh * hs)
        few_rows.attend(query.view(images, rows // images, nh, hs).transpose(1, 2), key.transpose(-1, -2), value,
                        mask, out=context.view(images, rows // images, nh, hs).transpose(1, 2))
        return context
