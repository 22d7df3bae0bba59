"""The fast decoding caches and attention routes (med_train/fast) against the plain decoder they replace: the same
logits as the full forward, each route taken where it was measured to pay and only there."""

import pytest
import torch
import torch.nn.functional as F
from test_med import HEADS, LAYERS, W_IMG, B, H, N, V, _inputs, _pair

from med_train import fast, med
from med_train.fast import attention, few_rows
from med_train.fast.caches import FastDecoderCache, HistoryCache, ImageTokens, StaticDecoderCache
from med_train.med import med_config


def _prepared():
    """test_med's decoder (transformers' BLIP weights) with the fast paths, whatever MED_FAST says."""
    ours, _ = _pair()
    fast.prepare(ours, "cpu", "decode", enabled_here=True)
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_few_query_attention_equals_sdpa(dtype, queries, masked):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, HEADS, n, 8, generator=g).to(dtype) for n in (queries, 7, 7))
    bias = None
    if masked:
        bias = torch.zeros(2, 1, 1, 7)
        bias[1, ..., 4:] = torch.finfo(torch.float32).min
    got = attention.few_query_attention(q, k, v, bias)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(dtype))
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("kernel", [True, False])
def test_cpu_decoding_attends_outside_sdpa(monkeypatch, beams, kernel):
    """CPU decoding without gradients, with the logits of the full forward: where the few-row kernel is built
    (fp32), cross-attention runs in its fused attention (`few_rows.attend`), prompt and steps, over cross keys
    stored transposed; a step's one self-attention query per text row attends through `few_query_attention`;
    the prompt's self-attention (4 queries) still uses SDPA. Without the kernel, cross keys are stored contiguous
    and the steps' cross-attention uses `few_query_attention` too."""
    if kernel and not few_rows.available():
        pytest.skip("the few-row kernel is not built here")
    if not kernel:
        monkeypatch.setattr(few_rows, "available", lambda: False)
    ours = _prepared()
    _, _, _, images = _inputs()
    text = torch.randint(3, V, (B * beams, 7), generator=torch.Generator().manual_seed(3))
    full = ours(text, encoder_hidden_states=images.repeat_interleave(beams, 0)).logits
    calls = []
    for module, name in ((med.F, "scaled_dot_product_attention"), (few_rows, "attend"),
                         (attention, "few_query_attention")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))

    def decode():
        with torch.no_grad():
            out = ours(text[:, :4], encoder_hidden_states=images, use_cache=True, cache=FastDecoderCache())
            logits = [out.logits]
            prompt = list(calls)
            calls.clear()
            for t in range(4, 7):
                out = ours(text[:, t:t + 1], cache=out.cache, use_cache=True)
                logits.append(out.logits)
        return torch.cat(logits, 1), out.cache, prompt

    logits, cache, prompt = decode()
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    cross = "attend" if kernel else "few_query_attention"
    assert prompt == ["scaled_dot_product_attention", "attend" if kernel else "scaled_dot_product_attention"] * LAYERS
    assert calls == ["few_query_attention", cross] * LAYERS * 3
    key, value = cache.cross_kv[0]
    assert key.transpose(-1, -2).is_contiguous() == kernel and key.is_contiguous() != kernel
    # the kernel reads the values as projected (B_img, N, H) in heads; elsewhere they were made contiguous
    assert value.is_contiguous() != kernel and value.transpose(1, 2).is_contiguous() == kernel
    monkeypatch.setattr(attention, "FEW_QUERIES", 0)  # the steps' few queries go back to SDPA (not the kernel's)
    calls.clear()
    torch.testing.assert_close(decode()[0], full, atol=1e-5, rtol=1e-5)
    cross = "attend" if kernel else "scaled_dot_product_attention"
    assert calls == ["scaled_dot_product_attention", cross] * LAYERS * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", [1, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_folded_cross_attention_equals_attention_over_projected_kv(dtype, queries, masked):
    """Queries carried to the image tokens' width (the key and value projections folded in) attend as SDPA does
    over the projected K/V, the key and value biases included."""
    ours = _prepared()
    attn = ours.bert.encoder.layer[1].crossattention.self
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # BERT's init zeroes biases: give them values, so that dropping bk and adding bv is tested
        for linear in (attn.key, attn.value):
            linear.bias.copy_(torch.randn(linear.bias.shape, generator=g))
    q = torch.randn(2, HEADS, queries, H // HEADS, generator=g).to(dtype)
    image = torch.randn(2, 7, W_IMG, generator=g)
    bias = None
    if masked:
        bias = torch.zeros(2, 1, 1, 7)
        bias[1, ..., 4:] = torch.finfo(torch.float32).min
    k, v = (attn.transpose_for_scores(layer(image)).to(dtype) for layer in (attn.key, attn.value))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(dtype))
    tokens = ImageTokens(image)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    # bmm at the weights' first use, then (fp32, where the few-row kernel is built) the kernel with their panels
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            got = attention.folded_cross_attention(q, tokens, attn.key, attn.value, bias)
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    kernel = attention._folded_panels(q, tokens, attn.key, attn.value) is not None
    assert kernel == (dtype == torch.float32 and few_rows.available())
    if kernel:
        selected = tokens.select(torch.tensor([1, 1, 0]))
        assert all(torch.equal(a, b[[1, 1, 0]]) for a, b in zip(selected.panels(), tokens.panels(), strict=True))


@pytest.mark.parametrize("beams", [1, 3])
def test_folding_cache_decodes_like_projected_kv(monkeypatch, beams):
    """A folding cache (`FastDecoderCache.folding`) gives the logits of the full forward, prompt and steps, with an
    image mask and beams; the image tokens are never projected, and `keep_images` selects them once for all
    layers."""
    ours = _prepared()
    g = torch.Generator().manual_seed(6)
    images = torch.randn(B, N + 2, W_IMG, generator=g)
    mask = torch.ones(B, N + 2, dtype=torch.long)
    mask[1:, N:] = 0  # padded image tokens
    text = torch.randint(3, V, (B * beams, 7), generator=g)
    with torch.no_grad():
        for layer in ours.bert.encoder.layer:  # non-zero key/value biases (BERT's init zeroes them)
            for linear in (layer.crossattention.self.key, layer.crossattention.self.value):
                linear.bias.copy_(torch.randn(linear.bias.shape, generator=g))
        full = ours(text, encoder_hidden_states=images.repeat_interleave(beams, 0),
                    encoder_attention_mask=mask.repeat_interleave(beams, 0)).logits
    projections = []
    for layer in ours.bert.encoder.layer:
        for linear in (layer.crossattention.self.key, layer.crossattention.self.value):
            monkeypatch.setattr(linear, "forward", lambda x: projections.append(x.shape) or torch.zeros(0))
    with torch.no_grad():
        out = ours(text[:, :4], encoder_hidden_states=images, encoder_attention_mask=mask, use_cache=True,
                   cache=FastDecoderCache.folding(images, LAYERS))
        logits = [out.logits]
        for t in range(4, 7):
            out = ours(text[:, t:t + 1], cache=out.cache, use_cache=True)
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=1e-5)
    assert not projections
    cache = out.cache
    assert all(isinstance(kv, ImageTokens) and kv.tokens is images for kv in cache.cross_kv)
    image_bias = cache.cross_mask
    cache.keep_images(torch.tensor([2, 0]), torch.arange(2 * beams))
    assert cache.cross_kv[0] is cache.cross_kv[1] and torch.equal(cache.cross_kv[0].tokens, images[[2, 0]])
    assert torch.equal(cache.cross_mask, image_bias[[2, 0]]) and len(cache) == 7


def test_keep_images_keeps_the_cross_keys_layout():
    """`keep_images` on a projected cache selects the images' cross K/V in the layout they were stored in (keys
    transposed and values as projected where the few-row kernel attends), so the steps after it still attend in
    the kernel; the next step's logits are the full forward's for the images kept."""
    ours = _prepared()
    _, _, _, images = _inputs()
    text = torch.randint(3, V, (B, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = ours(text, encoder_hidden_states=images).logits
        out = ours(text[:, :4], encoder_hidden_states=images, use_cache=True, cache=FastDecoderCache())
        cache = out.cache
        kept = torch.tensor([2, 0])
        before = [(k.stride(), v.stride()) for k, v in cache.cross_kv]
        cache.keep_images(kept, kept)
        assert [(k.stride(), v.stride()) for k, v in cache.cross_kv] == before  # (B_img, ...) strides: B_img first
        assert cache.cross_kv[0][0].transpose(-1, -2).is_contiguous() == few_rows.available()
        step = ours(text[kept, 4:5], cache=cache, use_cache=True).logits
    torch.testing.assert_close(step, full[kept, 4:5], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not few_rows.available(), reason="the few-row kernel is not built here")
def test_history_cache_follows_reordered_beams_like_the_growing_cache():
    """A `HistoryCache` (self K/V written once where computed, the beams' reordering kept as a table of stored
    rows) gives the logits of the growing `DecoderCache` that copies K/V on every reorder: prompt once per image,
    three rows per image, reordered each step, then an image dropped (`keep_images`). A finished decode's cache is
    freed without the garbage collector (no reference cycle)."""
    import gc
    import weakref

    ours = _prepared()
    _, _, _, images = _inputs()
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(3, V, (B, 3), generator=g)
    rows = torch.arange(B).repeat_interleave(3)
    steps = [(torch.randint(3, V, (B * 3,), generator=g), torch.randint(0, B * 3, (B * 3,), generator=g))
             for _ in range(4)]
    with torch.no_grad():
        prefilled = [ours(prompt, encoder_hidden_states=images, use_cache=True, cache=FastDecoderCache()).cache
                     for _ in range(2)]
        growing = prefilled[0]
        growing.reorder(rows)
        history = HistoryCache.following(prefilled[1], rows, 10)
        assert len(history) == len(growing) == 3
        for tokens, src in steps:
            got, want = (ours(tokens[:, None], cache=cache, use_cache=True).logits for cache in (history, growing))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert len(history) == len(growing)
            history.reorder(src)
            growing.reorder(src)
        kept, kept_rows = torch.tensor([2, 0]), torch.tensor([7, 6, 8, 0, 2, 1])
        history.keep_images(kept, kept_rows)
        growing.keep_images(kept, kept_rows)
        tokens = torch.randint(3, V, (6, 1), generator=g)
        torch.testing.assert_close(ours(tokens, cache=history, use_cache=True).logits,
                                   ours(tokens, cache=growing, use_cache=True).logits, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="one token per row"):
            ours(torch.randint(3, V, (6, 2), generator=g), cache=history, use_cache=True)
    store = weakref.ref(history.self_kv[0].key)
    gc.disable()
    try:
        del history
        assert store() is None
    finally:
        gc.enable()


def test_static_cache_steps_give_the_full_forwards_logits():
    """A `StaticDecoderCache` (what a GPU's captured decoding step runs over): loaded from a prefilled cache, with
    each image's row repeated for beams, its steps write K/V in place at a device-side position and give the full
    forward's logits; in-place reordering moves rows; `fits` tells which caches its buffers take."""
    ours = _prepared()
    g = torch.Generator().manual_seed(8)
    beams, capacity = 2, 9
    images = torch.randn(B, N, W_IMG, generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    mask[0, N - 2:] = 0
    text = torch.randint(3, V, (B * beams, 7), generator=g)
    text[:, :3] = text[::beams, :3].repeat_interleave(beams, 0)  # one prompt per image
    rows = torch.arange(B).repeat_interleave(beams)
    with torch.no_grad():
        full = ours(text, encoder_hidden_states=images[rows], encoder_attention_mask=mask[rows]).logits
        prefilled = ours(text[::beams, :3], encoder_hidden_states=images, encoder_attention_mask=mask,
                         use_cache=True, cache=FastDecoderCache()).cache
        cache = StaticDecoderCache.like(prefilled, B * beams, capacity)
        assert cache.fits(prefilled, B * beams, capacity)
        assert not cache.fits(prefilled, B, capacity) and not cache.fits(prefilled, B * beams, capacity + 1)
        cache.load(prefilled, rows)
        assert int(cache.position) == 3
        logits = []
        for t in range(3, 7):
            logits.append(ours(text[:, t:t + 1], cache=cache, use_cache=True).logits)
            cache.position.add_(1)
        torch.testing.assert_close(torch.cat(logits, 1), full[:, 3:], atol=1e-5, rtol=1e-5)
        # reordering in place: rows swapped within each image give the swapped rows' next logits
        swap = torch.arange(B * beams).view(B, beams).flip(1).reshape(-1)
        cache.reorder(swap)
        following = ours(text[swap, 7 - 1:7], cache=cache, use_cache=True).logits  # position 7: a repeated token
        with_swap = ours(torch.cat([text[swap], text[swap, -1:]], 1), encoder_hidden_states=images[rows],
                         encoder_attention_mask=mask[rows]).logits[:, -1:]
        torch.testing.assert_close(following, with_swap, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="one token per row"):
            ours(text[:, :2], cache=cache, use_cache=True)
        with pytest.raises(TypeError, match="device tensor"):
            len(cache)
        assert cache  # truthy all the same


def test_folding_pays_for_few_queries_per_image_in_fp32_cpu_inference():
    """The rule `decode` follows: fold the image projections when the decode asks each image few queries (greedy
    on ViT-B's 197 tokens with BERT-base: 19), project them when it asks many (3 beams: 49); fold only where it
    was measured to pay: on the CPU, in fp32, without gradients."""
    config = med_config(vocab_size=V, encoder_width=768)  # BERT-base: 768 wide, 12 heads
    tokens = torch.zeros(2, 197, 768)
    with torch.no_grad():
        assert attention.folding_pays(config, tokens, 4 + 15)
        assert not attention.folding_pays(config, tokens, 4 + 15 * 3)
        assert not attention.folding_pays(config, tokens, 4 + 15 * 3 * 10)
        assert not attention.folding_pays(config, tokens.bfloat16(), 4 + 15)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not attention.folding_pays(config, tokens, 4 + 15)
    assert not attention.folding_pays(config, tokens, 4 + 15)  # gradients recorded: not a decode
