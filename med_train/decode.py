"""Caption decoding over the MED decoder's key/value cache: greedy, beam search and nucleus sampling.

Our own loop (transformers' `generate` internals change between releases). The prompt is run once per image; the
cross-attention K/V are computed once per image and shared by its beams (see `cache.DecoderCache`); each step
feeds one token per row. How the cache is kept and the steps run is a decoder's `Decoding`: the plain one here, or
the one `med_train.fast.prepare` gives a decoder (kernels, caches and captured CUDA graphs that give the same
tokens faster), which this module never imports.

    ids = generate(decoder, image_embeds, prompt_ids, eos_token_id=102, pad_token_id=0, num_beams=3,
                   max_length=20, min_length=5)   # (B, L) token ids, prompt included, pads after [SEP]

Lengths count the prompt tokens (BLIP's convention): `max_length=20` with a 4-token prompt allows 16 new tokens.
"""

from __future__ import annotations

import torch

from med_train.cache import DecoderCache

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


class Steps:
    """The steps after the prompt: `step(tokens, src)` feeds one token per text row, tokens (R,), after reordering
    the cached rows by `src` (R,) (beams; None keeps them), and returns the logits (R, V); `keep_images(images,
    rows)` goes on with those images (indices into the image batch) and their text `rows` only."""

    def __init__(self, decoder, cache: DecoderCache):
        self.decoder, self.cache = decoder, cache

    def step(self, tokens: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        if src is not None:
            self.cache.reorder(src)
        out = self.decoder(tokens[:, None], cache=self.cache, use_cache=True)
        return out.logits[:, -1]

    def keep_images(self, images: torch.Tensor, rows: torch.Tensor) -> None:
        self.cache.keep_images(images, rows)


def check_cuda_graphs(decoder, device: torch.device, cuda_graphs: bool | None) -> None:
    """`cuda_graphs=True` asks for what only a GPU, with a decoder in eval mode, can do."""
    if cuda_graphs and decoder.training:
        raise ValueError("cuda_graphs=True needs the decoder in eval mode (dropout's randomness is not captured)")
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device; the decoder runs on {device}")


class Decoding:
    """How a decode keeps its cache and runs its steps: the plain way. A faster one (`decoder.decoding`, given by
    `med_train.fast.prepare`) answers the same three calls with the same tokens."""

    def prefill_cache(self, decoder, image_embeds: torch.Tensor, queries_per_image: int) -> DecoderCache:
        """An empty cache for the prompt of a decode that will ask each image `queries_per_image` queries."""
        return DecoderCache()

    def steps(self, decoder, cache: DecoderCache, rows: torch.Tensor | None, max_length: int, *,
              cuda_graphs: bool | None = None) -> Steps:
        """The steps over the prefilled `cache`, whose text rows become `rows` (the image of each: a beam search's
        k per image) or stay one per image (None). `cuda_graphs`: see `generate`."""
        check_cuda_graphs(decoder, cache.self_kv[0][0].device, cuda_graphs)
        if cuda_graphs:
            raise ValueError("cuda_graphs=True needs a decoder prepared for its GPU by med_train.fast.prepare")
        if rows is not None:
            cache.reorder(rows)  # the prompt's self K/V, k copies per image (cross K/V stay one per image)
        return Steps(decoder, cache)

    def beam_candidates(self, logits: torch.Tensor, beam_scores: torch.Tensor, eos_token_id: int, k: int):
        """Each row's running sums beam_scores + log_softmax(logits) (R, V): that of ending here ([SEP]), (R,),
        and the k best continuations that do not end, (R, k) sums and (R, k) tokens."""
        candidates = beam_scores[:, None] + logits.log_softmax(-1)
        ending = candidates[:, eos_token_id].clone()
        candidates[:, eos_token_id] = NEG_INF
        vocab = candidates.shape[1]
        if vocab < k:  # fewer tokens than beams: the rest are dead candidates (-inf) of some valid token
            candidates = torch.nn.functional.pad(candidates, (0, k - vocab), value=NEG_INF)
        scores, tokens = candidates.topk(k, dim=1)
        return ending, scores, tokens.clamp_(max=vocab - 1)


PLAIN = Decoding()


def decoding_of(decoder) -> Decoding:
    """The decoder's own `Decoding` where it was given one, else the plain one."""
    return getattr(decoder, "decoding", None) or PLAIN


def _prefill(decoder, plan: Decoding, image_embeds, image_mask, prompt_ids, *, rows_per_image: int,
             max_length: int):
    """Run the prompt for every image: returns the prompt (B, P), the last position's logits (B, V) and the cache,
    which the plan made knowing how many queries the whole decode (prompt, then up to `max_length` tokens for each
    of `rows_per_image` beams or samples) asks each image."""
    batch = image_embeds.shape[0]
    prompt = prompt_ids.to(image_embeds.device).expand(batch, -1)  # (B, P)
    queries = prompt.shape[1] + max(max_length - prompt.shape[1] - 1, 0) * rows_per_image
    cache = plan.prefill_cache(decoder, image_embeds, queries)
    out = decoder(prompt, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask, cache=cache,
                  use_cache=True, logits_to_keep=1)  # the LM head (the widest product) on the last position only
    return prompt, out.logits[:, -1], out.cache


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
    plan = decoding_of(decoder)
    check_cuda_graphs(decoder, image_embeds.device, cuda_graphs)
    tokens, logits, cache = _prefill(decoder, plan, image_embeds, image_mask, prompt_ids, rows_per_image=1,
                                     max_length=max_length)
    steps = plan.steps(decoder, cache, None, max_length, cuda_graphs=cuda_graphs)
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
        logits = steps.step(next_tokens)
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
    plan = decoding_of(decoder)
    check_cuda_graphs(decoder, device, cuda_graphs)
    prompt, logits, cache = _prefill(decoder, plan, image_embeds, image_mask, prompt_ids, rows_per_image=k,
                                     max_length=max_length)
    batch, prompt_len = prompt.shape
    rows = torch.arange(batch, device=device).repeat_interleave(k)  # image of each text row, image-major
    steps = plan.steps(decoder, cache, rows, max_length, cuda_graphs=False if drop_finished else cuda_graphs)
    logits = logits[rows]
    tokens = prompt[rows]  # (B*K, P)
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
        generated = cur_len + 1 - prompt_len  # tokens after the prompt, this one included
        # each row's running sum of ending here ([SEP]), and its k best continuations that do not end, among
        # which each image keeps its k best (an image's k best are among its rows' k best each)
        ending, row_scores, row_tokens = plan.beam_candidates(logits, beam_scores.view(-1), eos_token_id, k)
        beam_scores, pick = row_scores.view(n, k * k).topk(k, dim=1)  # (n, K) of each image's K*K
        src = (first_rows + pick // k).view(-1)  # (n*K,) row each new beam extends
        next_tokens = row_tokens.view(n, k * k).gather(1, pick).view(-1)

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
            steps.keep_images(kept, src)
            logits = steps.step(next_tokens)
        else:
            logits = steps.step(next_tokens, src)

    # beams still running at max_length finish there
    running = tokens.view(searching.shape[0], k, -1)
    add_to_pool(beam_scores / (tokens.shape[1] - prompt_len) ** length_penalty, running)
    best[searching] = pool_tokens[:, 0]
    return best


_BEAM_ONLY = ("length_penalty", "early_stopping", "drop_finished")
_SAMPLING_ONLY = ("top_p", "top_k", "temperature", "generator")


def generate(decoder, image_embeds, prompt_ids, *, num_beams=1, do_sample=False, **kwargs):
    """Greedy (`num_beams=1`), beam search (`num_beams>1`) or sampling (`do_sample=True`): token ids (B, L).

    `cuda_graphs` (default: on a GPU, for a decoder that `med_train.fast.prepare` prepared for it, in eval mode):
    the steps after the prompt run over a preallocated cache, each one a replay of a CUDA graph captured at the
    first decode of its shapes (and kept for the next ones: `fast.release` frees them); False runs them eagerly."""
    beams = not do_sample and num_beams > 1
    for key in (() if beams else _BEAM_ONLY) + (() if do_sample else _SAMPLING_ONLY):  # the other modes' options
        kwargs.pop(key, None)
    if do_sample:
        return greedy_or_sample(decoder, image_embeds, prompt_ids, do_sample=True, **kwargs)
    if num_beams == 1:
        return greedy_or_sample(decoder, image_embeds, prompt_ids, **kwargs)
    return beam_search(decoder, image_embeds, prompt_ids, num_beams=num_beams, **kwargs)
