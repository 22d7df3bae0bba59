"""Decoding: greedy, beam search (against exhaustive search) and sampling, on tiny random decoders.

The decoders are prepared for the CPU as `med caption` prepares one (`fast.prepare`): with MED_FAST=0 the same
tests run on the plain decoding. tests/fast/test_decoding.py compares each fast route with the plain decoder."""

import itertools

import pytest
import torch

from med_train import decode, fast
from med_train.decode import beam_search, generate, greedy_or_sample
from med_train.med import BertLMHeadModel, med_config

PAD, BOS, EOS = 0, 1, 2


def _plain_decoder(vocab=5, seed=0):
    torch.manual_seed(seed)
    model = BertLMHeadModel(med_config(vocab_size=vocab, hidden_size=16, encoder_width=8, intermediate_size=32,
                                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD,
                                       initializer_range=1.0)).eval()  # large weights: peaked, varied distributions
    return model


def _decoder(vocab=5, seed=0):
    decoder = _plain_decoder(vocab, seed)
    fast.prepare(decoder, "cpu", "decode")
    return decoder


def _plain_ending_decoder():
    """A decoder whose captions end at different steps."""
    decoder = _plain_decoder(vocab=30, seed=5)
    with torch.no_grad():
        decoder.cls.predictions.bias[EOS] = 3.0
    return decoder


def _padded_images(seed=6):
    """5 images of 4 tokens padded with 2 masked ones, and their mask."""
    g = torch.Generator().manual_seed(seed)
    images = torch.cat([torch.randn(5, 4, 8, generator=g), 5 * torch.randn(5, 2, 8, generator=g)], 1)
    return images, torch.tensor([[1] * 4 + [0] * 2] * 5)


def _ending_decoder_and_padded_images(seed=6):
    decoder = _plain_ending_decoder()
    fast.prepare(decoder, "cpu", "decode")
    return (decoder, *_padded_images(seed))


class _WatchedSteps:
    """A decode's steps that call `seen(steps, tokens)` before each step."""

    def __init__(self, steps, seen):
        self.steps, self.seen = steps, seen

    def step(self, tokens, src=None):
        self.seen(self.steps, tokens)
        return self.steps.step(tokens, src)

    def keep_images(self, images, rows):
        self.steps.keep_images(images, rows)


class _WatchedDecoding(decode.Decoding):
    def __init__(self, plan, seen):
        self.plan, self.seen = plan, seen

    def prefill_cache(self, *args):
        return self.plan.prefill_cache(*args)

    def steps(self, *args, **kwargs):
        return _WatchedSteps(self.plan.steps(*args, **kwargs), self.seen)

    def beam_candidates(self, *args):
        return self.plan.beam_candidates(*args)


def watch_steps(monkeypatch, seen) -> None:
    """Call `seen(steps, tokens)` before every decoding step, whichever steps the decoder's decoding runs (the
    plain loop's, or a fast route's, which may never call the decoder's forward)."""
    real = decode.decoding_of
    monkeypatch.setattr(decode, "decoding_of", lambda decoder: _WatchedDecoding(real(decoder), seen))


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
    rows = []
    watch_steps(monkeypatch, lambda steps, tokens: rows.append(len(tokens)))
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
def test_a_length_limit_within_the_prompt_returns_the_prompt(kwargs):
    """`max_length` counts the prompt: at or under its length, every mode returns the prompt for each image."""
    decoder, images, _ = _ending_decoder_and_padded_images()
    prompt = torch.tensor([BOS, 7, 8])
    for max_length in (1, 3):
        ids = generate(decoder, images, prompt, eos_token_id=EOS, pad_token_id=PAD, max_length=max_length, **kwargs)
        assert torch.equal(ids, prompt.expand(len(images), -1))


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
