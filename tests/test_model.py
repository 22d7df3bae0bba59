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
