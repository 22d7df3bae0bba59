"""The MED decoder against transformers' BlipTextLMHeadModel (the trusted reference) with the same weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BlipTextConfig
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel

from med_train import few_rows, med
from med_train.cache import DecoderCache
from med_train.fast import attention
from med_train.fast.caches import FastDecoderCache, HistoryCache, ImageTokens, StaticDecoderCache
from med_train.med import BertLMHeadModel, med_config

V, H, W_IMG, LAYERS, HEADS = 60, 32, 24, 2, 4
B, T, N = 3, 9, 6


def _pair(label_smoothing=0.1):
    torch.manual_seed(0)
    ref = BlipTextLMHeadModel(BlipTextConfig(
        vocab_size=V, hidden_size=H, encoder_hidden_size=W_IMG, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=40, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, label_smoothing=label_smoothing, pad_token_id=0, bos_token_id=1,
        sep_token_id=2, eos_token_id=2)).eval()
    ours = BertLMHeadModel(med_config(
        vocab_size=V, hidden_size=H, encoder_width=W_IMG, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=40, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=0), label_smoothing=label_smoothing).eval()
    # The same tensors load into both: the state-dict names are BLIP's. transformers also keeps
    # `cls.predictions.decoder.bias`, the same tensor as `cls.predictions.bias`.
    ref_state = ref.state_dict()
    assert set(ours.state_dict()) == set(ref_state) - {"cls.predictions.decoder.bias"}
    ours.load_state_dict({k: v for k, v in ref_state.items() if k != "cls.predictions.decoder.bias"})
    return ours, ref


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt
    images = torch.randn(B, N, W_IMG, generator=g)
    return ids, mask, labels, images


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_and_loss_match_transformers_with_padded_text(reduction):
    ours, ref = _pair()
    ids, mask, labels, images = _inputs()
    a = ref(input_ids=ids, attention_mask=mask, encoder_hidden_states=images, labels=labels, reduction=reduction)
    b = ours(ids, mask, encoder_hidden_states=images, labels=labels, reduction=reduction)
    c = ours(ids, mask, encoder_hidden_states=images, labels=labels, reduction=reduction, output_logits=False)
    valid = mask.bool()  # logits at pad positions are never used; compare the real tokens
    torch.testing.assert_close(b.logits[valid], a.logits[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.loss, a.loss, atol=1e-5, rtol=1e-5)  # LM head on targets only: same loss
    assert c.logits is None
    if reduction == "none":
        assert b.loss.shape == (B,)


def test_return_logits_gives_shifted_logits():
    ours, ref = _pair()
    ids, mask, _, images = _inputs()
    shifted = ours(ids, mask, encoder_hidden_states=images, return_logits=True)
    full = ref(input_ids=ids, attention_mask=mask, encoder_hidden_states=images).logits
    assert shifted.shape == (B, T - 1, V)
    torch.testing.assert_close(shifted[:, :2], full[:, :-1][:, :2], atol=1e-5, rtol=1e-5)


def test_logits_to_keep_runs_the_lm_head_on_the_last_positions_only(monkeypatch):
    """Decoding's prompt needs its last position's logits: `logits_to_keep=1` gives them, equal to transformers'
    full logits there, and the LM head multiplies B rows, not B x T; with labels it is refused."""
    ours, ref = _pair()
    ids, _, labels, images = _inputs()
    full = ref(input_ids=ids, encoder_hidden_states=images).logits
    head_rows = []
    real_head = ours.cls.forward
    monkeypatch.setattr(ours.cls, "forward", lambda hidden, *a: head_rows.append(hidden.shape[:-1])
                        or real_head(hidden, *a))
    with torch.no_grad():
        out = ours(ids, encoder_hidden_states=images, use_cache=True, logits_to_keep=1)
    assert out.logits.shape == (B, 1, V) and head_rows == [(B, 1)]
    torch.testing.assert_close(out.logits, full[:, -1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="logits_to_keep"):
        ours(ids, encoder_hidden_states=images, labels=labels, logits_to_keep=1)


def test_padded_image_tokens_equal_unpadded_images():
    # transformers 5.24's BLIP text model drops `encoder_attention_mask` on its way to the cross-attention, so the
    # reference for a padded image is the same image without its padding tokens.
    ours, ref = _pair()
    ids, _, labels, images = _inputs()
    image_mask = torch.ones(B, N, dtype=torch.long)
    image_mask[0, 4:] = 0
    image_mask[2, 2:] = 0
    padded = ours(ids, encoder_hidden_states=images, encoder_attention_mask=image_mask, labels=labels,
                  reduction="none")
    for i in range(B):
        n = int(image_mask[i].sum())
        want = ref(input_ids=ids[i:i + 1], encoder_hidden_states=images[i:i + 1, :n], labels=labels[i:i + 1],
                   reduction="none")
        torch.testing.assert_close(padded.logits[i:i + 1], want.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded.loss[i:i + 1], want.loss, atol=1e-5, rtol=1e-5)


def test_text_mode_ignores_the_image():
    ours, ref = _pair()
    ids, mask, _, images = _inputs()
    a = ours(ids, mask, encoder_hidden_states=images, mode="text").logits
    b = ours(ids, mask, encoder_hidden_states=torch.randn_like(images), mode="text").logits
    c = ours(ids, mask, mode="text").logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    # the reference runs text-only when it gets no image
    want = ref(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(a[valid], want[valid], atol=1e-5, rtol=1e-5)


def test_non_causal_encoder_matches_transformers():
    ours, ref = _pair()
    ids, mask, _, images = _inputs()
    a = ours(ids, mask, encoder_hidden_states=images, is_decoder=False).logits
    b = ref(input_ids=ids, attention_mask=mask, encoder_hidden_states=images, is_decoder=False).logits
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], atol=1e-5, rtol=1e-5)


def test_loss_definition_by_hand():
    """Next-token cross-entropy with label smoothing, written out: logits[:, :-1] predict labels[:, 1:]."""
    ours, _ = _pair(label_smoothing=0.2)
    ids, mask, labels, images = _inputs()
    with torch.no_grad():
        out = ours(ids, mask, encoder_hidden_states=images, labels=labels, reduction="none")
    logp = out.logits[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    for i in range(B):
        total = 0.0
        for t in range(T - 1):
            if targets[i, t] == -100:
                continue
            nll = -logp[i, t, targets[i, t]]
            smooth = -logp[i, t].mean()
            total = total + 0.8 * nll + 0.2 * smooth
        assert math.isclose(float(out.loss[i]), float(total), rel_tol=1e-5)


def test_output_projection_is_tied_to_word_embeddings():
    ours, _ = _pair()
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight


def test_sdpa_attention_equals_explicit_softmax_attention():
    """The seed's matmul/softmax/mask attention, by hand, against our SDPA layer."""
    ours, _ = _pair()
    attn = ours.bert.encoder.layer[0].crossattention.self
    x = torch.randn(2, 5, H)
    image = torch.randn(2, 7, W_IMG)
    bias = torch.zeros(2, 1, 1, 7)
    bias[1, ..., 4:] = torch.finfo(torch.float32).min
    got, _ = attn(x, encoder_hidden_states=image, encoder_attention_mask=bias)
    q = attn.transpose_for_scores(attn.query(x))
    k = attn.transpose_for_scores(attn.key(image))
    v = attn.transpose_for_scores(attn.value(image))
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.attention_head_size) + bias
    want = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(2, 5, H)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cached_step_by_step_decoding_gives_full_forward_logits():
    ours, _ = _pair()
    ids, _, _, images = _inputs()
    full = ours(ids, encoder_hidden_states=images).logits
    steps = []
    prefix = 3  # a prompt fed at once, then one token at a time
    out = ours(ids[:, :prefix], encoder_hidden_states=images, use_cache=True)
    cache = out.cache
    steps.append(out.logits)
    for t in range(prefix, T):
        out = ours(ids[:, t:t + 1], cache=cache, use_cache=True)  # cross K/V come from the cache: no image
        cache = out.cache
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert len(cache) == T
    assert cache.cross_kv[0][0].shape == (B, HEADS, N, H // HEADS)


def test_attention_reads_and_writes_only_through_the_cache_interface():
    """Every layer's self- and cross-attention hand their K/V to the cache (`self_attention`, `cross_attention`,
    with the layer's index), prompt and steps, in layer order: a cache that records the calls and keeps its K/V
    elsewhere still gives the full forward's logits."""
    ours, _ = _pair()
    ids, _, _, images = _inputs()
    full = ours(ids, encoder_hidden_states=images).logits

    class Recording(DecoderCache):
        def __init__(self):
            super().__init__()
            self.calls, self.kept = [], DecoderCache()

        def self_attention(self, module, query, key, value, attention_mask=None, is_causal=False):
            self.calls.append(("self", module.layer_idx))
            return self.kept.self_attention(module, query, key, value, attention_mask, is_causal)

        def cross_attention(self, module, query, encoder_hidden_states, attention_mask=None):
            self.calls.append(("cross", module.layer_idx))
            return self.kept.cross_attention(module, query, encoder_hidden_states, attention_mask)

        def __len__(self):
            return len(self.kept)

    cache = Recording()
    logits = [ours(ids[:, :3], encoder_hidden_states=images, cache=cache, use_cache=True).logits]
    for t in range(3, T):
        logits.append(ours(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=1e-5)
    per_forward = [(kind, layer) for layer in range(LAYERS) for kind in ("self", "cross")]
    assert cache.calls == per_forward * (1 + T - 3) and not cache.self_kv and not cache.cross_kv
    assert len(cache.kept) == T and len(cache.kept.cross_kv) == LAYERS


def test_the_plain_cache_decodes_with_sdpa_and_without_the_fast_package():
    """The model and its plain cache are the seed's arithmetic: a CPU decode without gradients (where the fast
    caches take other routes) attends through SDPA only and gives the full forward's logits; `med` and `cache`
    import nothing from `med_train.fast`."""
    import subprocess
    import sys

    ours, _ = _pair()
    ids, _, _, images = _inputs()
    full = ours(ids, encoder_hidden_states=images).logits
    calls = []
    real = F.scaled_dot_product_attention
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        out = ours(ids[:, :4], encoder_hidden_states=images, cache=DecoderCache(), use_cache=True)
        logits = [out.logits]
        for t in range(4, T):
            logits.append(ours(ids[:, t:t + 1], cache=out.cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=1e-5)
    assert len(calls) == 2 * LAYERS * (1 + T - 4)
    key = out.cache.cross_kv[0][0]  # as projected, not in the few-row kernel's layout
    assert key.shape == (B, HEADS, N, H // HEADS) and not key.transpose(-1, -2).is_contiguous()
    code = ("import sys, med_train.med, med_train.cache; "
            "sys.exit(any(m.startswith('med_train.fast') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_cross_kv_shared_by_beams_equals_copied_images():
    """Text rows that are a multiple of the image rows (beams) attend to their own image's single K/V copy."""
    ours, _ = _pair()
    ids, _, _, images = _inputs()
    k = 4
    text = torch.randint(3, V, (B * k, 5))
    copied = ours(text, encoder_hidden_states=images.repeat_interleave(k, 0)).logits
    # the cache is built from the B images once, with the B*k text rows
    out = ours(text[:, :2], encoder_hidden_states=images, use_cache=True, cache=DecoderCache())
    logits = [out.logits]
    for t in range(2, 5):
        out = ours(text[:, t:t + 1], cache=out.cache, use_cache=True)
        logits.append(out.logits)
    assert out.cache.cross_kv[0][0].shape[0] == B  # never copied per beam
    torch.testing.assert_close(torch.cat(logits, 1), copied, atol=1e-5, rtol=1e-5)


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
    ours, _ = _pair()
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
    ours, _ = _pair()
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
    ours, _ = _pair()
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
    ours, _ = _pair()
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

    ours, _ = _pair()
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
    ours, _ = _pair()
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


def test_gradient_checkpointing_gives_the_same_gradients():
    ours, _ = _pair()
    ids, mask, labels, images = _inputs()
    images = images.requires_grad_()
    ours.train()

    def grads():
        ours.zero_grad()
        images.grad = None
        loss = ours(ids, mask, encoder_hidden_states=images, labels=labels).loss
        loss.backward()
        return [p.grad.clone() for p in ours.parameters()] + [images.grad.clone()]

    plain = grads()
    ours.set_gradient_checkpointing(True)
    checkpointed = grads()
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_target_only_loss_skips_padding_with_the_same_gradients(checkpointing):
    """`output_logits=False` runs the layers on the real tokens only (med.Packing): the same loss and gradients
    (weights and image tokens) as the padded batch, with the feed-forward seeing mask.sum() rows, not B * T."""
    ours, _ = _pair()
    ids, mask, labels, images = _inputs()
    images = images.requires_grad_()
    ours.train()
    ours.set_gradient_checkpointing(checkpointing)
    rows = []
    ours.bert.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[:-1].numel()))

    def loss_and_grads(output_logits):
        ours.zero_grad()
        images.grad = None
        loss = ours(ids, mask, encoder_hidden_states=images, labels=labels, output_logits=output_logits).loss
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in ours.parameters()] + [images.grad.clone()]

    padded = loss_and_grads(True)
    assert rows[0] == B * T
    packed = loss_and_grads(False)
    assert rows[-1] == int(mask.sum()) < B * T
    for a, b in zip(padded, packed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_padding_skip_and_sparse_embedding_gradient_are_for_the_cpu_only(monkeypatch):
    """On a GPU the decoder runs the padded batch with a dense embedding lookup (cheaper there, README: Speed):
    with the rule saying no, the feed-forward sees B * T rows and the lookup is dense; the loss is unchanged."""
    from med_train import med

    assert med.cpu_savings_pay(torch.device("cpu"))
    assert not med.cpu_savings_pay(torch.device("cuda")) and not med.cpu_savings_pay("cuda:1")
    ours, _ = _pair()
    ids, mask, labels, images = _inputs()
    ours.train()
    rows, sparse = [], []
    ours.bert.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    ours.bert.embeddings.register_forward_pre_hook(
        lambda module, args, kwargs: sparse.append(kwargs["sparse_grad"]), with_kwargs=True)
    on_cpu = ours(ids, mask, encoder_hidden_states=images, labels=labels, output_logits=False).loss
    assert rows[-1] == int(mask.sum()) < B * T and sparse[-1] is True
    monkeypatch.setattr(med, "cpu_savings_pay", lambda device: False)
    elsewhere = ours(ids, mask, encoder_hidden_states=images, labels=labels, output_logits=False).loss
    assert rows[-1] == B * T and sparse[-1] is False
    torch.testing.assert_close(on_cpu, elsewhere, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("output_logits", [True, False])
def test_gradients_match_transformers_and_stay_dense(output_logits):
    """The training loss's gradients equal transformers' for every weight, the tied word embeddings included
    (their lookup's gradient is sparse and folds into the LM head's dense one), over two accumulated backward
    passes; every .grad is a dense tensor, as fused AdamW and DDP need."""
    ours, ref = _pair()
    ids, mask, labels, images = _inputs()
    ours.train()
    ref.train()
    for _ in range(2):  # gradient accumulation: the second pass adds to the first
        ref(input_ids=ids, attention_mask=mask, encoder_hidden_states=images, labels=labels).loss.backward()
        ours(ids, mask, encoder_hidden_states=images, labels=labels, output_logits=output_logits).loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        assert param.grad is not None and param.grad.layout == torch.strided, name
        torch.testing.assert_close(param.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_image_token_projections_train_through_onednn_with_transformers_gradients(monkeypatch):
    """In training, the cross-attention's key and value projections of the image tokens (a ViT's batch x tokens
    rows, from ops.ONEDNN_MIN_ROWS) run their forward and input-gradient products through oneDNN, as the ViT's
    do; the text's few rows stay with F.linear. The gradients equal transformers'."""
    from torch.profiler import profile

    from med_train import ops

    ours, ref = _pair()
    ids, mask, labels, _ = _inputs()
    images = torch.randn(B, 40, W_IMG, generator=torch.Generator().manual_seed(8)).requires_grad_()
    monkeypatch.setattr(ops, "ONEDNN_MIN_ROWS", B * 40)  # the image tokens' rows; the text has B * T = 27
    ours.train()
    ref.train()
    ref_images = images.detach().clone().requires_grad_()
    ref(input_ids=ids, attention_mask=mask, encoder_hidden_states=ref_images, labels=labels).loss.backward()
    with profile() as prof:
        ours(ids, mask, encoder_hidden_states=images, labels=labels).loss.backward()
    onednn_calls = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
    assert onednn_calls == 2 * 2 * LAYERS  # key and value, forward and input gradient, in every layer
    torch.testing.assert_close(images.grad, ref_images.grad, atol=1e-5, rtol=1e-4)
    ref_grads = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_tied_table_gradient_takes_the_lookup_rows_in_place(monkeypatch):
    """The sparse lookup gradient is added into the LM head's dense one in place (`med.TiedTable`), where
    autograd's own dense + sparse accumulation copies the vocabulary-sized gradient (profiled: an in-place add,
    no copy); the gradient stays what the dense lookup gives."""
    from torch.profiler import profile

    ours, _ = _pair()
    ids, mask, labels, images = _inputs()
    ours.train()
    table = ours.bert.embeddings.word_embeddings.weight

    def grad(**kw):
        ours.zero_grad(set_to_none=True)
        with profile(record_shapes=True) as prof:
            ours(ids, mask, encoder_hidden_states=images, labels=labels, **kw).loss.backward()
        table_sized = [e.name for e in prof.events() if e.input_shapes and e.input_shapes[0] == [V, H]]
        return table.grad.clone(), table_sized

    sparse_grad, sparse_ops = grad(output_logits=False)
    assert "aten::add_" in sparse_ops and "aten::copy_" not in sparse_ops and table.grad.is_contiguous()
    # the check sees autograd's accumulation when the lookup's gradient is not routed through TiedTable
    with monkeypatch.context() as patch:
        patch.setattr(med.TiedTable, "apply", lambda weight: (weight, weight))
        _, untied_ops = grad(output_logits=False)
    assert "aten::copy_" in untied_ops
    ours.bert.embeddings.register_forward_pre_hook(
        lambda module, args, kwargs: kwargs.update(sparse_grad=False, word_weight=None) or (args, kwargs),
        with_kwargs=True)
    dense_grad, _ = grad(output_logits=False)
    torch.testing.assert_close(sparse_grad, dense_grad, atol=1e-6, rtol=1e-5)


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = BertLMHeadModel(med_config(vocab_size=V, hidden_size=H, encoder_width=W_IMG, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=HEADS, hidden_dropout_prob=0.5,
                                       attention_probs_dropout_prob=0.5, pad_token_id=0))
    ids, mask, _, images = _inputs()
    model.eval()
    torch.testing.assert_close(model(ids, mask, encoder_hidden_states=images).logits,
                               model(ids, mask, encoder_hidden_states=images).logits)
    model.train()
    a = model(ids, mask, encoder_hidden_states=images).logits
    b = model(ids, mask, encoder_hidden_states=images).logits
    assert not torch.allclose(a, b)
    assert F.mse_loss(a, b) > 0
