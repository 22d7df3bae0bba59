"""KernelSteps: a CPU decoding step over a HistoryCache straight through the few-row kernel gives the decoder's own
logits and cache (projected image K/V or a folding cache, masked image tokens, reordered beams, dropped images),
and is only used where it applies."""

import pytest
import torch

from med_train import fast
from med_train.fast import few_rows
from med_train.fast.caches import FastDecoderCache, HistoryCache, ImageTokens
from med_train.fast.kernel_steps import KernelSteps
from med_train.med import BertLMHeadModel, med_config

pytestmark = pytest.mark.skipif(not few_rows.available(), reason="the few-row kernel is not built here")

V, LAYERS, IMAGES, TOKENS, WIDTH = 50, 2, 3, 7, 24


def _decoder(**overrides):
    torch.manual_seed(0)
    config = dict(vocab_size=V, hidden_size=32, encoder_width=WIDTH, intermediate_size=72, num_hidden_layers=LAYERS,
                  num_attention_heads=4, max_position_embeddings=40, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, pad_token_id=0, initializer_range=0.2)
    decoder = BertLMHeadModel(med_config(**{**config, **overrides})).eval()
    fast.prepare(decoder, "cpu", "decode", enabled_here=True)
    with torch.no_grad():  # LayerNorms that are not the identity, biases that are not zero
        for name, p in decoder.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape))
    return decoder


def _images():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(IMAGES, TOKENS, WIDTH, generator=g)
    mask = torch.ones(IMAGES, TOKENS, dtype=torch.long)
    mask[1, 5:] = 0  # padded image tokens, hidden from every step
    return images, mask


@pytest.mark.parametrize("folding", [False, True])
@torch.no_grad()
def test_steps_give_the_decoders_logits_and_history(folding):
    """Three rows per image (beams), reordered after each step, then an image dropped: the logits and every
    layer's stored K/V equal the decoder's own forward over a twin cache."""
    decoder = _decoder()
    images, mask = _images()
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, V, (IMAGES, 2), generator=g)
    rows = torch.arange(IMAGES).repeat_interleave(3)

    def prefilled():
        cache = FastDecoderCache.folding(images, LAYERS) if folding else FastDecoderCache()
        cache = decoder(prompt, encoder_hidden_states=images, encoder_attention_mask=mask, cache=cache,
                        use_cache=True).cache
        assert isinstance(cache.cross_kv[0], ImageTokens) == folding
        return HistoryCache.following(cache, rows, 10)

    ours, theirs = prefilled(), prefilled()
    steps = KernelSteps.for_decoder(decoder)
    assert steps is not None
    for _ in range(3):
        tokens = torch.randint(3, V, (rows.shape[0],), generator=g)
        got = steps.step(tokens, ours)
        want = decoder(tokens[:, None], cache=theirs, use_cache=True).logits[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert len(ours) == len(theirs)
        src = torch.randint(0, rows.shape[0], (rows.shape[0],), generator=g)
        ours.reorder(src)
        theirs.reorder(src)
    kept, kept_rows = torch.tensor([2, 0]), torch.tensor([7, 6, 8, 0, 2, 1])
    ours.keep_images(kept, kept_rows)
    theirs.keep_images(kept, kept_rows)
    tokens = torch.randint(3, V, (6,), generator=g)
    torch.testing.assert_close(steps.step(tokens, ours), decoder(tokens[:, None], cache=theirs, use_cache=True)
                               .logits[:, -1], atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.lineage.source, theirs.lineage.source)
    source = ours.lineage.source[:, : len(ours)]  # (6, T): each text row's history, where it was stored
    positions = torch.arange(len(ours))
    for a, b in zip(ours.self_kv, theirs.self_kv, strict=True):
        for name in ("key", "value"):
            torch.testing.assert_close(getattr(a, name)[positions, source], getattr(b, name)[positions, source],
                                       atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_step_past_the_cache_or_off_its_rows_is_refused():
    decoder = _decoder()
    images, mask = _images()
    cache = decoder(torch.randint(3, V, (IMAGES, 2)), encoder_hidden_states=images, encoder_attention_mask=mask,
                    cache=FastDecoderCache(), use_cache=True).cache
    history = HistoryCache.following(cache, torch.arange(IMAGES), 3)
    steps = KernelSteps.for_decoder(decoder)
    with pytest.raises(ValueError, match="lineage"):
        steps.step(torch.tensor([3, 4]), history)  # two tokens for three rows
    steps.step(torch.tensor([3, 4, 5]), history)
    with pytest.raises(ValueError, match="holds 3 positions"):
        steps.step(torch.tensor([3, 4, 5]), history)


def test_only_where_it_applies():
    """Eval mode, no autograd, no autocast, fp32 CPU weights, our decoder with cross-attention: else None, and the
    decoder's own forward runs."""
    decoder = _decoder()
    with torch.no_grad():
        assert isinstance(KernelSteps.for_decoder(decoder), KernelSteps)
        assert KernelSteps.for_decoder(decoder.train()) is None
        decoder.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert KernelSteps.for_decoder(decoder) is None
        assert KernelSteps.for_decoder(_decoder().double()) is None
        assert KernelSteps.for_decoder(_decoder(add_cross_attention=False)) is None
        assert KernelSteps.for_decoder(torch.nn.Linear(2, 2)) is None
    assert KernelSteps.for_decoder(decoder) is None  # gradients recorded
