"""The captioner: a timm ViT + the MED decoder + a WordPiece tokenizer + a prompt.

    model = Captioner(ModelConfig(), tokenizer)
    loss = model(images, ["a dog on a sofa", ...])        # next-token loss on the captions (prompt masked out)
    captions = model.generate(images, num_beams=3)        # list[str], prompt removed
    model.save_pretrained("runs/x/final");  Captioner.from_pretrained("runs/x/final")

State-dict names are BLIP's (`visual_encoder.*` in timm's names, `text_decoder.bert.*`, `text_decoder.cls.*`),
so a released BLIP caption checkpoint loads directly. Importing other formats, `model.init` and the export to
transformers live in `convert.py` and `export.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from med_train import decode
from med_train.config import ModelConfig, TextConfig, VisionConfig
from med_train.med import BertLMHeadModel, med_config
from med_train.run_folder import (
    BadFileError,
    atomic_path,
    atomic_write,
    first_line,
    read_json,
    save_tokenizer,
)
from med_train.tokenizer import encode_captions, load_tokenizer, prompt_length

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "med_config.json"
FORMAT = "med_train/captioner"


def create_vision_encoder(cfg: VisionConfig, load_weights: bool = True) -> nn.Module:
    """A timm ViT without a classifier head; `forward_features` gives (B, 1+N, D) tokens after the final norm."""
    import timm

    kwargs = dict(num_classes=0, img_size=cfg.image_size, drop_path_rate=cfg.drop_path_rate, **cfg.kwargs)
    if "layer_norm_eps" in kwargs:  # timm takes a norm layer, not an epsilon (transformers' BLIP ViTs use 1e-5)
        from functools import partial

        from timm.layers import LayerNorm

        kwargs["norm_layer"] = partial(LayerNorm, eps=kwargs.pop("layer_norm_eps"))
    pretrained = load_weights and (cfg.pretrained or cfg.weights is not None)
    if load_weights and cfg.weights is not None:  # a local file, no hub
        kwargs["pretrained_cfg_overlay"] = dict(file=cfg.weights)
    model = timm.create_model(cfg.name, pretrained=pretrained, **kwargs)
    if not hasattr(model, "forward_features") or not hasattr(model, "num_features"):
        raise ValueError(f"model.vision.name: {cfg.name!r} is not a timm model with forward_features")
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.stem == "conv":
        _use_conv_stem(model)
    if cfg.pos_embed_init == "sincos" and not pretrained:
        _init_sincos_pos_embed(model)
    return model


def _use_conv_stem(vit: nn.Module) -> None:
    """Replace the patch projection (a p x p stride-p convolution) by log2(p) stride-2 3x3 convolutions with GELU
    between them, widening to the embedding width: the same token grid, better local features from scratch."""
    proj = vit.patch_embed.proj
    patch = proj.stride[0]
    steps = patch.bit_length() - 1
    if patch != 2**steps or steps < 1:
        raise ValueError(f"model.vision.stem 'conv' needs a power-of-2 patch size, got {patch}")
    width = proj.out_channels
    channels = [proj.in_channels] + [max(16, width // 2 ** (steps - i)) for i in range(1, steps)] + [width]
    layers: list[nn.Module] = []
    for i in range(steps):
        layers.append(nn.Conv2d(channels[i], channels[i + 1], kernel_size=3, stride=2, padding=1))
        if i < steps - 1:
            layers.append(nn.GELU())
    vit.patch_embed.proj = nn.Sequential(*layers)


def _init_sincos_pos_embed(vit: nn.Module) -> None:
    _fill_sincos(vit.pos_embed, vit)


def _fill_sincos(param: torch.Tensor, vit: nn.Module) -> None:
    """MAE's 2-D sine-cosine table for the patch positions (the class token's row stays zero). param (1, 1+N, D)"""
    from timm.layers import build_sincos2d_pos_embed

    table = build_sincos2d_pos_embed(list(vit.patch_embed.grid_size), param.shape[-1])  # (H*W, D)
    prefix = param.shape[1] - table.shape[0]
    with torch.no_grad():
        param[:, :prefix] = 0
        param[0, prefix:] = table


def text_config_from_bert(cfg: TextConfig, bert_config) -> TextConfig:
    """The decoder's sizes are those of the BERT checkpoint it starts from."""
    return TextConfig(**{**asdict(cfg), **{k: getattr(bert_config, k) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
        "layer_norm_eps")}})


def normalize_images(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) pixels -> (pixels / 255 - mean) / std in float32, on the images' device; float images
    are taken as normalised already and returned as they are. The data pipeline hands over uint8 (a quarter of the
    bytes to copy to the GPU, and no float work in the loader workers), so this runs on the accelerator."""
    if images.dtype != torch.uint8:
        return images
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device)[:, None, None]
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device)[:, None, None]
    return images.float().div_(255).sub_(mean).div_(std)


class Captioner(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer, load_weights: bool = True, max_caption_tokens: int = 40):
        """`load_weights=False` builds the architecture only (the weights come from a checkpoint next).
        `max_caption_tokens` truncates captions given as text to `forward` (prompt included)."""
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_caption_tokens = max_caption_tokens
        init = None
        if load_weights and cfg.init:  # every weight comes from there: the others' sources are not read
            from med_train.convert import read_init

            init = read_init(cfg.init)
            cfg.vision.mean, cfg.vision.std = cfg.vision.mean or init.mean, cfg.vision.std or init.std
            load_weights = False
        from_blip = cfg.text.init.startswith("blip:")  # the ViT's weights come from the BLIP checkpoint too
        self.visual_encoder = create_vision_encoder(cfg.vision, load_weights and not from_blip)
        bert_state = None
        if load_weights and cfg.text.init != "random" and not from_blip:
            bert_state, bert_config = _load_bert(cfg.text.init)
            cfg.text = text_config_from_bert(cfg.text, bert_config)
        t = cfg.text
        self.text_decoder = BertLMHeadModel(med_config(
            vocab_size=len(tokenizer), hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
            max_position_embeddings=t.max_position_embeddings, hidden_dropout_prob=t.hidden_dropout_prob,
            attention_probs_dropout_prob=t.attention_probs_dropout_prob, layer_norm_eps=t.layer_norm_eps,
            encoder_width=self.visual_encoder.num_features, pad_token_id=tokenizer.pad_token_id,
        ), label_smoothing=t.label_smoothing)
        self.text_decoder.set_gradient_checkpointing(t.grad_checkpointing)
        if bert_state is not None:
            load_bert_into_decoder(self.text_decoder, bert_state)
        if load_weights and from_blip:
            from med_train.convert import load_blip_checkpoint

            load_blip_checkpoint(self, cfg.text.init.removeprefix("blip:"))

        self.image_pos_embed = None
        if cfg.vision.decoder_pos_embed:
            self.image_pos_embed = nn.Parameter(torch.zeros_like(self.visual_encoder.pos_embed))
            _fill_sincos(self.image_pos_embed, self.visual_encoder)
        mean, std = self.image_mean_std()  # uint8 images are normalised on the model's device (normalize_images)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.prompt_length = prompt_length(tokenizer, cfg.prompt)
        prompt_ids = torch.tensor(tokenizer(cfg.prompt)["input_ids"][:-1])  # drop [SEP]: the caption follows
        prompt_ids[0] = tokenizer.bos_token_id
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        if init is not None:
            from med_train.convert import load_init

            load_init(self, init, cfg.init)

    @property
    def device(self) -> torch.device:
        return self.prompt_ids.device

    def image_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The normalisation the vision weights expect: the config's, else timm's data config for the model."""
        from timm.data import resolve_model_data_config

        data_cfg = resolve_model_data_config(self.visual_encoder)
        mean = tuple(self.cfg.vision.mean) if self.cfg.vision.mean else tuple(data_cfg["mean"])
        std = tuple(self.cfg.vision.std) if self.cfg.vision.std else tuple(data_cfg["std"])
        return mean, std

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, D) image tokens of uint8 images as the data pipeline delivers them (normalised here, on the
        model's device) or of float images already normalised (`normalize_images`)."""
        images = normalize_images(images, self.pixel_mean, self.pixel_std)
        image_embeds = self.visual_encoder.forward_features(images)  # (B, 1+N, D)
        if self.image_pos_embed is not None:
            image_embeds = image_embeds + self.image_pos_embed
        return image_embeds

    def tokenize(self, captions: list[str]) -> dict:
        enc = encode_captions(self.tokenizer, captions, self.cfg.prompt, self.max_caption_tokens)
        return {k: v.to(self.device) for k, v in enc.items()}

    def forward(self, images, captions: list[str] | None = None, *, input_ids=None, attention_mask=None,
                labels=None, reduction: str = "mean"):
        """The captioning loss. Give raw `captions`, or `input_ids`/`attention_mask`/`labels` from the collate."""
        if captions is not None:
            batch = self.tokenize(captions)
            input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        image_embeds = self.encode_images(images)
        out = self.text_decoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                labels=labels, reduction=reduction, output_logits=False)
        return out.loss

    @torch.no_grad()
    def generate_ids(self, images, *, num_beams: int = 3, max_length: int = 20, min_length: int = 5,
                     **kwargs) -> torch.Tensor:
        if max_length <= self.prompt_length:
            raise ValueError(f"max_length {max_length} leaves no room after the {self.prompt_length}-token prompt")
        image_embeds = self.encode_images(images)
        return decode.generate(self.text_decoder, image_embeds, self.prompt_ids, num_beams=num_beams,
                               max_length=max_length, min_length=min_length,
                               eos_token_id=self.tokenizer.sep_token_id, pad_token_id=self.tokenizer.pad_token_id,
                               **kwargs)

    def generate(self, images, **kwargs) -> list[str]:
        """Captions for a batch of images (prompt removed). Keyword arguments: see `decode.generate`."""
        ids = self.generate_ids(images, **kwargs)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip()
                for row in ids[:, self.prompt_length:].tolist()]

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def save_pretrained(self, out_dir: str | Path, weights: bool = True) -> None:
        """`model.safetensors` + `med_config.json` + tokenizer files: everything `from_pretrained` needs. Each file
        is replaced whole, so a run killed mid-save keeps loadable files. `weights=False`: the config and tokenizer
        only (a training checkpoint, whose weights accelerate writes)."""
        from safetensors.torch import save_model

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "model": asdict(self.cfg), "max_caption_tokens": self.max_caption_tokens}
        atomic_write(out / CONFIG_NAME, json.dumps(meta, indent=2))
        save_tokenizer(self.tokenizer, out)
        if weights:
            with atomic_path(out / WEIGHTS_NAME) as tmp:
                save_model(self, str(tmp))  # handles the tied embedding/output weights

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, map_location: str = "cpu") -> Captioner:
        """The model a folder holds; a `BadFileError` (one line naming the file) for a file that cannot be used."""
        from safetensors.torch import load_model

        model_dir = Path(model_dir)
        cfg, max_caption_tokens = read_model_config(model_dir)
        model = cls(cfg, read_tokenizer(model_dir), load_weights=False, max_caption_tokens=max_caption_tokens)
        weights = model_dir / WEIGHTS_NAME
        check_weights(model, weights)
        try:
            load_model(model, str(weights), strict=True, device=map_location)
        except SafetensorError as err:
            raise BadFileError(weights, f"unreadable ({first_line(err)})") from None
        return model


def read_model_config(model_dir: Path) -> tuple[ModelConfig, int]:
    """(the model config, max_caption_tokens) of a model directory's med_config.json."""
    from med_train.config import config_from_dict

    meta_path = Path(model_dir) / CONFIG_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {CONFIG_NAME}; not a med_train model directory")
    meta = read_json(meta_path, "a med_train model config")
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise BadFileError(meta_path, "not a med_train model config (no 'model' section)")
    cfg = config_from_dict({"model": meta["model"]}, source=str(meta_path)).model
    return cfg, meta.get("max_caption_tokens", 40)


def read_tokenizer(model_dir: Path):
    """A model directory's tokenizer; a `BadFileError` naming the first tokenizer file that is not valid JSON."""
    try:
        return load_tokenizer(str(model_dir))
    except Exception as err:  # noqa: BLE001 - transformers and tokenizers raise many kinds for a damaged file
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(model_dir) / name).is_file():
                read_json(Path(model_dir) / name, "a tokenizer file")  # raises for the damaged one
        raise BadFileError(model_dir, f"cannot load its tokenizer ({first_line(err)})") from None


def read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a `BadFileError` for a file that is not one (a pickle, cut short)."""
    from safetensors.torch import load_file

    if not Path(weights).is_file():
        raise BadFileError(weights, "no such weights file")
    try:
        return load_file(str(weights))
    except SafetensorError as err:
        raise BadFileError(weights, f"not a whole safetensors file ({first_line(err)})") from None


def key_list(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def check_weights(model: nn.Module, weights: Path) -> None:
    """A weights file that cannot be read, or does not fit the model, is a one-line `BadFileError` naming the first
    keys with their shapes (never a partial load)."""
    from safetensors import safe_open

    if not weights.is_file():
        raise BadFileError(weights, "no such weights file")
    own = model.state_dict()
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as err:
        raise BadFileError(weights, f"not a whole safetensors file ({first_line(err)})") from None
    mismatched = [f"{k} {stored[k]} vs {tuple(own[k].shape)}" for k in own if k in stored
                  and stored[k] != tuple(own[k].shape)]
    # the tied output weight is stored once, under either name
    missing = [k for k in own if k not in stored and k != "text_decoder.cls.predictions.decoder.weight"]
    unexpected = [k for k in stored if k not in own]
    problems = [f"{name}: {key_list(keys)}" for name, keys in (
        ("shape mismatches (stored vs configured)", mismatched), ("missing", missing), ("unexpected", unexpected))
        if keys]
    if problems:
        raise BadFileError(weights, f"does not match its config ({weights.parent / CONFIG_NAME}); "
                                    + "; ".join(problems))


# ---- initialisation from other checkpoints ---------------------------------------------------------------------

def _load_bert(name_or_dir: str):
    """A BERT masked-LM checkpoint (hub name or local directory): its state dict and config."""
    from transformers import BertForMaskedLM

    bert = BertForMaskedLM.from_pretrained(name_or_dir)
    return bert.state_dict(), bert.config


def load_bert_into_decoder(decoder: BertLMHeadModel, bert_state: dict) -> None:
    """BLIP's initialisation: BERT's weights everywhere but the cross-attention (new); the word embeddings grow by
    the added tokens ([DEC], [ENC]), whose rows keep their fresh initialisation."""
    own = decoder.state_dict()
    loaded = {}
    for key, value in bert_state.items():
        if key not in own:
            continue  # token-type embeddings, pooler, the output bias duplicate
        if key in ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight", "cls.predictions.bias"):
            grown = own[key].clone()
            grown[: value.shape[0]] = value
            value = grown
        if own[key].shape != value.shape:
            raise ValueError(f"BERT checkpoint key {key}: shape {tuple(value.shape)} != {tuple(own[key].shape)}")
        loaded[key] = value
    missing = [k for k in own if k not in loaded and ".crossattention." not in k]
    if missing:
        raise ValueError(f"BERT checkpoint lacks decoder keys: {missing[:10]}")
    decoder.load_state_dict(loaded, strict=False)
    decoder.tie_weights()
