"""A faster `decode.Decoding`: the same tokens as the plain one, by the routes chosen for this machine.

- On the CPU, when a decode asks each image few queries (greedy decoding, sampling), the cache folds the
  cross-attention's image projections into the queries instead of projecting every image token for every layer
  (`caches.FastDecoderCache.folding`); otherwise it keeps the image K/V laid out as its attention reads them.
- On the CPU in fp32 the steps continue the prompt in a `caches.HistoryCache` (self K/V never copied: beams reorder
  a table), through the decoder's own modules (whose products, attention and norms take the few-row kernel there),
  and a beam step's candidates come from one pass of the kernel over the logits (`few_rows.beam_candidates`).
- On a GPU each step is a replay of one captured CUDA graph over a preallocated cache (`graphs.StaticSteps`).
"""

from __future__ import annotations

import torch

from med_train.decode import Decoding, Steps
from med_train.fast import attention, few_rows
from med_train.fast.caches import FastDecoderCache, HistoryCache
from med_train.fast.graphs import graphs_pay, static_steps
from med_train.fast.ops import few_rows_ready


class FastDecoding(Decoding):
    def prefill_cache(self, decoder, image_embeds, queries_per_image):
        if attention.folding_pays(decoder.config, image_embeds, queries_per_image):
            return FastDecoderCache.folding(image_embeds, decoder.config.num_hidden_layers)
        return FastDecoderCache()

    def steps(self, decoder, cache, rows, max_length, *, cuda_graphs=None):
        key = cache.self_kv[0][0]  # the prompt's: its device, and its dtype tells autocast's
        prompt_length = key.shape[2]
        if graphs_pay(decoder, key.device, cuda_graphs) and max_length - prompt_length > 1:
            return static_steps(decoder, cache, rows, max_length - 1, reorders=rows is not None)
        if attention.history_pays(decoder, key):  # each beam's self K/V stay where computed (cross: per image)
            images = torch.arange(key.shape[0]) if rows is None else rows
            return Steps(decoder, HistoryCache.following(cache, images, max_length))
        return super().steps(decoder, cache, rows, max_length, cuda_graphs=False)

    def beam_candidates(self, logits, beam_scores, eos_token_id, k):
        """One pass of the kernel over the logits (24 x 30524 in the bench) instead of log_softmax, a sum and a
        top-k over them, 0.28 against 1.4 to 4.8 ms a step, where it applies (CPU, fp32, fewer beams than tokens)."""
        if (logits.device.type == "cpu" and logits.dtype == torch.float32 and k < logits.shape[-1]
                and few_rows_ready()):
            return few_rows.beam_candidates(logits, beam_scores, eos_token_id, k)
        return super().beam_candidates(logits, beam_scores, eos_token_id, k)
