"""Decoding: greedy, beam search (against exhaustive search) and sampling, on tiny random decoders."""

import itertools

import pytest
import torch

from med_train.decode import beam_search, generate, greedy_or_sample
from med_train.med import BertLMHeadModel, med_config

PAD, BOS, EOS = 0, 1, 2


def _decoder(vocab=5, seed=0):
    torch.manual_seed(seed)
    model = BertLMHeadModel(med_config(vocab_size=vocab, hidden_size=16, encoder_width=8, intermediate_size=32,
                                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD,
                                       initializer_range=1.0)).eval()  # large weights: peaked, varied distributions
    return model


def _ending_decoder_and_padded_images(seed=6):
    """A decoder whose captions end at different steps, and 5 images of 4 tokens padded with 2 masked ones."""
    decoder = _decoder(vocab=30, seed=5)
    with torch.no_grad():
        decoder.cls.predictions.bias[EOS] = 3.0
    g = torch.Generator().manual_seed(seed)
    images = torch.cat([torch.randn(5, 4, 8, generator=g), 5 * torch.randn(5, 2, 8, generator=g)], 1)
    return decoder, images, torch.tensor([[1] * 4 + [0] * 2] * 5)


@torch.no_grad()
def _sequence_logprob(decoder, image, prompt, continuation):
    ids = torch.tensor([prompt + continuation])
    logp = decoder(ids, encoder_hidden_states=image[None]).logits[0].log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(continuation))


def _exhaustive_best(decoder, image, prompt, vocab, max_new, min_length, length_penalty):
    """Score every allowed caption: tokens that are not [SEP], ended by [SEP] or by the length limit."""
    best, best_seq = float("-inf"), None
    others = [t for t in range(vocab) if t != EOS]
    for n in range(1, max_new + 1):
        for body in itertools.product(others, repeat=n - 1):
            endings = [[*body, EOS]] + ([[*body, t] for t in others] if n == max_new else [])
            for seq in endings:
                if EOS in seq and len(prompt) + n - 1 < min_length:  # [SEP] forbidden before min_length
                    continue
                score = _sequence_logprob(decoder, image, prompt, seq) / n**length_penalty
                if score > best:
                    best, best_seq = score, seq
    return best_seq


@pytest.mark.parametrize("length_penalty,early_stopping,min_length", [(1.0, "never", 0), (0.0, False, 0),
                                                                      (2.0, "never", 3)])
def test_beam_search_equals_exhaustive_search_when_the_beam_covers_the_space(length_penalty, early_stopping,
                                                                              min_length):
    vocab, max_new = 5, 3
    decoder = _decoder(vocab)
    images = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(3))
    prompt = [BOS]
    out = beam_search(decoder, images, torch.tensor(prompt), eos_token_id=EOS, pad_token_id=PAD,
                      num_beams=(vocab - 1) ** max_new, max_length=len(prompt) + max_new, min_length=min_length,
                      length_penalty=length_penalty, early_stopping=early_stopping)
    for i in range(images.shape[0]):
        want = _exhaustive_best(decoder, images[i], prompt, vocab, max_new, min_length, length_penalty)
        got = out[i, len(prompt):].tolist()
        assert got[: len(want)] == want
        assert all(t == PAD for t in got[len(want):])


@pytest.mark.parametrize("kwargs", [dict(num_beams=3), dict(num_beams=5, length_penalty=0.5, min_length=6),
                                    dict(num_beams=3, repetition_penalty=1.5, early_stopping="never")])
def test_beam_candidates_from_the_kernel_give_the_same_captions(monkeypatch, kwargs):
    """On the CPU a beam step's candidates come from one kernel pass over the logits (`few_rows.beam_candidates`:
    each row's ending score and k best, then each image's k best of its rows'): the captions are those of
    log_softmax and a top-k over each image's k x V running sums."""
    from med_train import decode
    from med_train.fast import few_rows

    if not few_rows.available():
        pytest.skip("the few-row kernel is not built here")
    calls = []
    real = few_rows.beam_candidates
    monkeypatch.setattr(few_rows, "beam_candidates", lambda *a: calls.append(1) or real(*a))
    decoder, images, mask = _ending_decoder_and_padded_images()

    def run(kernel: bool):
        monkeypatch.setattr(decode, "_kernel_candidates", lambda logits, k: kernel)
        calls.clear()
        ids = generate(decoder, images, torch.tensor([BOS, 7]), eos_token_id=EOS, pad_token_id=PAD, max_length=12,
                       image_mask=mask, **kwargs)
        return ids, len(calls)

    (kernel, kernel_calls), (torch_path, torch_calls) = run(True), run(False)
    assert kernel_calls > 0 and torch_calls == 0
    assert torch.equal(kernel, torch_path)
    assert len({int((row != PAD).sum()) for row in kernel}) > 1  # captions of different lengths


def test_greedy_equals_beam_of_one_and_uncached_greedy():
    decoder = _decoder(vocab=40, seed=1)
    images = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor([BOS, 7, 9])
    greedy = greedy_or_sample(decoder, images, prompt, eos_token_id=EOS, pad_token_id=PAD, max_length=12,
                              min_length=5)
    beam1 = beam_search(decoder, images, prompt, eos_token_id=EOS, pad_token_id=PAD, num_beams=1, max_length=12,
                        min_length=5)
    assert torch.equal(greedy, beam1[:, : greedy.shape[1]])
    # the same loop without any cache: the full sequence re-run every step
    for i in range(images.shape[0]):
        seq = prompt.tolist()
        while len(seq) < 12:
            logits = decoder(torch.tensor([seq]), encoder_hidden_states=images[i:i + 1]).logits[0, -1]
            if len(seq) < 5:
                logits[EOS] = float("-inf")
            seq.append(int(logits.argmax()))
            if seq[-1] == EOS:
                break
        assert greedy[i, : len(seq)].tolist() == seq
        assert all(t == PAD for t in greedy[i, len(seq):].tolist())


def test_batched_decoding_equals_one_image_at_a_time():
    decoder = _decoder(vocab=30, seed=2)
    with torch.no_grad():
        decoder.cls.predictions.bias[EOS] = 4.0  # [SEP] likely enough that captions end at different steps
    images = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(1))
    prompt = torch.tensor([BOS])
    for beams in (1, 3):
        batched = generate(decoder, images, prompt, num_beams=beams, eos_token_id=EOS, pad_token_id=PAD,
                           max_length=10, min_length=2)
        lengths = set()
        for i in range(images.shape[0]):
            single = generate(decoder, images[i:i + 1], prompt, num_beams=beams, eos_token_id=EOS,
                              pad_token_id=PAD, max_length=10, min_length=2)[0]
            n = single.shape[0]
            assert batched[i, :n].tolist() == single.tolist()
            assert all(t == PAD for t in batched[i, n:].tolist())
            lengths.add(int((single != PAD).sum()))
        assert len(lengths) > 1  # the captions end at different steps


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_beam_search_without_finished_images_gives_the_same_captions(monkeypatch, early_stopping):
    """Images whose search is over leave the batch (the CPU default): the steps after run on fewer rows, and every
    caption is the one the search with every image kept to the end finds."""
    from med_train import decode

    rows = []
    real_step = decode._step
    monkeypatch.setattr(decode, "_step", lambda decoder, tokens, cache, *kernel: rows.append(len(tokens))
                        or real_step(decoder, tokens, cache, *kernel))
    fewest = []
    for seed in range(4):
        decoder = _decoder(vocab=30, seed=seed)
        with torch.no_grad():
            decoder.cls.predictions.bias[EOS] = 3.0  # captions end, at different steps
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(6, 4, 8, generator=g)
        padded = torch.cat([images, torch.randn(6, 2, 8, generator=g)], 1)
        mask = torch.tensor([[1] * 4 + [0] * 2] * 6)
        kwargs = dict(eos_token_id=EOS, pad_token_id=PAD, num_beams=3, max_length=12, min_length=3,
                      early_stopping=early_stopping, length_penalty=0.8, image_mask=mask)
        rows.clear()
        kept = beam_search(decoder, padded, torch.tensor([BOS, 7]), drop_finished=False, **kwargs)
        assert set(rows) == {18}
        rows.clear()
        dropped = beam_search(decoder, padded, torch.tensor([BOS, 7]), **kwargs)  # on the CPU: dropped
        assert torch.equal(dropped, kept), seed
        assert rows == sorted(rows, reverse=True) and all(r % 3 == 0 for r in rows)
        fewest.append(rows[-1])
    if early_stopping is not True:  # (True stops every image together: k [SEP] endings two steps after min_length)
        assert min(fewest) < 18  # images left the batch before the end


def test_masked_image_padding_is_ignored_at_every_step():
    """Images padded with extra tokens and an `image_mask` decode as the unpadded images do: the prompt and every
    cached step attend with the mask (the cache keeps it with the image K/V)."""
    decoder = _decoder(vocab=30, seed=3)
    g = torch.Generator().manual_seed(4)
    images = torch.randn(3, 4, 8, generator=g)
    padded = torch.cat([images, 5 * torch.randn(3, 3, 8, generator=g)], 1)
    mask = torch.tensor([[1] * 4 + [0] * 3] * 3)
    prompt = torch.tensor([BOS])

    def run(embeds, **kwargs):
        if kwargs.get("do_sample"):
            kwargs["generator"] = torch.Generator().manual_seed(5)
        return generate(decoder, embeds, prompt, eos_token_id=EOS, pad_token_id=PAD, max_length=10, min_length=2,
                        **kwargs)

    for kwargs in (dict(num_beams=1), dict(num_beams=3), dict(do_sample=True, top_p=0.9)):
        want = run(images, **kwargs)
        assert torch.equal(run(padded, image_mask=mask, **kwargs), want), kwargs
        assert not torch.equal(run(padded, **kwargs), want), kwargs  # unmasked, the padding changes the captions


@pytest.mark.parametrize("kwargs", [dict(num_beams=1), dict(num_beams=3), dict(do_sample=True, top_p=0.9)])
@pytest.mark.parametrize("history", [True, False])
def test_a_length_limit_within_the_prompt_returns_the_prompt(monkeypatch, kwargs, history):
    """`max_length` counts the prompt: at or under its length, every mode returns the prompt for each image."""
    from med_train.fast import attention

    monkeypatch.setattr(attention, "history_pays", lambda *a: history)
    decoder, images, _ = _ending_decoder_and_padded_images()
    prompt = torch.tensor([BOS, 7, 8])
    for max_length in (1, 3):
        ids = generate(decoder, images, prompt, eos_token_id=EOS, pad_token_id=PAD, max_length=max_length, **kwargs)
        assert torch.equal(ids, prompt.expand(len(images), -1))


@pytest.mark.parametrize("kwargs", [dict(num_beams=1), dict(num_beams=3), dict(num_beams=3, drop_finished=False),
                                    dict(do_sample=True, top_p=0.9)])
def test_history_cache_gives_the_same_captions(monkeypatch, kwargs):
    """Where a CPU decode keeps its self-attention history in place (`HistoryCache`, fp32 with the few-row
    kernel), the captions are those of the growing cache, whether its steps run through the decoder's modules or
    straight through the kernel (`KernelSteps`, what decoding uses there): greedy, beam search (images leaving the
    batch or not) and sampling, with a masked image padding."""
    from med_train import decode
    from med_train.fast import attention, few_rows
    from med_train.fast.caches import FastDecoderCache, HistoryCache

    if not few_rows.available():
        pytest.skip("the few-row kernel is not built here")
    calls = []
    real_step, real_steps = decode._step, decode.KernelSteps.for_decoder

    def step(decoder, tokens, cache, kernel=None):
        calls.append((type(cache), type(kernel)))
        return real_step(decoder, tokens, cache, kernel)

    monkeypatch.setattr(decode, "_step", step)
    decoder, images, mask = _ending_decoder_and_padded_images()

    def run(history: bool, kernel: bool):
        monkeypatch.setattr(attention, "history_pays", lambda *a: history)
        monkeypatch.setattr(decode.KernelSteps, "for_decoder", real_steps if kernel else lambda decoder: None)
        calls.clear()
        generator = torch.Generator().manual_seed(7) if kwargs.get("do_sample") else None
        ids = generate(decoder, images, torch.tensor([BOS, 7]), eos_token_id=EOS, pad_token_id=PAD, max_length=12,
                       min_length=3, image_mask=mask, generator=generator, **kwargs)
        return ids, set(calls)

    growing, growing_calls = run(False, False)
    kept, kept_calls = run(True, False)
    kernel, kernel_calls = run(True, True)
    assert growing_calls == {(FastDecoderCache, type(None))} and kept_calls == {(HistoryCache, type(None))}
    assert kernel_calls == {(HistoryCache, decode.KernelSteps)}
    assert torch.equal(kept, growing) and torch.equal(kernel, growing)
    assert len({int((row != PAD).sum()) for row in kept}) > 1  # captions of different lengths
    monkeypatch.undo()
    with torch.no_grad():  # decoding's own conditions: no gradient, eval mode (no attention dropout), fp32
        assert attention.history_pays(decoder, images) and not attention.history_pays(decoder, images.double())
        assert not attention.history_pays(decoder.train(), images)
    assert not attention.history_pays(decoder.eval(), images)  # gradients recorded


@pytest.mark.parametrize("kwargs", [dict(num_beams=1), dict(num_beams=3), dict(num_beams=3, drop_finished=False),
                                    dict(do_sample=True, top_p=0.9)])
def test_folded_image_projections_give_the_same_captions(monkeypatch, kwargs):
    """Where a CPU decode folds the cross-attention's image projections into the queries (`attention.folding_pays`),
    the captions are those of the projected image K/V: greedy, beam search (images leaving the batch or not) and
    sampling, with a masked image padding."""
    from med_train import decode
    from med_train.fast import attention
    from med_train.fast.caches import ImageTokens

    entries = []
    real_step = decode._step
    monkeypatch.setattr(decode, "_step", lambda decoder, tokens, cache, *kernel:
                        entries.append(type(cache.cross_kv[0])) or real_step(decoder, tokens, cache, *kernel))
    decoder, images, mask = _ending_decoder_and_padded_images()

    def run(fold_below):
        monkeypatch.setattr(attention, "FOLD_BELOW", fold_below)
        entries.clear()
        generator = torch.Generator().manual_seed(7) if kwargs.get("do_sample") else None
        ids = generate(decoder, images, torch.tensor([BOS, 7]), eos_token_id=EOS, pad_token_id=PAD, max_length=12,
                       min_length=3, image_mask=mask, generator=generator, **kwargs)
        return ids, set(entries)

    projected, projected_entries = run(0.0)  # never pays
    folded, folded_entries = run(1e9)  # always pays
    assert projected_entries == {tuple} and folded_entries == {ImageTokens}
    assert torch.equal(folded, projected)
    assert len({int((row != PAD).sum()) for row in folded}) > 1  # captions of different lengths


@pytest.mark.parametrize("kwargs", [dict(num_beams=1), dict(num_beams=3, drop_finished=False),
                                    dict(num_beams=3, drop_finished=False, early_stopping="never"),
                                    dict(do_sample=True, top_p=0.9)])
def test_steps_over_a_static_cache_give_the_same_captions(monkeypatch, kwargs):
    """The steps a GPU captures in a CUDA graph (`StaticSteps`: preallocated self-attention slots written at a
    device-side position, beams reordered in place, masked image padding) give the captions of the growing cache:
    here run eagerly on the CPU; `test_cuda_graph_steps_give_the_same_captions` replays the graph on a GPU."""
    from med_train import decode

    calls = []
    real_step = decode.StaticSteps.step
    monkeypatch.setattr(decode.StaticSteps, "step", lambda self, *a: calls.append(1) or real_step(self, *a))
    decoder, images, mask = _ending_decoder_and_padded_images()

    def run():
        generator = torch.Generator().manual_seed(7) if kwargs.get("do_sample") else None
        return generate(decoder, images, torch.tensor([BOS, 7]), eos_token_id=EOS, pad_token_id=PAD, max_length=12,
                        min_length=3, image_mask=mask, generator=generator, **kwargs)

    growing = run()
    assert not calls
    monkeypatch.setattr(decode, "_graphs_pay", lambda decoder, device, cuda_graphs: True)
    static = run()
    assert calls  # the static steps ran
    assert torch.equal(static, growing)
    assert len({int((row != PAD).sum()) for row in static}) > 1  # captions of different lengths


def test_cuda_graphs_are_a_gpu_option_the_config_can_turn_off():
    """`cuda_graphs=True` off a GPU, or on a decoder in training mode, is an error that says why; the config's
    `generate.cuda_graphs: false` reaches `generate` as False, true as the default (on a GPU only)."""
    from med_train.config import load_config
    from med_train.evaluate import generate_kwargs

    decoder = _decoder(vocab=30, seed=5)
    images = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        generate(decoder, images, torch.tensor([BOS]), eos_token_id=EOS, pad_token_id=PAD, cuda_graphs=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        generate(decoder, images, torch.tensor([BOS]), eos_token_id=EOS, pad_token_id=PAD, num_beams=2,
                 drop_finished=False, cuda_graphs=True)
    with pytest.raises(ValueError, match="eval mode"):
        generate(decoder.train(), images, torch.tensor([BOS]), eos_token_id=EOS, pad_token_id=PAD, cuda_graphs=True)
    decoder.eval()
    assert generate_kwargs(load_config(None, ["generate.cuda_graphs=false"]))["cuda_graphs"] is False
    assert generate_kwargs(load_config(None))["cuda_graphs"] is None
    assert generate(decoder, images, torch.tensor([BOS]), eos_token_id=EOS, pad_token_id=PAD, max_length=6,
                    cuda_graphs=None).shape[0] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_steps_give_the_same_captions():
    """On a GPU the steps replay one captured CUDA graph: the captions of eager steps in fp32; the graph is kept
    and replayed for the next decode of the same shapes (new images), also under bf16 autocast after the autocast
    that captured it has ended (the graph reads no autocast cache); at most KEEP_CAPTURED graphs are kept."""
    from med_train import decode

    decoder, first, mask = _ending_decoder_and_padded_images()
    batches = [first.cuda(), _ending_decoder_and_padded_images(seed=7)[1].cuda()]
    decoder, mask = decoder.cuda(), mask.cuda()

    def run(images, graphs, **kwargs):
        generator = torch.Generator("cuda").manual_seed(7) if kwargs.get("do_sample") else None
        return generate(decoder, images, torch.tensor([BOS, 7]), eos_token_id=EOS, pad_token_id=PAD, max_length=12,
                        min_length=3, image_mask=mask[: len(images)], generator=generator, cuda_graphs=graphs,
                        **kwargs)

    for kwargs in (dict(num_beams=1), dict(num_beams=3), dict(do_sample=True, top_p=0.9)):
        decode.release_captured_steps(decoder)
        for images in batches:  # the first captures, the second replays the kept graph
            assert torch.equal(run(images, True, **kwargs), run(images, False, **kwargs)), kwargs
        assert len(decode.captured_steps(decoder)) == 1
    agree = []
    for images in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            graphed = run(images, None, num_beams=3)  # the default on a GPU
            eager = run(images, False, num_beams=3)
        torch.randn(1 << 24, device="cuda")  # reuse freed memory
        agree += (graphed == eager).all(1).tolist()
    assert sum(agree) >= 0.8 * len(agree)  # bf16: attention kernels that differ may break a near-tie differently
    run(batches[0][:3], None, num_beams=2)
    run(batches[0][:2], None, num_beams=2)  # a third shape: the oldest graph goes
    assert len(decode.captured_steps(decoder)) == decode.KEEP_CAPTURED
    decode.release_captured_steps(decoder)
    assert not decode.captured_steps(decoder)


def test_static_steps_are_kept_for_the_next_decode_of_their_shapes(monkeypatch):
    """A decode reuses the kept steps (and cache buffers) of the last decode of the same shapes and precision,
    loading the new prefill into them; a new shape adds steps, the least recently used go beyond KEEP_CAPTURED;
    `release_captured_steps` drops them. (On a GPU the kept steps hold a captured graph; here they run eagerly.)"""
    from med_train import decode

    monkeypatch.setattr(decode, "_graphs_pay", lambda decoder, device, cuda_graphs: cuda_graphs is not False)
    decoder, first, mask = _ending_decoder_and_padded_images()
    second = _ending_decoder_and_padded_images(seed=7)[1]

    def run(images, beams=3, graphs=None):
        return generate(decoder, images, torch.tensor([BOS, 7]), eos_token_id=EOS, pad_token_id=PAD, max_length=12,
                        min_length=3, image_mask=mask[: len(images)], num_beams=beams, drop_finished=False,
                        cuda_graphs=graphs)

    decode.release_captured_steps(decoder)
    assert torch.equal(run(first), run(first, graphs=False))
    kept = list(decode.captured_steps(decoder).values())
    assert len(kept) == 1
    assert torch.equal(run(second), run(second, graphs=False))  # the same buffers, the second batch's prefill
    assert list(decode.captured_steps(decoder).values()) == kept
    run(first[:3])
    run(first)  # used again: now the most recent
    run(first[:2])  # a third shape: the least recently used (3 images) goes
    assert len(decode.captured_steps(decoder)) == decode.KEEP_CAPTURED
    assert kept[0] in decode.captured_steps(decoder).values()
    assert {s.cache.self_kv[0].key.shape[0] for s in decode.captured_steps(decoder).values()} == {15, 6}
    decode.release_captured_steps(decoder)
    assert not decode.captured_steps(decoder)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU"))])
def test_threads_decoding_with_one_decoder_get_their_own_captions(monkeypatch, device):
    """Two threads captioning with one decoder at once, same shapes: each thread keeps its own steps and cache
    buffers (on a GPU, its own captured graph), so neither reads the other's (shared ones would mix their images'
    captions). On the CPU the static steps are forced, eager."""
    import threading

    from med_train import decode

    if device == "cpu":
        monkeypatch.setattr(decode, "_graphs_pay", lambda decoder, device, cuda_graphs: cuda_graphs is not False)
    decoder, _, mask = _ending_decoder_and_padded_images()
    decoder, mask = decoder.to(device), mask.to(device)
    batches = [_ending_decoder_and_padded_images(seed=seed)[1].to(device) for seed in (6, 7)]

    def run(images, graphs):
        return generate(decoder, images, torch.tensor([BOS, 7]), eos_token_id=EOS, pad_token_id=PAD, max_length=12,
                        min_length=3, image_mask=mask, num_beams=3, drop_finished=False, cuda_graphs=graphs)

    want = [run(images, False) for images in batches]
    assert not torch.equal(want[0], want[1])
    start, got, kept = threading.Barrier(2), [[], []], [None, None]

    def work(i):
        start.wait()
        got[i] += [run(batches[i], None) for _ in range(20)]
        kept[i] = list(decode.captured_steps(decoder).values())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for mine, expected in zip(got, want, strict=True):
        assert len(mine) == 20 and all(torch.equal(ids, expected) for ids in mine)
    assert len(kept[0]) == len(kept[1]) == 1 and kept[0][0] is not kept[1][0]  # one each
    assert not decode.captured_steps(decoder)  # this thread decoded nothing through them


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_step_that_cannot_be_captured_runs_eagerly_with_a_warning(monkeypatch):
    """A step that a CUDA graph cannot hold (here: one that reads a value back to the host mid-step) is run
    eagerly over the static cache, with a warning, and gives the same captions; the GPU stays usable."""
    from med_train import decode

    decoder = _decoder(vocab=30, seed=5).cuda()
    images = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(6)).cuda()

    def run(graphs):
        return generate(decoder, images, torch.tensor([BOS, 7]), eos_token_id=EOS, pad_token_id=PAD, max_length=10,
                        num_beams=3, cuda_graphs=graphs)

    want = run(False)
    monkeypatch.setattr(decoder, "forward", _syncing(decoder.forward, decoder))
    decode.release_captured_steps(decoder)
    with pytest.warns(UserWarning, match="run eagerly"):
        got = run(None)
    assert torch.equal(got, want)
    assert torch.equal(run(None), want)  # kept: no second capture, no second warning needed


def _syncing(forward, decoder):
    def call(*args, **kwargs):
        decoder.cls.predictions.bias.sum().item()  # a host read-back: not allowed while a graph is captured
        return forward(*args, **kwargs)
    return call


def test_min_and_max_length():
    decoder = _decoder(vocab=6, seed=4)
    images = torch.randn(8, 3, 8, generator=torch.Generator().manual_seed(2))
    prompt = torch.tensor([BOS, 3])
    for beams in (1, 2):
        out = generate(decoder, images, prompt, num_beams=beams, eos_token_id=EOS, pad_token_id=PAD,
                       max_length=9, min_length=6)
        assert out.shape[1] <= 9
        for row in out.tolist():
            if EOS in row:
                assert row.index(EOS) >= 6  # positions 0..5 hold 6 tokens before [SEP]


def test_repetition_penalty_stops_repeats():
    decoder = _decoder(vocab=50, seed=5)
    images = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(3))
    prompt = torch.tensor([BOS])
    plain = greedy_or_sample(decoder, images, prompt, eos_token_id=EOS, pad_token_id=PAD, max_length=15)
    penalised = greedy_or_sample(decoder, images, prompt, eos_token_id=EOS, pad_token_id=PAD, max_length=15,
                                 repetition_penalty=1e6)

    def repeats(row):
        toks = [t for t in row if t not in (PAD, EOS)]
        return len(toks) - len(set(toks))

    assert sum(repeats(r) for r in plain.tolist()) > 0  # the tiny model does repeat itself
    assert all(repeats(r) == 0 for r in penalised.tolist())


def test_sampling_is_seeded_and_its_filters_work():
    decoder = _decoder(vocab=40, seed=6)
    images = torch.randn(6, 3, 8, generator=torch.Generator().manual_seed(4))
    prompt = torch.tensor([BOS])
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, max_length=12)

    def sample(seed, **extra):
        return generate(decoder, images, prompt, do_sample=True, generator=torch.Generator().manual_seed(seed),
                        **kw, **extra)

    assert torch.equal(sample(0, top_p=0.9), sample(0, top_p=0.9))
    assert not torch.equal(sample(0, top_p=1.0, temperature=2.0), sample(1, top_p=1.0, temperature=2.0))
    greedy = generate(decoder, images, prompt, **kw)
    assert torch.equal(sample(0, top_k=1), greedy)
    assert torch.equal(sample(3, top_p=1e-6), greedy)  # the nucleus holds only the most likely token
