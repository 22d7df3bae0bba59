"""int8 captioning (`--precision int8`): the Linear layers really int8, captions and logits close to fp32's, the
model running its modules (never the fast paths that read float weights), CUDA refused in one line, and `med caption`
/ `med eval` end to end through the CLI."""

import copy
import json

import pytest
import torch
from conftest import tiny_model_config
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
from typer.testing import CliRunner

from med_train import cli
from med_train.cli import app
from med_train.int8 import CPU_ONLY, int8_problem, is_quantized, quantize
from med_train.model import Captioner

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tokenizer):
    """(fp32, int8) of one random tiny captioner."""
    torch.manual_seed(0)
    fp32 = Captioner(tiny_model_config(), tokenizer, load_weights=False).eval()
    return fp32, quantize(copy.deepcopy(fp32))


def _images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_every_linear_holds_int8_weights(models):
    fp32, int8 = models
    linears = [name for name, m in fp32.named_modules() if isinstance(m, nn.Linear)]
    quantized = {name: m for name, m in int8.named_modules() if isinstance(m, Int8Linear)}
    assert sorted(quantized) == sorted(linears)  # the ViT's, the decoder's and the LM head, by the same names
    assert "text_decoder.cls.predictions.decoder" in quantized and "visual_encoder.blocks.0.mlp.fc2" in quantized
    assert not any(isinstance(m, nn.Linear) for m in int8.modules())
    for name, module in quantized.items():
        weight = module.weight()
        assert weight.dtype == torch.qint8 and weight.is_quantized, name
        # the int8 weight is the float one to within a quantisation step
        float_weight = fp32.get_submodule(name).weight
        scales = weight.q_per_channel_scales().float()[:, None]  # one per output channel
        assert ((weight.dequantize() - float_weight).abs() <= scales / 2 + 1e-6).all(), name
    assert is_quantized(int8) and not is_quantized(fp32)
    # the quantised copy is apart from the float model, whose LM head stays tied to the word embeddings
    decoder = fp32.text_decoder
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
    assert torch.equal(int8.text_decoder.bert.embeddings.word_embeddings.weight,
                       decoder.bert.embeddings.word_embeddings.weight)


def test_int8_logits_and_captions_stay_close_to_fp32(models):
    fp32, int8 = models
    images = _images(8)
    with torch.no_grad():
        ids = fp32.generate_ids(images, num_beams=1, max_length=12, min_length=12)
        logits = [m.text_decoder(ids, encoder_hidden_states=m.encode_images(images)).logits for m in models]
        # measured over six random tiny models: the largest difference 0.009 to 0.012, against logits of std 0.11 to
        # 0.12; each position's likeliest next token the same at 93% to 100% of the positions
        assert (logits[0] - logits[1]).abs().max() < 0.02
        assert (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean() >= 0.9
        # a random model's logits are near ties, and a caption that takes another token goes on differently:
        # measured, 60% to 100% of the generated positions the same, greedy and beam 3 alike
        for beams in (1, 3):
            same = fp32.generate_ids(images, num_beams=beams) == int8.generate_ids(images, num_beams=beams)
            assert same.float().mean() >= 0.5, beams


def test_int8_runs_the_modules_not_the_float_weight_paths(models, monkeypatch):
    """`fast.prepare` leaves a quantised model as it is (its decoding plain), and refuses to be quantised after."""
    from med_train import fast
    from med_train.fast import attention, decoder

    def refuse(*args, **kwargs):
        raise AssertionError("a fast path that reads float weights")

    monkeypatch.setattr(decoder, "add_norm", refuse)
    monkeypatch.setattr(attention, "folded_cross_attention", refuse)
    assert fast.prepare(models[1], "cpu", "decode", enabled_here=True).describe() == "fast paths: off"
    assert not hasattr(models[1].text_decoder, "decoding")
    with torch.no_grad():
        for beams in (1, 3):
            assert models[1].generate_ids(_images(2), num_beams=beams).shape[0] == 2


def test_int8_on_a_gpu_is_refused_in_one_line(monkeypatch, tmp_path):
    assert int8_problem(torch.device("cpu")) is None
    assert int8_problem(torch.device("cuda:0")) == CPU_ONLY and "bf16 or fp16" in CPU_ONLY
    monkeypatch.setattr(cli, "_device", lambda device: torch.device("cuda"))
    for command in (["caption", "x.png"], ["eval"]):
        result = runner.invoke(app, [*command, "--model", str(tmp_path), "--precision", "int8"])
        assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
            f"error: --precision int8: {CPU_ONLY}"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A saved tiny model and a shapes test split to caption and score."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    Captioner(tiny_model_config(), tokenizer).save_pretrained(out)
    result = runner.invoke(app, ["data", "shapes", str(out / "shapes"), "--train", "1", "--val", "0", "--test", "4",
                                 "--seed", "1", "--image-size", "32"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def generated_by(monkeypatch):
    """For each Captioner.generate call: whether the model was int8 and autocast on."""
    calls, real_generate = [], Captioner.generate

    def generate(self, images, **kwargs):
        calls.append((is_quantized(self), torch.is_autocast_enabled(images.device.type)))
        return real_generate(self, images, **kwargs)

    monkeypatch.setattr(Captioner, "generate", generate)
    return calls


def test_caption_with_int8_through_the_cli(model_dir, generated_by):
    images = sorted(str(p) for p in (model_dir / "shapes" / "test").glob("*.png"))
    args = ["caption", *images, "--model", str(model_dir), "--device", "cpu", "--json", "--beams", "3"]
    result = runner.invoke(app, [*args, "--precision", "int8"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["image"] for r in rows] == images and all(r["caption"] and r["error"] is None for r in rows)
    assert generated_by == [(True, False)]
    generated_by.clear()
    assert runner.invoke(app, args).exit_code == 0 and generated_by == [(False, False)]  # fp32 by default


def test_eval_with_int8_through_the_cli(model_dir, generated_by, tmp_path):
    result = runner.invoke(app, ["eval", "--model", str(model_dir), "--device", "cpu", "--precision", "int8",
                                 "--set", f"data.source={model_dir / 'shapes'}", "--set", "data.format=imagefolder",
                                 "--set", "data.num_workers=0", "--split", "test", "--beams", "1",
                                 "--output-dir", str(tmp_path / "ev"), "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["images"] == 4 and isinstance(scores["CIDEr"], float)
    assert generated_by and all(call == (True, False) for call in generated_by)
    assert len(json.loads((tmp_path / "ev" / "predictions.json").read_text())) == 4


def test_quantize_refuses_a_model_off_the_cpu(models, monkeypatch):
    from med_train import int8

    monkeypatch.setattr(int8, "int8_problem", lambda device: CPU_ONLY)
    with pytest.raises(ValueError, match="on the CPU"):
        quantize(copy.deepcopy(models[0]))
