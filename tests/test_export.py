"""`med convert blip` and `med export hf` through the real CLI, checked against transformers' BLIP."""

import torch
from conftest import tiny_model_config
from typer.testing import CliRunner

from med_train.cli import app
from med_train.model import Captioner

runner = CliRunner()


def _trained_tiny(tokenizer, cfg=None):
    """A tiny captioner fitted to four images so that its greedy captions differ by image."""
    torch.manual_seed(0)
    model = Captioner(cfg or tiny_model_config(), tokenizer)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    captions = ["a red circle", "a large blue square above the cat", "green triangle", "a dog on the sofa"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        model(images, captions).backward()
        optimizer.step()
    return model.eval(), images


def test_export_hf_gives_the_same_greedy_captions_in_transformers(tokenizer, tmp_path):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model, images = _trained_tiny(tokenizer)
    model.save_pretrained(tmp_path / "ours")
    result = runner.invoke(app, ["export", "hf", str(tmp_path / "ours"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    hf = BlipForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = BlipProcessor.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(hf.vision_model(images).last_hidden_state, model.encode_images(images),
                                   atol=1e-5, rtol=1e-4)
    prompt = processor.tokenizer([model.cfg.prompt] * 4, return_tensors="pt").input_ids
    theirs = hf.generate(pixel_values=images, input_ids=prompt, max_length=20, min_length=5, num_beams=1,
                         do_sample=False)
    ours = model.generate_ids(images, num_beams=1, max_length=20, min_length=5)
    assert theirs.tolist() == ours[:, : theirs.shape[1]].tolist()
    captions = model.generate(images, num_beams=1)
    assert len(set(captions)) > 1  # the comparison is not between four copies of one caption
    decoded = [processor.tokenizer.decode(row[4:], skip_special_tokens=True).strip() for row in theirs]
    assert decoded == captions


def test_export_refuses_a_vit_without_a_transformers_equivalent(tokenizer, tmp_path):
    cfg = tiny_model_config()
    cfg.vision.kwargs["reg_tokens"] = 2
    Captioner(cfg, tokenizer).save_pretrained(tmp_path / "reg")
    result = runner.invoke(app, ["export", "hf", str(tmp_path / "reg"), str(tmp_path / "hf")])
    assert result.exit_code == 1
    assert "not a plain ViT" in result.output


def test_convert_blip_checkpoint_through_the_cli(tokenizer, tmp_path):
    cfg = tiny_model_config()  # BLIP's head width is 64 everywhere; the converter relies on it
    cfg.vision.kwargs.update(embed_dim=128, num_heads=2)
    cfg.text.hidden_size, cfg.text.num_attention_heads = 64, 1
    model, images = _trained_tiny(tokenizer, cfg)
    state = dict(model.state_dict())
    state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"]
    torch.save({"model": state}, tmp_path / "model_base_caption.pth")
    tokenizer.save_pretrained(tmp_path / "tok")
    result = runner.invoke(app, ["convert", "blip", str(tmp_path / "model_base_caption.pth"), str(tmp_path / "out"),
                                 "--tokenizer", str(tmp_path / "tok")])
    assert result.exit_code == 0, result.output
    converted = Captioner.from_pretrained(tmp_path / "out").eval()
    assert converted.cfg.vision.image_size == 32
    assert converted.cfg.vision.kwargs["depth"] == 2 and converted.cfg.text.num_hidden_layers == 2
    assert converted.generate(images, num_beams=3) == model.generate(images, num_beams=3)

    result = runner.invoke(app, ["convert", "blip", str(tmp_path / "model_base_caption.pth"), str(tmp_path / "o2"),
                                 "--tokenizer", str(tmp_path / "tok"), "--image-size", "48"])
    assert result.exit_code == 0, result.output
    assert Captioner.from_pretrained(tmp_path / "o2").visual_encoder.pos_embed.shape == (1, 37, 128)


def test_convert_blip_missing_file_and_not_a_checkpoint(tmp_path):
    result = runner.invoke(app, ["convert", "blip", str(tmp_path / "nope.pth"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "no such file" in result.output
    torch.save({"weights": {"a": torch.zeros(1)}}, tmp_path / "other.pth")
    result = runner.invoke(app, ["convert", "blip", str(tmp_path / "other.pth"), str(tmp_path / "out")])
    assert result.exit_code == 1 and "not a BLIP caption checkpoint" in result.output
