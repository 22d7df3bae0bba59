"""Caption decoding over the MED decoder's key/value cache: greedy, beam search and nucleus sampling.

Our own loop (transformers' `generate` internals change between releases). The prompt is run once per image; the
cross-attention K/V are computed once per image and shared by its beams (see `cache.DecoderCache`), or, on the CPU
when the decode asks each image few queries (greedy decoding, sampling), never computed: the key and value
projections are folded into the queries (`fast.attention.folded_cross_attention`); each step feeds one token per
row. On the CPU in fp32 the steps continue the prompt in a `fast.caches.HistoryCache` (self K/V never copied: beams
reorder a table), straight through the few-row kernel (`KernelSteps`: the decoder's arithmetic without its modules).
On a GPU each step is a replay of one captured CUDA graph over a preallocated cache (`StaticSteps`).

    ids = generate(decoder, image_embeds, prompt_ids, eos_token_id=102, pad_token_id=0, num_beams=3,
                   max_length=20, min_length=5)   # (B, L) token ids, prompt included, pads after [SEP]

Lengths count the prompt tokens (BLIP's convention): `max_length=20` with a 4-token prompt allows 16 new tokens.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict

import torch

from med_train import few_rows
from med_train.cache import DecoderCache
from med_train.fast import attention
from med_train.fast.caches import FastDecoderCache, HistoryCache, StaticDecoderCache
from med_train.kernel_steps import KernelSteps

NEG_INF = float("-inf")


def _process_logits(logits, tokens, cur_len, *, eos_token_id, min_length, repetition_penalty):
    """Repetition penalty (CTRL: a seen token's logit is divided by the penalty if positive, multiplied if negative)
    and the minimum length (no [SEP] before `min_length` tokens). logits (R, V), tokens (R, cur_len)."""
    if repetition_penalty != 1.0:
        seen = logits.gather(1, tokens)
        logits = logits.scatter(1, tokens, torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty))
    if cur_len < min_length:
        logits = logits.clone()
        logits[:, eos_token_id] = NEG_INF
    return logits


def _prefill(decoder, image_embeds, image_mask, prompt_ids, *, rows_per_image: int, max_length: int,
             fold: bool = True):
    """Run the prompt for every image: returns the last position's logits (B, V) and the cache. On the CPU, when
    the whole decode (prompt, then up to `max_length` tokens for each of `rows_per_image` beams or samples) asks
    each image few enough queries (in fp32), the cache folds the cross-attention's image projections into the
    queries (`FastDecoderCache.folding`) instead of projecting every image token to K/V for every layer (unless
    `fold` is False: the steps will run over a `StaticDecoderCache`, which takes projected K/V)."""
    batch = image_embeds.shape[0]
    prompt = prompt_ids.to(image_embeds.device).expand(batch, -1)  # (B, P)
    queries = prompt.shape[1] + max(max_length - prompt.shape[1] - 1, 0) * rows_per_image
    cache = FastDecoderCache()
    if fold and attention.folding_pays(decoder.config, image_embeds, queries):
        cache = FastDecoderCache.folding(image_embeds, decoder.config.num_hidden_layers)
    out = decoder(prompt, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask, cache=cache,
                  use_cache=True, logits_to_keep=1)  # the LM head (the widest product) on the last position only
    return prompt, out.logits[:, -1], out.cache


def _step(decoder, last_tokens, cache, kernel: KernelSteps | None = None):
    if kernel is not None:  # a HistoryCache on the CPU: the same step without the modules
        return kernel.step(last_tokens, cache), cache
    out = decoder(last_tokens[:, None], cache=cache, use_cache=True)
    return out.logits[:, -1], out.cache


_capturing = threading.Lock()


class StaticSteps:
    """The decoding steps after the prompt over a `StaticDecoderCache`: each step (the beams' reordering of
    the cache, then the decoder on one token per row) is, on a GPU, one replay of a CUDA graph captured once,
    instead of some 300 kernel launches from Python, which bound a GPU decode (the GPU idled most of a step).
    Elsewhere (`capture=False`) the same step runs eagerly: what the tests check against the growing cache, and
    what a GPU falls back to when the capture fails.

    `step(tokens, src)` feeds `tokens` (R,) after reordering the cached rows by `src` (R,) (beams: given exactly
    when `reorders`) and returns the logits (R, V), valid until the next step."""

    def __init__(self, decoder, cache: StaticDecoderCache, *, reorders: bool, capture: bool):
        rows = cache.self_kv[0].key.shape[0]
        device = cache.position.device
        self.cache, self.reorders = cache, reorders
        self.key = None  # what `_static_steps` keeps it under: precision and weights
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.src = torch.arange(rows, device=device)
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))

        def run():
            # no cast cache: a graph must not read an autocast cache entry that is freed when autocast exits
            with torch.autocast(device.type, dtype=autocast[1], enabled=autocast[0], cache_enabled=False):
                if reorders:
                    cache.reorder(self.src)
                logits = decoder(self.tokens[:, None], cache=cache, use_cache=True).logits[:, -1]
            cache.position.add_(1)
            return logits

        self.graph = self.logits = None
        self._run = None if capture else run
        if capture:  # warm up on a side stream (library handles, kernel choices), then capture
            with _capturing:  # one capture at a time (a capture's start synchronizes the device)
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        run()
                torch.cuda.current_stream(device).wait_stream(stream)
                self.graph = torch.cuda.CUDAGraph()
                # thread-local: a DataLoader's pin-memory thread may allocate host memory meanwhile
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                    self.logits = run()

    def step(self, tokens: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        self.tokens.copy_(tokens)
        if self.reorders:
            self.src.copy_(src)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


# Steps kept per decoder, in each thread's own table (two threads decoding with one decoder must not share a
# cache's buffers; a thread's table goes with it): a captioning run meets one or two batch shapes, full batches and
# the last. Each holds its cache's buffers (the image K/V: about 0.7 GB for 32 images at 384 px in bf16).
KEEP_CAPTURED = 2
_local = threading.local()


def captured_steps(decoder) -> OrderedDict:
    """This thread's kept `StaticSteps` for `decoder`, least recently used first."""
    table = getattr(_local, "table", None)
    if table is None:
        table = _local.table = weakref.WeakKeyDictionary()
    return table.setdefault(decoder, OrderedDict())


def release_captured_steps(decoder) -> None:
    """Free the CUDA graphs (and their caches' memory) that this thread captured for decoding with `decoder`."""
    table = getattr(_local, "table", None)
    if table is not None:
        table.pop(decoder, None)


def _graphs_pay(decoder, device: torch.device, cuda_graphs: bool | None) -> bool:
    """Whether the steps replay a CUDA graph (`StaticSteps`): by default on a GPU, for a decoder in eval mode."""
    if cuda_graphs and decoder.training:
        raise ValueError("cuda_graphs=True needs the decoder in eval mode (dropout's randomness is not captured)")
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device; the decoder runs on {device}")
    return device.type == "cuda" and not decoder.training if cuda_graphs is None else cuda_graphs


def _static_steps(decoder, cache: DecoderCache, rows: torch.Tensor | None, capacity: int,
                  reorders: bool) -> StaticSteps:
    """Steps over a static copy of the prefilled `cache` (text `rows` of it; None: all), kept for later decodes of
    the same shapes, precision and weights: on a GPU a captured graph, else eager."""
    count = cache.self_kv[0][0].shape[0] if rows is None else rows.shape[0]
    device = cache.self_kv[0][0].device
    key = (reorders, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type),
           tuple(p.data_ptr() for p in decoder.parameters()))
    kept = captured_steps(decoder)
    steps = next((s for s in kept.values() if s.key == key and s.cache.fits(cache, count, capacity)), None)
    if steps is None:
        static = StaticDecoderCache.like(cache, count, capacity)
        try:
            steps = StaticSteps(decoder, static, reorders=reorders, capture=device.type == "cuda")
        except RuntimeError as err:  # a capture that this CUDA build or an op in the step refuses
            if device.type != "cuda":
                raise
            warnings.warn(f"decoding steps run eagerly: capturing them in a CUDA graph failed: {err}", stacklevel=3)
            steps = StaticSteps(decoder, static, reorders=reorders, capture=False)  # kept: no retry per batch
        steps.key = key
        kept[id(steps)] = steps
        while len(kept) > KEEP_CAPTURED:
            kept.popitem(last=False)
    kept.move_to_end(id(steps))
    steps.cache.load(cache, rows)
    return steps


def _filter_top_k_top_p(logits, top_k: int, top_p: float):
    """Keep the `top_k` most likely tokens and the smallest set whose probability reaches `top_p` (nucleus)."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), NEG_INF)
    return logits


@torch.no_grad()
def greedy_or_sample(decoder, image_embeds, prompt_ids, *, eos_token_id, pad_token_id, max_length=20, min_length=0,
                     repetition_penalty=1.0, do_sample=False, top_p=1.0, top_k=0, temperature=1.0, generator=None,
                     image_mask=None, cuda_graphs: bool | None = None):
    """One caption per image, the most likely token each step (or a sample from the filtered distribution).
    `cuda_graphs`: see `generate`."""
    static = _graphs_pay(decoder, image_embeds.device, cuda_graphs)
    tokens, logits, cache = _prefill(decoder, image_embeds, image_mask, prompt_ids, rows_per_image=1,
                                     max_length=max_length, fold=not static and _float_weights(decoder))
    steps = kernel = None
    if static and max_length - tokens.shape[1] > 1:
        steps = _static_steps(decoder, cache, None, max_length - 1, reorders=False)
    elif attention.history_pays(decoder, image_embeds):
        cache = HistoryCache.following(cache, torch.arange(tokens.shape[0]), max_length)
        kernel = KernelSteps.for_decoder(decoder) if _float_weights(decoder) else None
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for cur_len in range(tokens.shape[1], max_length):
        logits = _process_logits(logits.float(), tokens, cur_len, eos_token_id=eos_token_id, min_length=min_length,
                                 repetition_penalty=repetition_penalty)
        if do_sample:
            logits = _filter_top_k_top_p(logits / temperature, top_k, top_p)
            next_tokens = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            next_tokens = logits.argmax(-1)
        next_tokens = next_tokens.masked_fill(finished, pad_token_id)
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        finished |= next_tokens == eos_token_id
        if cur_len + 1 == max_length or bool(finished.all()):
            break
        if steps is not None:
            logits = steps.step(next_tokens)
        else:
            logits, cache = _step(decoder, next_tokens, cache, kernel)
    return tokens


@torch.no_grad()
def beam_search(decoder, image_embeds, prompt_ids, *, eos_token_id, pad_token_id, num_beams=3, max_length=20,
                min_length=0, length_penalty=1.0, repetition_penalty=1.0, early_stopping: bool | str = False,
                image_mask=None, drop_finished: bool | None = None, cuda_graphs: bool | None = None):
    """The best finished beam per image. A hypothesis ends with [SEP] or at `max_length`; its score is the sum of
    its token log-probabilities divided by (tokens generated) ** length_penalty.

    Bookkeeping is batched: the `num_beams` best finished hypotheses of every image live in one (B, K) tensor.
    `early_stopping`: True stops an image once it has K finished hypotheses; False (transformers' default) also
    stops when the best running beam, scored at its current length, cannot beat the worst finished one; "never"
    stops only when no running beam can, at any allowed length (exact).

    `drop_finished` (default: on the CPU) takes an image whose search is over out of the batch (its rows, cache and
    image K/V), so the later steps run on the others' rows only; the results are the same. On a GPU, where a
    step's cost hardly depends on its rows, every image stays to the end by default (finding the finished ones
    would wait for the GPU each step). `cuda_graphs`: see `generate` (not with `drop_finished`).
    """
    k = num_beams
    device = image_embeds.device
    if max_length <= prompt_ids.shape[-1]:  # no token to add (as greedy decoding): each image's caption is the prompt
        return prompt_ids.to(device).expand(image_embeds.shape[0], -1).clone()
    if drop_finished is None:
        drop_finished = device.type == "cpu" and not cuda_graphs
    if drop_finished and cuda_graphs:
        raise ValueError("cuda_graphs and drop_finished exclude each other: a captured step's shapes are fixed")
    static = not drop_finished and _graphs_pay(decoder, device, cuda_graphs)
    prompt, logits, cache = _prefill(decoder, image_embeds, image_mask, prompt_ids, rows_per_image=k,
                                     max_length=max_length, fold=not static and _float_weights(decoder))
    batch, prompt_len = prompt.shape
    rows = torch.arange(batch, device=device).repeat_interleave(k)  # image of each text row, image-major
    steps = kernel = None
    if static and max_length - prompt_len > 1:
        steps = _static_steps(decoder, cache, rows, max_length - 1, reorders=True)
    elif attention.history_pays(decoder, image_embeds):  # each beam's self K/V stay where computed (cross: per image)
        cache = HistoryCache.following(cache, rows, max_length)
        kernel = KernelSteps.for_decoder(decoder) if _float_weights(decoder) else None
    else:
        cache.reorder(rows)  # the prompt's self K/V, k copies per image (cross K/V stay one per image)
    logits = logits[rows]
    tokens = prompt[rows]  # (B*K, P)
    kernel_candidates = _kernel_candidates(logits, k)
    # all beams start equal: keep only the first alive so the first step does not pick k copies of one token
    beam_scores = torch.full((batch, k), NEG_INF, device=device)
    beam_scores[:, 0] = 0.0
    pool_scores = torch.full((batch, k), NEG_INF, device=device)  # finished hypotheses, best first
    pool_tokens = torch.full((batch, k, max_length), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    searching = torch.arange(batch, device=device)  # the images still in the batch (all, unless drop_finished)
    best = torch.full((batch, max_length), pad_token_id, dtype=torch.long, device=device)
    first_rows = torch.arange(batch, device=device)[:, None] * k  # (n, 1): each searching image's first text row
    beam = torch.arange(k, device=device)

    def add_to_pool(scores, candidates):  # scores (n, K) normalised, candidates (n, K, L)
        nonlocal pool_scores, pool_tokens
        scores = scores.masked_fill(done[:, None], NEG_INF)
        padded = torch.full((scores.shape[0], k, max_length), pad_token_id, dtype=torch.long, device=device)
        padded[:, :, : candidates.shape[2]] = candidates
        all_scores = torch.cat([pool_scores, scores], dim=1)  # (n, 2K)
        pool_scores, top = all_scores.topk(k, dim=1)
        pool_tokens = torch.cat([pool_tokens, padded], dim=1).gather(
            1, top[:, :, None].expand(-1, -1, max_length))

    for cur_len in range(prompt_len, max_length):
        n = searching.shape[0]
        logits = _process_logits(logits.float(), tokens, cur_len, eos_token_id=eos_token_id, min_length=min_length,
                                 repetition_penalty=repetition_penalty)
        vocab = logits.shape[-1]
        generated = cur_len + 1 - prompt_len  # tokens after the prompt, this one included
        # each row's running sums beam_scores + log_softmax(logits) (n*K, V): that of ending here ([SEP]), and the
        # k best continuations that do not end, among which each image keeps its k best
        if kernel_candidates:
            ending, row_scores, row_tokens = few_rows.beam_candidates(logits, beam_scores.view(-1), eos_token_id, k)
            beam_scores, pick = row_scores.view(n, k * k).topk(k, dim=1)  # (n, K) of each image's K*K
            src = (first_rows + pick // k).view(-1)  # (n*K,) row each new beam extends
            next_tokens = row_tokens.view(n, k * k).gather(1, pick).view(-1)
        else:
            candidates = beam_scores.view(-1, 1) + logits.log_softmax(-1)  # (n*K, V)
            ending = candidates[:, eos_token_id].clone()
            candidates[:, eos_token_id] = NEG_INF
            beam_scores, flat = candidates.view(n, k * vocab).topk(k, dim=1)  # (n, K)
            src = (first_rows + flat // vocab).view(-1)
            next_tokens = (flat % vocab).view(-1)

        # every beam's [SEP] continuation is a finished hypothesis
        ended = torch.cat([tokens, torch.full_like(tokens[:, :1], eos_token_id)], dim=1).view(n, k, -1)
        add_to_pool(ending.view(n, k) / generated**length_penalty, ended)
        tokens = torch.cat([tokens[src], next_tokens[:, None]], dim=1)

        # which images can stop: k finished, and (unless early_stopping=True) no running beam can do better
        full = pool_scores[:, -1] > NEG_INF
        if early_stopping is True:
            done |= full
        else:
            best_running = beam_scores[:, 0]
            if early_stopping == "never" and length_penalty > 0:
                reach = best_running / (max_length - prompt_len) ** length_penalty  # sums only fall: longest is best
            else:
                reach = best_running / generated**length_penalty
            done |= full & (reach <= pool_scores[:, -1])
        if cur_len + 1 == max_length or bool(done.all()):
            break
        if drop_finished and bool(done.any()):
            finished, kept = done.nonzero().squeeze(1), (~done).nonzero().squeeze(1)
            best[searching[finished]] = pool_tokens[finished, 0]
            first_rows = first_rows[: kept.numel()]
            kept_rows = (kept[:, None] * k + beam).view(-1)
            src, next_tokens, tokens = src[kept_rows], next_tokens[kept_rows], tokens[kept_rows]
            searching, beam_scores, pool_scores, pool_tokens, done = (
                t[kept] for t in (searching, beam_scores, pool_scores, pool_tokens, done))
            cache.keep_images(kept, src)
        elif steps is not None:
            logits = steps.step(next_tokens, src)
            continue
        else:
            cache.reorder(src)
        logits, cache = _step(decoder, next_tokens, cache, kernel)

    # beams still running at max_length finish there
    running = tokens.view(searching.shape[0], k, -1)
    add_to_pool(beam_scores / (tokens.shape[1] - prompt_len) ** length_penalty, running)
    best[searching] = pool_tokens[:, 0]
    return best


def _float_weights(decoder) -> bool:
    """Whether the decoder's projections hold float weights, which folding and `KernelSteps` read directly; a
    quantised decoder (int8: `int8.quantize`) runs its projections as modules."""
    return isinstance(decoder.cls.predictions.decoder, torch.nn.Linear)


def _kernel_candidates(logits: torch.Tensor, k: int) -> bool:
    """Whether a beam step's candidates come from `few_rows.beam_candidates` (CPU, fp32, the kernel built, fewer
    beams than tokens): one pass over the logits (24 x 30524 in the bench) instead of log_softmax, a sum and a
    top-k over them, 0.28 against 1.4 to 4.8 ms a step."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and few_rows.available()
            and k < logits.shape[-1])


_BEAM_ONLY = ("length_penalty", "early_stopping", "drop_finished")
_SAMPLING_ONLY = ("top_p", "top_k", "temperature", "generator")


def generate(decoder, image_embeds, prompt_ids, *, num_beams=1, do_sample=False, **kwargs):
    """Greedy (`num_beams=1`), beam search (`num_beams>1`) or sampling (`do_sample=True`): token ids (B, L).

    `cuda_graphs` (default: on a GPU, for a decoder in eval mode): the steps after the prompt run over a
    preallocated cache, each one a replay of a CUDA graph captured at the first decode of its shapes (and kept
    for the next ones: `release_captured_steps` frees them); False runs them eagerly."""
    beams = not do_sample and num_beams > 1
    for key in (() if beams else _BEAM_ONLY) + (() if do_sample else _SAMPLING_ONLY):  # the other modes' options
        kwargs.pop(key, None)
    if do_sample:
        return greedy_or_sample(decoder, image_embeds, prompt_ids, do_sample=True, **kwargs)
    if num_beams == 1:
        return greedy_or_sample(decoder, image_embeds, prompt_ids, **kwargs)
    return beam_search(decoder, image_embeds, prompt_ids, num_beams=num_beams, **kwargs)
