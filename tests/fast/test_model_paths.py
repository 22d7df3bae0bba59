"""The captioner's fast paths (`fast.prepare`): timm's ViT blocks with fused training ops (`fast.vit`), the decoder's
fused feed-forward (`fast.decoder.LeanLayer`) and a decoding step's fused element-wise passes, products with prepacked weights kept by each linear
(`ops.FastLinear`), bf16 on CPUs without oneDNN's bf16 products: the plain model's values, gradients and captions;
and what a prepared model keeps, and when it lets it go."""

import copy
import gc
import weakref

import pytest
import torch
from conftest import tiny_model_config
from test_model import CAPTIONS, _images

from med_train import fast
from med_train.fast import ops
from med_train.fast.decoder import LeanLayer
from med_train.fast.decoding import FastDecoding
from med_train.fast.vit import LeanBlock
from med_train.model import Captioner
from med_train.tokenizer import encode_captions


def _prepared(tokenizer, use="decode"):
    """The tests' tiny captioner, prepared with every fast path for the CPU."""
    torch.manual_seed(0)
    model = Captioner(tiny_model_config(), tokenizer).eval()
    fast.prepare(model, "cpu", use, enabled_here=True)
    return model


# ---- the ViT's MLP: one stored activation instead of two ---------------------------------------------------------

def _vit(tokenizer):
    """A prepared captioner's ViT, in training mode (where its blocks fuse)."""
    return _prepared(tokenizer, "train").visual_encoder.train()


def _plain_copy(vit):
    """timm's own ViT (Block, Attention, Mlp forwards) with the same weights: the keys are the same."""
    import timm

    assert all(isinstance(block, LeanBlock) for block in vit.blocks)
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=48, depth=2,
                              num_heads=3)
    plain.load_state_dict(vit.state_dict())
    assert type(plain.blocks[0]).__name__ == "Block"
    return plain


def test_gelu_linear_and_layer_norm_linear_gradients_are_exact():
    from med_train.fast.ops import gelu_linear

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(gelu_linear, (h, w, b))
    assert torch.autograd.gradcheck(gelu_linear, (h, w, None))
    assert torch.autograd.gradcheck(lambda h: gelu_linear(h, w.detach(), b.detach()), (h,))

    from med_train.fast.ops import _LayerNormLinear

    def fused(x, norm_weight, norm_bias, weight, bias):  # layer_norm_linear's function, on plain tensors
        return _LayerNormLinear.apply(x, norm_weight, norm_bias, 1e-6, weight, bias)

    tensors = (h, torch.rand(8, dtype=torch.float64, generator=g).add(0.5).requires_grad_(),
               torch.randn(8, dtype=torch.float64, generator=g).requires_grad_(),
               torch.randn(5, 8, dtype=torch.float64, generator=g).requires_grad_(), b)
    assert torch.autograd.gradcheck(fused, tensors)


@pytest.mark.parametrize("bf16,onednn", [(False, False), (True, False), (False, True)])
def test_lean_vit_matches_timms_forward_and_gradients(bf16, onednn, monkeypatch, tokenizer):
    """`onednn`: every product at these tiny sizes goes through ops.product's oneDNN kernel, as a ViT-B batch's do."""
    from med_train.fast import ops

    if onednn:
        monkeypatch.setattr(ops, "ONEDNN_MIN_ROWS", 1)
    vit = _vit(tokenizer)
    plain = _plain_copy(vit)
    images = _images(n=2, size=32)
    grads = []
    for model in (vit, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.forward_features(images)
        (out.float() ** 2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert grads[0].keys() == grads[1].keys() and vit.state_dict().keys() == plain.state_dict().keys()
    for name in grads[0]:
        tolerance = dict(rtol=2e-2, atol=2e-3) if bf16 else {}
        torch.testing.assert_close(grads[0][name], grads[1][name], **tolerance, msg=name)


@pytest.mark.parametrize("rows", [50, 1100])
def test_training_products_take_onednn_for_many_rows_with_the_same_gradients(rows):
    """ops.product: from ONEDNN_MIN_ROWS rows (a ViT batch) the forward and input-gradient products of the fused
    ops and of training_linear run through oneDNN; values and gradients equal the plain ops' (F.linear, F.gelu,
    F.layer_norm under autograd)."""
    import torch.nn.functional as F
    from torch.profiler import profile

    from med_train.fast import ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 24, generator=g, requires_grad=True)
    wide = torch.nn.Linear(24, 40)
    narrow = torch.nn.Linear(40, 24)
    norm = torch.nn.LayerNorm(24)
    with torch.no_grad():
        norm.weight.add_(torch.rand(24, generator=g))

    def run(fused):
        for t in (x, *wide.parameters(), *narrow.parameters(), *norm.parameters()):
            t.grad = None
        if fused:
            h = ops.layer_norm_linear(x, norm, wide)
            y = ops.training_linear(ops.gelu_linear(h, narrow.weight, narrow.bias), narrow.weight.t(),
                                    None)
        else:
            h = F.linear(norm(x), wide.weight, wide.bias)
            y = F.linear(F.linear(F.gelu(h), narrow.weight, narrow.bias), narrow.weight.t())
        (y.sin().sum()).backward()
        return [y.detach(), x.grad] + [p.grad for m in (wide, narrow, norm) for p in m.parameters()]

    with profile() as prof:
        fused = run(True)
    onednn_calls = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
    assert onednn_calls == (6 if rows >= ops.ONEDNN_MIN_ROWS else 0)  # three forward, three input-gradient
    for a, b in zip(fused, run(False), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_lean_blocks_store_each_activation_once(tokenizer):
    vit = _vit(tokenizer)
    plain = _plain_copy(vit)
    images = _images(n=2, size=32)
    saved = []
    for model in (vit, plain):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(t, params=params, storages=storages):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.forward_features(images).sum().backward()
        saved.append(sum(storages.values()))
    hidden, normed = 2 * 17 * 192 * 4, 2 * 17 * 48 * 4  # images x tokens x width x fp32 bytes
    # per block: the activated hidden copy and the two normed copies of the block's input are not kept
    assert saved[1] - saved[0] == 2 * (hidden + 2 * normed)


def test_decoder_feed_forward_matches_the_plain_one_with_gradients(tokenizer, monkeypatch):
    """LeanLayer's feed-forward in training (GELU folded into the output dense, `ops.gelu_linear`) against
    dense -> GELU -> dense -> dropout -> residual -> LayerNorm written out, on the whole captioning loss."""
    import torch.nn.functional as F

    from med_train.fast import decoder

    def plain(self, hidden_states):
        out = self.output
        wide = out.dense(F.gelu(self.intermediate.dense(hidden_states)))
        return out.LayerNorm(out.dropout(wide) + hidden_states)

    fused = []
    real = decoder.gelu_linear
    monkeypatch.setattr(decoder, "gelu_linear", lambda *a: fused.append(1) or real(*a))
    grads, losses = [], []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(LeanLayer, "feed_forward_chunk", plain)
        model = _prepared(tokenizer, "train").train()
        assert all(type(layer) is LeanLayer for layer in model.text_decoder.bert.encoder.layer)
        fused.clear()
        loss = model(_images(), CAPTIONS)
        assert bool(fused) is not patch  # the fused feed-forward ran, or the written-out one
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.text_decoder.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and any("intermediate.dense" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


# ---- prepacked weights, kept by each linear ----------------------------------------------------------------------

def _kept(model) -> dict:
    """`name.weight` -> the layouts its linear keeps a copy of it in, for each linear that keeps one."""
    kept = {}
    for name, module in model.named_modules():
        layouts = {layout for layout, copy_ in module.__dict__.get("_kept", {}).items() if copy_ is not None}
        if isinstance(module, ops.FastLinear) and layouts:
            kept[f"{name}.weight"] = layouts
    return kept


def _kept_copies(model) -> list:
    return [copy_ for module in model.modules() if isinstance(module, ops.FastLinear)
            for copy_ in module.__dict__.get("_kept", {}).values() if copy_ is not None]


@pytest.mark.parametrize("bf16", [False, True])
def test_eval_mode_products_use_prepacked_weights_with_the_same_results(tokenizer, monkeypatch, bf16):
    """In eval mode on the CPU (no gradient; fp32, or bf16 autocast) every product of the ViT blocks and the
    decoder runs with its weight prepacked (`FastLinear.packed`): through oneDNN, or in fp32 with a step's few rows
    through the few-row kernel where it is built: the same image tokens, logits and captions (greedy and beam) as
    F.linear's, to float rounding; in fp32 those of the unprepared model."""
    from med_train.fast import few_rows

    if bf16 and not ops.ONEDNN_BF16:
        pytest.skip("this CPU has no oneDNN bf16 products (the fallback is tested below)")
    torch.manual_seed(0)
    plain_model = Captioner(tiny_model_config(), tokenizer).eval()
    model = copy.deepcopy(plain_model)
    fast.prepare(model, "cpu", "decode", enabled_here=True)
    assert not any(module.training for module in model.modules())  # prepared in eval mode, it stays there
    images = _images()
    batch = encode_captions(tokenizer, CAPTIONS, model.cfg.prompt, 40)

    def outputs(model):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tokens = model.encode_images(images)
            logits = model.text_decoder(batch["input_ids"], batch["attention_mask"],
                                        encoder_hidden_states=tokens).logits
            return tokens, logits, [model.generate_ids(images, num_beams=b, max_length=12, min_length=6)
                                    for b in (1, 3)]

    packed = outputs(model)
    linears = {f"{name}.weight" for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and (name.startswith("text_decoder") or ".blocks." in name)}
    layouts = _kept(model)
    assert len(linears) > 20 and set(layouts) == linears
    if bf16 or not few_rows.available():
        assert set().union(*layouts.values()) == {torch.bfloat16 if bf16 else torch.float32}
    else:  # a decoding step's few rows go through the kernel (here the tiny ViT's tokens too)
        assert set().union(*layouts.values()) <= {torch.float32, ops.FEW_ROWS}
        assert all(ops.FEW_ROWS in layouts[n] for n in linears if n.startswith("text_decoder"))
    references = [outputs(plain_model)] if not bf16 else []
    monkeypatch.setattr(ops, "_packed_dtype", lambda x, weight: None)
    references.append(outputs(model))
    tolerance = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
    for plain in references:
        assert packed[1].dtype == plain[1].dtype
        torch.testing.assert_close(packed[0], plain[0], **tolerance)
        torch.testing.assert_close(packed[1], plain[1], **tolerance)
        for a, b in zip(packed[2], plain[2], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", [True, False])
def test_a_decoding_steps_element_wise_passes_are_fused_with_the_same_logits(tokenizer, monkeypatch, kernel):
    """In a CPU decoding step (fp32, few rows, no gradient) a prepared decoder applies each GELU as its product
    stores it, and each residual add with its LayerNorm in one pass (`ops.add_norm`), where the few-row kernel is
    chosen: the plain decoder's logits to float rounding, with every layer's and the head's passes fused. Without
    the kernel, or with rows to train on, the same modules run torch's own ops."""
    from med_train.fast import few_rows

    if kernel and not few_rows.available():
        pytest.skip("the few-row kernel is not built here")
    torch.manual_seed(0)
    plain_model = Captioner(tiny_model_config(), tokenizer).eval()
    model = copy.deepcopy(plain_model)
    fast.prepare(model, "cpu", "decode", enabled_here=True)
    monkeypatch.setattr(ops.ROUTES, "few_rows", kernel)  # after `prepare`, which chooses the routes
    calls = {"gelu": 0, "norm": 0}
    real_linear, real_norm = few_rows._linear, few_rows.add_norm

    def linear(x, panels, outputs, bias, gelu):
        calls["gelu"] += gelu
        return real_linear(x, panels, outputs, bias, gelu)

    def add_norm(*args):
        calls["norm"] += 1
        return real_norm(*args)

    monkeypatch.setattr(few_rows, "_linear", linear)
    monkeypatch.setattr(few_rows, "add_norm", add_norm)
    batch = encode_captions(tokenizer, CAPTIONS, model.cfg.prompt, 40)
    ids, mask = batch["input_ids"][:, :3], batch["attention_mask"][:, :3]  # 2 captions x 3 tokens: few rows
    images = _images()

    def logits(model):
        with torch.no_grad():
            tokens = model.encode_images(images)
            return model.text_decoder(ids, mask, encoder_hidden_states=tokens).logits

    first = logits(model)  # the kernel's panels are made at a weight's second use
    calls.update(gelu=0, norm=0)
    fused = logits(model)
    layers = model.text_decoder.config.num_hidden_layers
    if kernel:
        assert calls == {"gelu": layers + 1, "norm": 3 * layers + 1}  # each layer's GELU and 3 norms, the head's
    else:
        assert calls == {"gelu": 0, "norm": 0}
    want = logits(plain_model)
    torch.testing.assert_close(first, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, want, atol=1e-5, rtol=1e-5)
    trained = logits(model.train())
    assert calls["norm"] == (3 * layers + 1 if kernel else 0)  # training mode: torch's own ops
    torch.testing.assert_close(trained, logits(plain_model.train()), atol=1e-5, rtol=1e-5)


def test_bf16_on_a_cpu_without_onednn_bf16_takes_f_linears_path(tokenizer, monkeypatch):
    """On CPUs without AVX512BW/VL/DQ or AVX_NE_CONVERT, oneDNN cannot reorder a weight to bf16 ("bf16 path needs
    the cpu support avx_ne_convert or avx512bw..."): captioning under bf16 autocast there packs nothing in bf16 and
    gives F.linear's captions."""
    real_reorder = torch.ops.mkldnn._reorder_linear_weight

    def reorder(weight, *args, **kwargs):  # what such a CPU does
        if weight.dtype == torch.bfloat16:
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or "
                               "avx512bw, avx512vl and avx512dq")
        return real_reorder(weight, *args, **kwargs)

    model = _prepared(tokenizer)

    def captions():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return [model.generate_ids(_images(), num_beams=b, max_length=12, min_length=6) for b in (1, 3)]

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", reorder)
    if ops.ONEDNN_BF16:  # this CPU has them: the packed path would reach the failing reorder
        with pytest.raises(RuntimeError, match="bf16 path needs"):
            captions(), captions()
        fast.release(model)
    monkeypatch.setattr(ops, "ONEDNN_BF16", False)
    fallback = [captions() for _ in range(2)][-1]  # the second pass is where weights get packed
    assert not any(torch.bfloat16 in layouts for layouts in _kept(model).values())
    monkeypatch.setattr(ops, "_packed_dtype", lambda x, weight: None)
    for a, b in zip(fallback, captions(), strict=True):
        assert torch.equal(a, b)


def test_prepacked_weights_follow_weight_changes_and_go_in_training(tokenizer):
    """A weight changed in place (an optimizer step, a loaded checkpoint) is packed again, never used stale;
    training mode and gradients use F.linear, and `train()` frees the packed copies."""
    model = _prepared(tokenizer)
    images = _images()
    query = model.text_decoder.bert.encoder.layer[0].attention.self.query  # used at every decoding step
    with torch.no_grad():
        model.generate_ids(images, num_beams=1, max_length=12)
        assert "text_decoder.bert.encoder.layer.0.attention.self.query.weight" in _kept(model)
        for p in model.text_decoder.parameters():
            p.mul_(1.5)  # in place, as AdamW does
        x = images.new_ones(2, query.in_features)
        expected = torch.nn.functional.linear(x, query.weight, query.bias)
        for _ in range(3):  # the first use after the change, then the weight packed again, then that copy
            torch.testing.assert_close(query(x), expected)
    assert "text_decoder.bert.encoder.layer.0.attention.self.query.weight" in _kept(model)
    model.train()
    assert not _kept(model)
    with torch.no_grad():
        model(images, CAPTIONS)  # training mode: plain products, nothing packed
    model.eval()
    model(images, CAPTIONS).backward()  # gradients: plain products
    assert not _kept(model)


def test_kept_copies_are_freed_by_training_and_go_with_the_model(tokenizer):
    """What a prepared model keeps for inference belongs to it alone: `train()` frees it at once (no table
    elsewhere holds it), `fast.release` too, and deleting the model frees the rest."""
    model = _prepared(tokenizer)

    def caption_and_watch(model):
        with torch.no_grad():
            for _ in range(2):  # copies are made at a weight's second use
                model.generate_ids(_images(), num_beams=3, max_length=12)
        copies = _kept_copies(model)
        assert len(copies) > 20
        return [weakref.ref(copy_) for copy_ in copies]

    copies = caption_and_watch(model)
    model.train()
    gc.collect()
    assert not any(ref() is not None for ref in copies)
    model.eval()
    copies = caption_and_watch(model)
    fast.release(model)
    gc.collect()
    assert not _kept(model) and not any(ref() is not None for ref in copies)
    copies = caption_and_watch(model)
    del model
    gc.collect()
    assert not any(ref() is not None for ref in copies)


def test_med_fast_0_leaves_a_model_untouched(tokenizer, monkeypatch):
    """With MED_FAST=0 in the environment `fast.prepare` changes nothing (no FastLinear, lean block or layer, no
    decoding of its own), and that stays decided for the model; without it, the same call prepares one."""
    monkeypatch.setenv("MED_FAST", "0")
    torch.manual_seed(0)
    model = Captioner(tiny_model_config(), tokenizer).eval()
    classes = [(name, type(module)) for name, module in model.named_modules()]
    report = fast.prepare(model, "cpu", "decode")
    assert [(name, type(module)) for name, module in model.named_modules()] == classes
    assert not any(isinstance(m, ops.FastLinear | LeanBlock | LeanLayer) for m in model.modules())
    assert not hasattr(model.text_decoder, "decoding") and report.describe() == "fast paths: off"
    monkeypatch.delenv("MED_FAST")
    assert fast.prepare(model, "cpu", "decode") is report  # decided once per model
    assert not hasattr(model.text_decoder, "decoding")
    other = Captioner(tiny_model_config(), tokenizer).eval()
    fast.prepare(other, "cpu", "decode")
    assert isinstance(other.text_decoder.decoding, FastDecoding)
    assert any(isinstance(m, ops.FastLinear) for m in other.modules())
