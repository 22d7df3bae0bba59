"""`med convert hf` and `model.init` through the real CLI, checked against transformers' BLIP."""

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_e2e import TINY
from typer.testing import CliRunner

from med_train.cli import app
from med_train.model import Captioner

runner = CliRunner()
CAPTIONS = ["a red circle", "a large blue square above the cat", "green triangle", "a dog on the sofa"]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
WEIGHTS = "model.safetensors"


def _pixels(n=4, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_blip(tokenizer, tmp_path_factory):
    """A tiny transformers BLIP captioner with the sizes of the end-to-end TINY config (ViT LayerNorm eps 1e-5,
    as transformers' BLIP configs have), its processor (its own mean and std) and the tokenizer, fitted to four
    images without a prompt so that its greedy captions differ by image."""
    import transformers as tf

    torch.manual_seed(0)
    ids = dict(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
               sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id)
    config = tf.BlipConfig(
        text_config=tf.BlipTextConfig(vocab_size=len(tokenizer), hidden_size=32, encoder_hidden_size=48,
                                   intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=64, **ids),
        vision_config=tf.BlipVisionConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                                       num_attention_heads=3, image_size=32, patch_size=8, layer_norm_eps=1e-5))
    hf = tf.BlipForConditionalGeneration(config)
    batch = tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    batch["input_ids"][:, 0] = tokenizer.bos_token_id
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(hf.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        hf(pixel_values=_pixels(), input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
           labels=labels).loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("hf") / "blip"
    hf.save_pretrained(folder)
    processor = tf.BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD)
    tf.BlipProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return hf.eval(), folder


def _until(ids: torch.Tensor, sep: int) -> list[list[int]]:
    """Each row up to its first [SEP], included (what follows is padding, which transformers' beam search and
    ours fill differently)."""
    rows = ids.tolist()
    return [row[: row.index(sep) + 1] if sep in row else row for row in rows]


def test_convert_hf_gives_transformers_captions_token_for_token(hf_blip, tmp_path):
    hf, folder = hf_blip
    result = runner.invoke(app, ["convert", "hf", str(folder), str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    ours = Captioner.from_pretrained(tmp_path / "ours").eval()
    assert ours.cfg.prompt == "" and ours.prompt_length == 1
    assert ours.prompt_ids.tolist() == [ours.tokenizer.bos_token_id]  # [DEC] alone, as transformers starts
    assert ours.cfg.vision.mean == MEAN and ours.cfg.vision.std == STD
    assert ours.cfg.vision.kwargs["layer_norm_eps"] == 1e-5 and ours.visual_encoder.norm.eps == 1e-5
    pixels = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_images(pixels), hf.vision_model(pixels).last_hidden_state,
                                   atol=1e-5, rtol=1e-4)
    sep = ours.tokenizer.sep_token_id
    for beams in (1, 3):
        theirs = hf.generate(pixel_values=pixels, num_beams=beams, max_length=20, min_length=3, do_sample=False)
        mine = ours.generate_ids(pixels, num_beams=beams, max_length=20, min_length=3)
        assert _until(mine, sep) == _until(theirs, sep), beams
    captions = ours.generate(pixels, num_beams=1, max_length=20, min_length=3)
    assert len(set(captions)) > 1  # not four copies of one caption
    assert captions[0] == "a red circle"  # what the transformers model was fitted to say


def test_convert_hf_with_a_prompt_matches_transformers_given_the_prompt(hf_blip, tmp_path):
    hf, folder = hf_blip
    result = runner.invoke(app, ["convert", "hf", str(folder), str(tmp_path / "ours"), "--prompt", "a picture of "])
    assert result.exit_code == 0, result.output
    ours = Captioner.from_pretrained(tmp_path / "ours").eval()
    assert ours.prompt_length == 4
    pixels = _pixels()
    prompt = ours.tokenizer(["a picture of "] * 4, return_tensors="pt").input_ids  # generate drops its [SEP]
    theirs = hf.generate(pixel_values=pixels, input_ids=prompt, num_beams=1, max_length=12, min_length=5)
    mine = ours.generate_ids(pixels, num_beams=1, max_length=12, min_length=5)
    sep = ours.tokenizer.sep_token_id
    assert _until(mine, sep) == _until(theirs, sep)


def test_the_model_card_of_a_prompt_free_import_captions_as_med_caption(hf_blip, tmp_path):
    from PIL import Image
    from test_export import _snippet

    _, folder = hf_blip
    assert runner.invoke(app, ["convert", "hf", str(folder), str(tmp_path / "ours")]).exit_code == 0
    assert runner.invoke(app, ["export", "hf", str(tmp_path / "ours"), str(tmp_path / "hf")]).exit_code == 0
    snippet = _snippet((tmp_path / "hf" / "README.md").read_text())
    assert "text=" not in snippet  # no prompt: transformers starts from [DEC] alone
    path = tmp_path / "photo.png"
    pixels = torch.randint(0, 256, (40, 56, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    namespace: dict = {}
    exec(snippet.replace("photo.jpg", str(path)), namespace)
    result = runner.invoke(app, ["caption", str(path), "--model", str(tmp_path / "ours"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().split("\t")[1] == namespace["caption"].strip()


def test_export_then_convert_gives_back_every_tensor_and_caption(tokenizer, tmp_path):
    from test_export import _trained_tiny

    model, images = _trained_tiny(tokenizer)
    model.save_pretrained(tmp_path / "ours")
    assert runner.invoke(app, ["export", "hf", str(tmp_path / "ours"), str(tmp_path / "hf")]).exit_code == 0
    result = runner.invoke(app, ["convert", "hf", str(tmp_path / "hf"), str(tmp_path / "back"),
                                 "--prompt", model.cfg.prompt])
    assert result.exit_code == 0, result.output
    back = Captioner.from_pretrained(tmp_path / "back").eval()
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    assert back.image_mean_std() == model.image_mean_std()
    assert back.generate(images, num_beams=3) == model.generate(images, num_beams=3)


def test_convert_hf_refuses_other_models_and_missing_folders_in_one_line(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    for source, message in ((tmp_path / "bert", "not a transformers BLIP captioner"),
                            (tmp_path / "nowhere", "cannot read a transformers model config")):
        result = runner.invoke(app, ["convert", "hf", str(source), str(tmp_path / "out")])
        assert result.exit_code == 1, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


# ---- model.init through `med train` ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    result = runner.invoke(app, ["data", "shapes", str(root / "shapes"), "--train", "16", "--val", "0", "--test", "4"])
    assert result.exit_code == 0, result.output
    config = {**TINY, "data": {**TINY["data"], "source": str(root / "shapes")},
              "train": {**TINY["train"], "max_steps": 1, "eval_every": 0, "eval_images": 2, "save_every": 0,
                        "lr": 1e-12}}  # one step that cannot move the weights measurably
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return root


def _train(shapes_config, name, *sets):
    args = ["train", str(shapes_config / "tiny.yaml"), "--output-dir", str(shapes_config / name)]
    for s in sets:
        args += ["--set", s]
    return runner.invoke(app, args)


@pytest.mark.parametrize("source", ["converted", "transformers"])
def test_model_init_starts_training_from_the_given_weights_and_vocabulary(hf_blip, shapes_config, source, tmp_path):
    _, folder = hf_blip
    converted = tmp_path / "converted"
    assert runner.invoke(app, ["convert", "hf", str(folder), str(converted)]).exit_code == 0
    init = converted if source == "converted" else folder
    result = _train(shapes_config, f"runs-{source}", f"model.init={init}")  # TINY says tokenizer.name: train
    assert result.exit_code == 0, result.output
    run = Path(os.path.realpath(shapes_config / f"runs-{source}" / "latest"))
    want, got = load_file(str(converted / WEIGHTS)), load_file(str(run / WEIGHTS))
    assert want.keys() == got.keys()
    for key in want:  # step 0's weights are the init's (lr 1e-12: one step moves them by ~1e-12)
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
    run_model = Captioner.from_pretrained(run)
    assert run_model.tokenizer.get_vocab() == Captioner.from_pretrained(converted).tokenizer.get_vocab()
    assert run_model.cfg.vision.mean == MEAN  # the config named none: the init's normalisation
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["init"] == str(init)

    plain = _train(shapes_config, "runs-random")  # the same config without model.init: other weights
    assert plain.exit_code == 0, plain.output
    random_start = load_file(str(Path(os.path.realpath(shapes_config / "runs-random" / "latest")) / WEIGHTS))
    assert not torch.allclose(random_start["visual_encoder.cls_token"], want["visual_encoder.cls_token"])


def test_model_init_that_does_not_fit_the_config_names_the_key_and_shapes(hf_blip, shapes_config):
    _, folder = hf_blip
    result = _train(shapes_config, "runs-bad", f"model.init={folder}", "model.text.intermediate_size=128")
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "model.init" in message and "tiny.yaml" in message
    assert "intermediate.dense.weight (64, 32) vs (128, 32)" in message

    result = _train(shapes_config, "runs-bad", f"model.init={shapes_config / 'nothing-here'}")
    assert result.exit_code == 2 and "model.init" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_model_init_from_a_run_folder_takes_its_last_weights(tokenizer, tiny_config, tmp_path):
    torch.manual_seed(0)
    Captioner(tiny_config, tokenizer).save_pretrained(tmp_path / "run")  # the run's last weights
    torch.manual_seed(1)
    Captioner(tiny_config, tokenizer).save_pretrained(tmp_path / "run" / "best")
    for source in (tmp_path / "run", tmp_path / "run" / "best"):
        started = Captioner(replace(tiny_config, init=str(source)), tokenizer).state_dict()
        for key, value in load_file(str(source / WEIGHTS)).items():
            assert torch.equal(started[key], value), key
