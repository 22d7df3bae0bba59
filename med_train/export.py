"""Export to transformers: a folder that `BlipForConditionalGeneration` and `BlipProcessor` load, with the run's
decoding settings (`generation_config.json`) and a model card (`README.md`), optionally published on the hub.

    med export hf runs/x out/                          # export_run: the run's best model (else its last)
    med export hf runs/x out/ --push-to-hub me/name    # then push_to_hub

Following the card (the prompt as the processor's text, the generation config) gives `med caption`'s captions.
"""

from __future__ import annotations

import json
from pathlib import Path

from med_train.config import Config, GenerateConfig
from med_train.convert import hf_vision_key, quiet_progress
from med_train.model import Captioner


def export_hf(model: Captioner, out_dir: str | Path, generate: GenerateConfig | None = None) -> None:
    """Write a directory that `transformers.BlipForConditionalGeneration.from_pretrained` (and `BlipProcessor`)
    load, giving the same captions, with `generate` (default: our defaults) as its generation config. Only plain
    ViTs (class token, no register tokens, qkv bias, pre-LN, final norm, GELU MLP) have a transformers
    counterpart; anything else is refused with the reason."""
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    vit = model.visual_encoder
    if model.image_pos_embed is not None:
        raise ValueError("model.vision.decoder_pos_embed has no transformers BLIP equivalent: not a plain ViT")
    vision_state = vit.state_dict()
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias"}
    extra = [k for k in vision_state if k not in expected and not k.startswith("blocks.")]
    block_keys = {k.split(".", 2)[2] for k in vision_state if k.startswith("blocks.")}
    plain_block = {f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                   for p in ("weight", "bias")}
    if extra or block_keys != plain_block or getattr(vit, "num_reg_tokens", 0) or not getattr(vit, "has_class_token",
                                                                                                True):
        raise ValueError(f"model.vision.name {model.cfg.vision.name!r}: not a plain ViT, no transformers BLIP "
                         f"equivalent (extra keys: {extra[:5]}, block keys: {sorted(block_keys ^ plain_block)[:5]})")
    t, tok = model.cfg.text, model.tokenizer
    patch = vit.patch_embed.patch_size[0]
    config = BlipConfig(
        text_config=BlipTextConfig(
            vocab_size=len(tok), hidden_size=t.hidden_size, encoder_hidden_size=vit.num_features,
            intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads, max_position_embeddings=t.max_position_embeddings,
            layer_norm_eps=t.layer_norm_eps, hidden_dropout_prob=t.hidden_dropout_prob,
            attention_probs_dropout_prob=t.attention_probs_dropout_prob, label_smoothing=t.label_smoothing,
            bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id,
            eos_token_id=tok.sep_token_id),
        vision_config=BlipVisionConfig(
            hidden_size=vit.num_features, intermediate_size=vit.blocks[0].mlp.fc1.out_features,
            num_hidden_layers=len(vit.blocks), num_attention_heads=vit.blocks[0].attn.num_heads,
            image_size=model.cfg.vision.image_size, patch_size=patch, layer_norm_eps=vit.norm.eps,
            hidden_act="gelu"),
    )
    hf = BlipForConditionalGeneration(config).eval()
    state = {hf_vision_key(k): v for k, v in vision_state.items()}
    for key, value in model.text_decoder.state_dict().items():
        state[f"text_decoder.{key}"] = value
    state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(("vision_model.", "text_decoder."))]
    if missing or unexpected:
        raise ValueError(f"export to transformers failed: missing {missing[:10]}, unexpected {unexpected[:10]}")
    hf.generation_config = generation_config(model, generate or GenerateConfig())
    out = Path(out_dir)
    with quiet_progress():
        hf.save_pretrained(out)
    mean, std = model.image_mean_std()
    size = model.cfg.vision.image_size
    image_processor = BlipImageProcessor(size={"height": size, "width": size}, image_mean=list(mean),
                                         image_std=list(std), resample=3)  # bicubic, as our eval transform
    BlipProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)


def generation_config(model: Captioner, gen: GenerateConfig):
    """Our decoding settings as a transformers `GenerationConfig`. Lengths count the prompt in both."""
    from transformers import GenerationConfig

    tok = model.tokenizer
    settings = dict(max_length=gen.max_length, min_length=gen.min_length, repetition_penalty=gen.repetition_penalty,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    if gen.do_sample:
        settings.update(do_sample=True, num_beams=1, top_p=gen.top_p, top_k=gen.top_k, temperature=gen.temperature)
    else:
        settings.update(do_sample=False, num_beams=gen.num_beams)
        if gen.num_beams > 1:  # transformers warns about a length penalty that greedy decoding ignores
            settings["length_penalty"] = gen.length_penalty
    return GenerationConfig(**settings)


def export_run(path: str | Path, out_dir: str | Path, model_id: str | None = None) -> None:
    """`med export hf`: a run folder (its best model when it has one, else its last: what `med caption` uses) or a
    model directory -> a transformers folder with the run's generation settings and a model card. `model_id`:
    what the card's snippet loads (default: `out_dir`)."""
    from med_train.evaluate import load_run

    path = Path(path)
    model, cfg = load_run(path)
    export_hf(model, out_dir, cfg.generate)
    card = model_card(model, cfg, path, model_id or str(out_dir))
    (Path(out_dir) / "README.md").write_text(card, encoding="utf-8")


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create the hub model repository (if new) and upload `folder` to it; the token comes from the environment
    (HF_TOKEN) or `hf auth login`. Returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                               commit_message="Upload a med_train BLIP captioner")
    return str(getattr(commit, "commit_url", commit))


# ---- the model card ---------------------------------------------------------------------------------------------

def model_card(model: Captioner, cfg: Config, path: Path, model_id: str) -> str:
    """README.md for the hub: front matter, where the weights started, the data, key settings, scores, usage."""
    is_run = (path / "config.yaml").is_file()
    m, t, g = model.cfg, cfg.train, cfg.generate
    vit = model.visual_encoder
    lines = ["---", "library_name: transformers", "pipeline_tag: image-to-text", "tags:", "- image-captioning",
             "- blip", "- med_train", "---", "", f"# {path.resolve().name}", "",
             f"A BLIP-style image captioner (a {len(vit.blocks)}-block ViT of width {vit.num_features} and a "
             f"{m.text.num_hidden_layers}-layer MED decoder) trained with med_train and exported to transformers' "
             f"`BlipForConditionalGeneration`.", "", "## Starting weights", ""]
    vision = (f"timm `{m.vision.name}`, " + (f"weights file `{m.vision.weights}`" if m.vision.weights
                                             else "timm's pretrained weights" if m.vision.pretrained else "random"))
    lines += [f"- all weights (`model.init`): `{m.init}`" if m.init else "- all weights (`model.init`): none",
              f"- text decoder (`model.text.init`): `{m.text.init}`", f"- vision encoder: {vision}"]
    if m.init:
        lines.append("- (with `model.init`, the other two are not read)")
    lines += ["", "## Data", ""]
    lines += ([f"- source: `{cfg.data.source}` (format {cfg.data.format}), trained on split "
               f"`{cfg.data.train_split}`, evaluated on `{cfg.data.eval_split}`"] if is_run
              else ["- not recorded (exported from a model directory, not a run folder)"])
    settings = [("model.vision.image_size", m.vision.image_size), ("model.prompt", repr(m.prompt)),
                ("tokenizer (vocabulary size)", len(model.tokenizer)), ("model.text.hidden_size", m.text.hidden_size)]
    if is_run:
        settings += [("train.max_steps", t.max_steps), ("train.batch_size", t.batch_size), ("train.lr", t.lr),
                     ("train.weight_decay", t.weight_decay), ("train.warmup_steps", t.warmup_steps),
                     ("train.mixed_precision", t.mixed_precision),
                     ("model.text.label_smoothing", m.text.label_smoothing)]
    settings += [("generate.num_beams", g.num_beams), ("generate.max_length", g.max_length),
                 ("generate.min_length", g.min_length), ("generate.repetition_penalty", g.repetition_penalty)]
    lines += ["", "## Settings", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in settings]
    lines += ["", "## Evaluation", ""] + _scores_table(path)
    lines += ["", "## Usage", "", "```python", usage_snippet(model_id, m.prompt), "```", "",
              "The prompt is given as text (every caption starts with it) and the generation config holds the "
              "run's decoding settings; together they give the captions of `med caption`.", ""]
    return "\n".join(lines)


def usage_snippet(model_id: str, prompt: str) -> str:
    """Python that captions `photo.jpg` with transformers as `med caption` does."""
    text = f", text={prompt!r}" if prompt else ""
    cut = 'inputs["input_ids"].shape[1] - 1' if prompt else "1"  # the prompt's tokens, [SEP] dropped by generate
    return "\n".join([
        "from PIL import Image",
        "from transformers import BlipForConditionalGeneration, BlipProcessor",
        "",
        f"model = BlipForConditionalGeneration.from_pretrained({model_id!r})",
        f"processor = BlipProcessor.from_pretrained({model_id!r})",
        'image = Image.open("photo.jpg").convert("RGB")',
        f'inputs = processor(images=image{text}, return_tensors="pt")',
        "ids = model.generate(**inputs, generation_config=model.generation_config)",
        f"caption = processor.decode(ids[0, {cut}:], skip_special_tokens=True)  # without the prompt",
        "print(caption)",
    ])


def _scores_table(path: Path) -> list[str]:
    """`med eval`'s results (eval-*/metrics.json), else the validation during training that chose the exported
    weights (metrics.jsonl: the best CIDEr when best/ exists, else the last)."""
    rows: list[tuple[str, dict]] = []
    for file in sorted(path.glob("eval-*/metrics.json")):
        rows.append((f"`med eval`, split {file.parent.name.removeprefix('eval-')}", json.loads(file.read_text())))
    log = path / "metrics.jsonl"
    if not rows and log.is_file():
        evals = [r for r in map(json.loads, log.read_text().splitlines()) if "eval" in r]
        if evals:
            best = (path / "best").is_dir() and any("CIDEr" in r["eval"] for r in evals)
            chosen = max(evals, key=lambda r: r["eval"].get("CIDEr", float("-inf"))) if best else evals[-1]
            rows.append((f"validation at step {chosen['step']}", chosen["eval"]))
    if not rows:
        return ["No scores recorded."]
    names = [k for k in rows[0][1] if isinstance(rows[0][1][k], int | float)]
    table = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, scores in rows:
        table.append(f"| {label} | " + " | ".join(_number(scores.get(k)) for k in names) + " |")
    return table


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
