"""The captioner: loss, generation, checkpoints, BERT and BLIP initialisation."""

import pickle

import pytest
import torch
from conftest import tiny_model_config

from med_train.convert import load_blip_checkpoint
from med_train.model import Captioner
from med_train.tokenizer import encode_captions

CAPTIONS = ["a red circle above a blue square", "a small green triangle", "a cat on the sofa"]


def _images(n=3, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_loss_is_the_decoders_next_token_loss_on_the_caption_only(tokenizer, tiny_config):
    torch.manual_seed(0)
    model = Captioner(tiny_config, tokenizer).eval()
    images = _images()
    loss = model(images, CAPTIONS)
    batch = encode_captions(tokenizer, CAPTIONS, tiny_config.prompt, 40)
    # prompt positions and pads carry no target; [DEC] starts every caption; [SEP] is a target
    assert (batch["labels"][:, : model.prompt_length] == -100).all()
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    assert model.prompt_length == 4  # [DEC] a picture of
    assert (batch["labels"] == tokenizer.sep_token_id).sum() == len(CAPTIONS)
    full = model.text_decoder(batch["input_ids"], batch["attention_mask"],
                              encoder_hidden_states=model.visual_encoder.forward_features(images),
                              labels=batch["labels"])
    torch.testing.assert_close(loss, full.loss)
    loss.backward()
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight.grad.abs().sum() > 0


def test_loss_changes_with_the_image(tokenizer, tiny_config):
    torch.manual_seed(0)
    model = Captioner(tiny_config, tokenizer).eval()
    assert not torch.allclose(model(_images(seed=0), CAPTIONS), model(_images(seed=1), CAPTIONS))


def test_uint8_images_are_normalised_with_the_models_mean_and_std(tokenizer, tiny_config, tmp_path):
    """The data pipeline hands over uint8 pixels; the model normalises them with the config's mean and std (kept
    through save and load), and float images are taken as normalised already."""
    from dataclasses import replace

    cfg = replace(tiny_config, vision=replace(tiny_config.vision, mean=[0.2, 0.4, 0.6], std=[0.1, 0.3, 0.5]))
    torch.manual_seed(0)
    model = Captioner(cfg, tokenizer).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    by_hand = (pixels.double() / 255 - torch.tensor([0.2, 0.4, 0.6]).double()[:, None, None]) / \
        torch.tensor([0.1, 0.3, 0.5]).double()[:, None, None]
    expected = model.visual_encoder.forward_features(by_hand.float())
    torch.testing.assert_close(model.encode_images(pixels), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.encode_images(by_hand.float()), expected)
    model.save_pretrained(tmp_path / "m")
    loaded = Captioner.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(loaded.encode_images(pixels), model.encode_images(pixels))
    assert loaded.pixel_mean.tolist() == pytest.approx([0.2, 0.4, 0.6])


def test_generate_returns_captions_without_the_prompt(tokenizer, tiny_config):
    torch.manual_seed(0)
    model = Captioner(tiny_config, tokenizer).eval()
    images = _images()
    seeded = dict(do_sample=True, top_p=0.9)
    for kwargs in (dict(num_beams=1), dict(num_beams=3), seeded):
        if kwargs is seeded:
            kwargs["generator"] = torch.Generator().manual_seed(0)
        captions = model.generate(images, max_length=12, min_length=6, **kwargs)
        assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
        if kwargs is seeded:
            kwargs["generator"] = torch.Generator().manual_seed(0)
        ids = model.generate_ids(images, max_length=12, min_length=6, **kwargs)
        assert (ids[:, :4] == model.prompt_ids).all()
        assert captions[0] == tokenizer.decode(ids[0, 4:], skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="no room"):
        model.generate(images, max_length=4)


def test_save_and_load_round_trip(tokenizer, tiny_config, tmp_path):
    torch.manual_seed(0)
    model = Captioner(tiny_config, tokenizer).eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded = Captioner.from_pretrained(tmp_path / "m").eval()
    images = _images()
    torch.testing.assert_close(loaded(images, CAPTIONS), model(images, CAPTIONS))
    assert loaded.generate(images, num_beams=2, max_length=10) == model.generate(images, num_beams=2, max_length=10)
    assert loaded.cfg == model.cfg
    assert loaded.text_decoder.cls.predictions.decoder.weight is \
        loaded.text_decoder.bert.embeddings.word_embeddings.weight


def test_from_pretrained_on_a_folder_without_a_model_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a med_train model"):
        Captioner.from_pretrained(tmp_path)


def test_decoder_starts_from_a_bert_checkpoint(tokenizer, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(1)
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer) - 2, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "bert")
    cfg = tiny_model_config(init=str(tmp_path / "bert"))
    cfg.text.hidden_size = 999  # the checkpoint's sizes win
    model = Captioner(cfg, tokenizer)
    assert model.cfg.text.hidden_size == 32
    ours, theirs = model.text_decoder.state_dict(), bert.state_dict()
    word = "bert.embeddings.word_embeddings.weight"
    torch.testing.assert_close(ours[word][: len(tokenizer) - 2], theirs[word])
    assert ours[word].shape[0] == len(tokenizer)  # grown for [DEC] and [ENC]
    for key in ("bert.encoder.layer.1.attention.self.query.weight", "bert.encoder.layer.0.output.dense.bias",
                "cls.predictions.transform.dense.weight"):
        torch.testing.assert_close(ours[key], theirs[key])
    cross = "bert.encoder.layer.0.crossattention.self.key.weight"
    assert cross not in theirs and ours[cross].shape == (32, 48)  # new, from the ViT width


def _blip_file(model, path, **extra):
    state = {k: v for k, v in model.state_dict().items()}
    state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"]
    torch.save({"model": state, **extra}, path)


def test_blip_checkpoint_round_trip_with_position_embedding_resize(tokenizer, tmp_path):
    torch.manual_seed(0)
    source = Captioner(tiny_model_config(), tokenizer).eval()
    _blip_file(source, tmp_path / "blip.pth")
    same = Captioner(tiny_model_config(init=f"blip:{tmp_path / 'blip.pth'}"), tokenizer).eval()
    images = _images()
    torch.testing.assert_close(same(images, CAPTIONS), source(images, CAPTIONS))

    bigger = tiny_model_config()
    bigger.vision.image_size = 48  # 4x4 -> 6x6 patches
    target = Captioner(bigger, tokenizer)
    load_blip_checkpoint(target, tmp_path / "blip.pth")
    assert target.visual_encoder.pos_embed.shape == (1, 37, 48)
    torch.testing.assert_close(target.visual_encoder.pos_embed[:, 0], source.visual_encoder.pos_embed[:, 0])
    torch.testing.assert_close(target.text_decoder.state_dict()["bert.encoder.layer.1.output.dense.weight"],
                               source.text_decoder.state_dict()["bert.encoder.layer.1.output.dense.weight"])


def test_blip_checkpoint_shape_mismatch_lists_the_keys(tokenizer, tmp_path):
    torch.manual_seed(0)
    source = Captioner(tiny_model_config(), tokenizer)
    _blip_file(source, tmp_path / "blip.pth")
    wider = tiny_model_config()
    wider.text.intermediate_size = 128
    with pytest.raises(ValueError, match="intermediate.dense.weight") as err:
        load_blip_checkpoint(Captioner(wider, tokenizer), tmp_path / "blip.pth")
    assert "shape mismatches" in str(err.value)


class _Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_blip_checkpoint_never_runs_pickled_code(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = Captioner(tiny_model_config(), tokenizer)
    _blip_file(model, tmp_path / "evil.pth", extra=_Payload())
    with pytest.raises(pickle.UnpicklingError):
        load_blip_checkpoint(model, tmp_path / "evil.pth")


def test_gradient_checkpointing_in_both_towers_gives_the_same_gradients(tokenizer):
    images = _images()

    def grads(checkpointing):
        torch.manual_seed(0)
        cfg = tiny_model_config(grad_checkpointing=checkpointing)
        cfg.vision.grad_checkpointing = checkpointing
        model = Captioner(cfg, tokenizer).train()
        model(images, CAPTIONS).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5, msg=name)


def test_weights_that_do_not_match_the_config_fail_with_the_keys(tokenizer, tiny_config, tmp_path):
    import json

    torch.manual_seed(0)
    Captioner(tiny_config, tokenizer).save_pretrained(tmp_path / "m")
    meta_path = tmp_path / "m" / "med_config.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["text"]["intermediate_size"] = 96
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="intermediate.dense.weight") as err:
        Captioner.from_pretrained(tmp_path / "m")
    assert "does not match its config" in str(err.value)


def test_conv_stem_and_sincos_position_embeddings(tokenizer):
    from timm.layers import build_sincos2d_pos_embed

    from med_train.export import export_hf

    cfg = tiny_model_config()
    cfg.vision.stem, cfg.vision.pos_embed_init = "conv", "sincos"
    torch.manual_seed(0)
    model = Captioner(cfg, tokenizer)
    stem = model.visual_encoder.patch_embed.proj
    assert [m.stride for m in stem if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 3  # patch 8 = 2 x 2 x 2
    assert model.encode_images(_images()).shape == (3, 1 + 16, 48)
    table = build_sincos2d_pos_embed([4, 4], 48)
    torch.testing.assert_close(model.visual_encoder.pos_embed[0, 1:].detach(), table)
    model(_images(), CAPTIONS).backward()
    assert stem[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not a plain ViT"):
        export_hf(model, "/nonexistent")


def test_decoder_position_embeddings_are_added_to_the_image_tokens(tokenizer):
    from med_train.export import export_hf

    cfg = tiny_model_config()
    cfg.vision.decoder_pos_embed = True
    torch.manual_seed(0)
    model = Captioner(cfg, tokenizer).eval()
    images = _images()
    plain = model.visual_encoder.forward_features(images)
    added = model.encode_images(images) - plain
    torch.testing.assert_close(added[0], model.image_pos_embed[0].detach())
    assert added[0, 0].abs().sum() == 0 and added[0, 1:].abs().sum() > 0  # class token row stays zero
    with pytest.raises(ValueError, match="not a plain ViT"):
        export_hf(model, "/nonexistent")


# ---- the ViT's MLP: one stored activation instead of two ---------------------------------------------------------

def _vit(**kwargs):
    from med_train.config import VisionConfig
    from med_train.model import create_vision_encoder

    torch.manual_seed(0)
    return create_vision_encoder(VisionConfig(name="vit_tiny_patch16_224", image_size=32, kwargs=dict(
        patch_size=8, embed_dim=48, depth=2, num_heads=3, **kwargs)), load_weights=False)


def _plain_copy(vit):
    """timm's own ViT (Block, Attention, Mlp forwards) with the same weights: the keys are the same."""
    import timm

    from med_train.model import LeanBlock

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
def test_lean_vit_matches_timms_forward_and_gradients(bf16, onednn, monkeypatch):
    """`onednn`: every product at these tiny sizes goes through ops.product's oneDNN kernel, as a ViT-B batch's do."""
    from med_train.fast import ops

    if onednn:
        monkeypatch.setattr(ops, "ONEDNN_MIN_ROWS", 1)
    vit = _vit()
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


def test_lean_blocks_store_each_activation_once():
    vit = _vit()
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


def test_decoder_feed_forward_matches_the_plain_one_with_gradients(tokenizer, tiny_config, monkeypatch):
    """BertLayer.feed_forward (GELU folded into the output dense) against dense -> GELU -> dense -> dropout ->
    residual -> LayerNorm written out, on the whole captioning loss."""
    import torch.nn.functional as F

    from med_train.med import BertLayer

    def plain(self, hidden_states):
        out = self.output
        wide = out.dense(F.gelu(self.intermediate.dense(hidden_states)))
        return out.LayerNorm(out.dropout(wide) + hidden_states)

    grads, losses = [], []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(BertLayer, "feed_forward", plain)
        torch.manual_seed(0)
        model = Captioner(tiny_config, tokenizer).eval()
        loss = model(_images(), CAPTIONS)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.text_decoder.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and any("intermediate.dense" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def _packed_weights(model):
    from med_train.fast import ops

    return {name for name, p in model.named_parameters()
            if p in ops._PACKED and any(copy is not None for copy in ops._PACKED[p][1].values())}


def _packed_layouts(model, names):
    from med_train.fast import ops

    return {n: {layout for layout, copy in ops._PACKED[p][1].items() if copy is not None}
            for n, p in model.named_parameters() if n in names}


@pytest.mark.parametrize("bf16", [False, True])
def test_eval_mode_products_use_prepacked_weights_with_the_same_results(tokenizer, tiny_config, monkeypatch, bf16):
    """In eval mode on the CPU (no gradient; fp32, or bf16 autocast) every product of the ViT blocks and the
    decoder runs with its weight prepacked (ops.linear): through oneDNN, or in fp32 with a step's few rows through
    the few-row kernel where it is built: the same image tokens, logits and captions (greedy and beam) as
    F.linear's, to float rounding."""
    from med_train.fast import few_rows, ops

    if bf16 and not ops.ONEDNN_BF16:
        pytest.skip("this CPU has no oneDNN bf16 products (the fallback is tested below)")
    torch.manual_seed(0)
    model = Captioner(tiny_config, tokenizer).eval()
    images = _images()
    batch = encode_captions(tokenizer, CAPTIONS, tiny_config.prompt, 40)

    def outputs():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tokens = model.encode_images(images)
            logits = model.text_decoder(batch["input_ids"], batch["attention_mask"],
                                        encoder_hidden_states=tokens).logits
            return tokens, logits, [model.generate_ids(images, num_beams=b, max_length=12, min_length=6)
                                    for b in (1, 3)]

    packed = outputs()
    linears = {f"{name}.weight" for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and (name.startswith("text_decoder") or ".blocks." in name)}
    # the tied LM head's weight is the word embeddings' (named once by named_parameters)
    linears = {n.replace("cls.predictions.decoder", "bert.embeddings.word_embeddings") for n in linears}
    assert len(linears) > 20 and _packed_weights(model) == linears
    layouts = _packed_layouts(model, linears)
    if bf16 or not few_rows.available():
        assert set().union(*layouts.values()) == {torch.bfloat16 if bf16 else torch.float32}
    else:  # a decoding step's few rows go through the kernel (here the tiny ViT's tokens too)
        assert set().union(*layouts.values()) <= {torch.float32, ops.FEW_ROWS}
        assert all(ops.FEW_ROWS in layouts[n] for n in linears if n.startswith("text_decoder"))
    monkeypatch.setattr(ops, "_packed_dtype", lambda x, weight: None)
    plain = outputs()
    tolerance = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
    assert packed[1].dtype == plain[1].dtype
    torch.testing.assert_close(packed[0], plain[0], **tolerance)
    torch.testing.assert_close(packed[1], plain[1], **tolerance)
    for a, b in zip(packed[2], plain[2], strict=True):
        assert torch.equal(a, b)


def test_bf16_on_a_cpu_without_onednn_bf16_takes_f_linears_path(tokenizer, tiny_config, monkeypatch):
    """On CPUs without AVX512BW/VL/DQ or AVX_NE_CONVERT, oneDNN cannot reorder a weight to bf16 ("bf16 path needs
    the cpu support avx_ne_convert or avx512bw..."): captioning under bf16 autocast there packs nothing in bf16 and
    gives F.linear's captions."""
    from med_train.fast import ops

    real_reorder = torch.ops.mkldnn._reorder_linear_weight

    def reorder(weight, *args, **kwargs):  # what such a CPU does
        if weight.dtype == torch.bfloat16:
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or "
                               "avx512bw, avx512vl and avx512dq")
        return real_reorder(weight, *args, **kwargs)

    torch.manual_seed(0)
    model = Captioner(tiny_config, tokenizer).eval()

    def captions():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return [model.generate_ids(_images(), num_beams=b, max_length=12, min_length=6) for b in (1, 3)]

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", reorder)
    if ops.ONEDNN_BF16:  # this CPU has them: the packed path would reach the failing reorder
        with pytest.raises(RuntimeError, match="bf16 path needs"):
            captions(), captions()
        ops.release_packed(model)
    monkeypatch.setattr(ops, "ONEDNN_BF16", False)
    fallback = [captions() for _ in range(2)][-1]  # the second pass is where weights get packed
    assert not any(torch.bfloat16 in layouts for layouts in _packed_layouts(model, _packed_weights(model)).values())
    monkeypatch.setattr(ops, "_packed_dtype", lambda x, weight: None)
    for a, b in zip(fallback, captions(), strict=True):
        assert torch.equal(a, b)


def test_prepacked_weights_follow_weight_changes_and_go_in_training(tokenizer, tiny_config):
    """A weight changed in place (an optimizer step, a loaded checkpoint) is packed again, never used stale;
    training mode and gradients use F.linear, and `train()` frees the packed copies."""
    torch.manual_seed(0)
    model = Captioner(tiny_config, tokenizer).eval()
    images = _images()
    query = model.text_decoder.bert.encoder.layer[0].attention.self.query  # used at every decoding step
    with torch.no_grad():
        model.generate_ids(images, num_beams=1, max_length=12)
        assert "text_decoder.bert.encoder.layer.0.attention.self.query.weight" in _packed_weights(model)
        for p in model.text_decoder.parameters():
            p.mul_(1.5)  # in place, as AdamW does
        x = images.new_ones(2, query.in_features)
        expected = torch.nn.functional.linear(x, query.weight, query.bias)
        for _ in range(3):  # the first use after the change, then the weight packed again, then that copy
            torch.testing.assert_close(query(x), expected)
    assert "text_decoder.bert.encoder.layer.0.attention.self.query.weight" in _packed_weights(model)
    model.train()
    assert not _packed_weights(model)
    with torch.no_grad():
        model(images, CAPTIONS)  # training mode: plain products, nothing packed
    model.eval()
    model(images, CAPTIONS).backward()  # gradients: plain products
    assert not _packed_weights(model)


def test_checkpoints_do_not_report_the_tied_lm_head_as_removed(tokenizer, tiny_config, caplog):
    """accelerate notes every shared tensor it leaves out of a checkpoint; the tied LM head is expected and not
    reported at every save (med_train.train installs the filter), another shared tensor still is."""
    import logging

    from accelerate import PartialState
    from accelerate.utils.other import clean_state_dict_for_safetensors

    import med_train.train  # noqa: F401

    PartialState()  # accelerate's logging needs its state
    model = Captioner(tiny_config, tokenizer)
    with caplog.at_level(logging.WARNING):
        kept = clean_state_dict_for_safetensors(model.state_dict())
        assert "text_decoder.cls.predictions.decoder.weight" not in kept
        assert "Removed shared tensor" not in caplog.text
        shared = torch.zeros(3)
        clean_state_dict_for_safetensors({"a": shared, "b": shared})
    assert "Removed shared tensor {'b'}" in caplog.text
