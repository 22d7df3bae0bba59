"""`med convert blip` and `med export hf` (generation config, model card, hub) through the real CLI, checked
against transformers' BLIP."""

import json
from pathlib import Path

import torch
import yaml
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


# ---- generation config, model card, hub ------------------------------------------------------------------------

def _run_folder(tokenizer, tmp_path):
    """A run folder as `med train` leaves it: the model, its resolved config, a `med eval` result."""
    from med_train.config import load_config, save_config

    model, _ = _trained_tiny(tokenizer)
    run = tmp_path / "run"
    model.save_pretrained(run)
    cfg = load_config(None, ["generate.num_beams=2", "generate.max_length=14", "generate.min_length=4",
                             "data.source=data/shapes-demo", "train.max_steps=60"])
    cfg.model = model.cfg
    save_config(cfg, run / "config.yaml")
    (run / "eval-test").mkdir()
    (run / "eval-test" / "metrics.json").write_text(json.dumps({"Bleu_4": 0.25, "CIDEr": 1.5, "images": 6}))
    return model, run


def _snippet(card: str) -> str:
    return card.split("```python\n", 1)[1].split("```", 1)[0]


def test_following_the_model_card_gives_med_captions_captions(tokenizer, tmp_path):
    from PIL import Image

    from med_train.data import build_transform

    model, run = _run_folder(tokenizer, tmp_path)
    result = runner.invoke(app, ["export", "hf", str(run), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("num_beams", "max_length", "min_length", "bos_token_id", "eos_token_id",
                                       "pad_token_id")} == {
        "num_beams": 2, "max_length": 14, "min_length": 4, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id}
    card = (tmp_path / "hf" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "image-to-text"
    assert "data/shapes-demo" in card and "| `med eval`, split test | 0.2500 | 1.5000 | 6 |" in card
    assert "`model.text.init`): `random`" in card and "text='a picture of '" in card

    pixels = torch.randint(0, 256, (3, 40, 56, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    transform = build_transform(train=False, image_size=32)
    for i, array in enumerate(pixels.numpy()):
        path = tmp_path / f"photo{i}.png"
        Image.fromarray(array).save(path)
        namespace: dict = {}
        exec(_snippet(card).replace("photo.jpg", str(path)), namespace)  # the card's recipe, as written
        ours = model.generate_ids(transform(Image.open(path).convert("RGB"))[None], num_beams=2, max_length=14,
                                  min_length=4)
        sep = tokenizer.sep_token_id
        theirs = namespace["ids"][0].tolist()
        mine = ours[0].tolist()
        assert mine[: mine.index(sep) + 1] == theirs[: theirs.index(sep) + 1]  # token for token
        result = runner.invoke(app, ["caption", str(path), "--model", str(run), "--device", "cpu"])
        assert result.exit_code == 0, result.output
        assert result.stdout.strip().split("\t")[1] == namespace["caption"].strip()


def test_push_to_hub_creates_the_repository_and_uploads_the_export(tokenizer, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()))
        calls["card"] = (Path(folder_path) / "README.md").read_text()
        return "https://huggingface.co/me/tiny/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model, _ = _trained_tiny(tokenizer)
    model.save_pretrained(tmp_path / "ours")
    result = runner.invoke(app, ["export", "hf", str(tmp_path / "ours"), str(tmp_path / "hf"),
                                 "--push-to-hub", "me/tiny", "--private"])
    assert result.exit_code == 0, result.output
    assert calls["create"] == ("me/tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["upload"][0] == "me/tiny"
    assert {"README.md", "config.json", "generation_config.json", "model.safetensors", "processor_config.json",
            "tokenizer.json"} <= set(calls["upload"][1])
    assert "from_pretrained('me/tiny')" in calls["card"]  # the snippet loads what was pushed
    assert "not recorded" in calls["card"]  # a model directory: no data or training settings to report
    assert "pushed to https://huggingface.co/me/tiny/commit/abc" in result.stdout

    def refuse(self, repo_id, **kwargs):
        raise OSError("401 Client Error: Unauthorized\nInvalid token")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    result = runner.invoke(app, ["export", "hf", str(tmp_path / "ours"), str(tmp_path / "hf2"),
                                 "--push-to-hub", "me/tiny"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: --push-to-hub me/tiny: 401 Client Error: Unauthorized Invalid token"


def test_the_card_reports_the_validation_that_chose_the_exported_weights(tmp_path):
    from med_train.export import _scores_table

    records = [{"step": 1, "loss": 3.0}, {"step": 3, "eval": {"CIDEr": 0.9, "images": 6}},
               {"step": 6, "eval": {"CIDEr": 0.7, "images": 6}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _scores_table(tmp_path)[-1] == "| validation at step 6 | 0.7000 | 6 |"  # no best/: the last weights
    (tmp_path / "best").mkdir()
    assert _scores_table(tmp_path)[-1] == "| validation at step 3 | 0.9000 | 6 |"  # best/: the best CIDEr
