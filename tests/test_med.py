"""The MED decoder against transformers' BlipTextLMHeadModel (the trusted reference) with the same weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BlipTextConfig
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel

from med_train.cache import DecoderCache
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


@pytest.mark.parametrize("output_logits", [True, False])
def test_gradients_match_transformers_and_stay_dense(output_logits):
    """The training loss's gradients equal transformers' for every weight, the tied word embeddings included, over
    two accumulated backward passes; every .grad is a dense tensor, as fused AdamW and DDP need (tests/fast runs it
    again prepared, where the lookup's gradient is sparse and folds into the LM head's dense one)."""
    assert_gradients_match_transformers(*_pair(), output_logits)


def assert_gradients_match_transformers(ours, ref, output_logits):
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
