"""Weights from elsewhere: BLIP's released `.pth` files, transformers' BLIP captioners, and `model.init`.

    med convert blip model_base_caption.pth out/                        # convert_blip
    med convert hf Salesforce/blip-image-captioning-base out/           # convert_hf (a hub id or a local folder)
    model: {init: out/}                                                 # load_init: weights only, step 0

Our state-dict names are BLIP's (`visual_encoder.*` in timm's ViT names, `text_decoder.*` in MED's), so a BLIP
`.pth` loads as it is; transformers' BLIP renames only the ViT's keys (`_VIT_TO_HF`, undone by `timm_vision_key`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from med_train.config import ConfigError, ModelConfig, TextConfig, VisionConfig
from med_train.model import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Captioner,
    check_weights,
    key_list,
    read_model_config,
    read_tokenizer,
    read_weights,
)
from med_train.run_folder import BadFileError, first_line, load_pickled
from med_train.tokenizer import load_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # BLIP normalises with CLIP's statistics
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TIMM_VIT_EPS = 1e-6  # timm's ViT LayerNorms; transformers' BLIP configs say 1e-5

_VIT_TO_HF = [  # timm ViT name -> transformers BlipVisionModel name (after "vision_model.")
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("norm.", "post_layernorm."),
    ("blocks.", "encoder.layers."),
    (".norm1.", ".layer_norm1."),
    (".norm2.", ".layer_norm2."),
    (".attn.qkv.", ".self_attn.qkv."),
    (".attn.proj.", ".self_attn.projection."),
]


def _rename(key: str, pairs) -> str:
    """Prefixes are replaced at the start only; names starting with '.' anywhere."""
    for old, new in pairs:
        if old[0] == ".":
            key = key.replace(old, new)
        elif key.startswith(old):
            key = new + key[len(old):]
    return key


def hf_vision_key(key: str) -> str:
    """timm ViT key (no `visual_encoder.`) -> transformers BLIP key."""
    return "vision_model." + _rename(key, _VIT_TO_HF)


def timm_vision_key(key: str) -> str:
    """transformers BLIP key (after `vision_model.`) -> timm ViT key."""
    return _rename(key, [(new, old) for old, new in _VIT_TO_HF])


# ---- loading a state dict into the configured model -----------------------------------------------------------

def load_state(model: Captioner, state: dict, source: str) -> None:
    """Load `state` (our names) into `model`, all of it or nothing. The ViT's position embeddings are resized
    (bicubic) when the image size differs; any other shape mismatch, missing or unexpected key is a one-line
    error naming `source` and the first keys with their shapes."""
    from timm.layers import resample_abs_pos_embed

    state, own = dict(state), model.state_dict()
    pos_key = "visual_encoder.pos_embed"
    if pos_key in state and pos_key in own and state[pos_key].shape != own[pos_key].shape:
        grid = model.visual_encoder.patch_embed.grid_size
        state[pos_key] = resample_abs_pos_embed(state[pos_key], new_size=list(grid), num_prefix_tokens=1)
    tied = "text_decoder.cls.predictions.decoder.weight"  # stored once, under the word embeddings' name
    if tied not in state and "text_decoder.bert.embeddings.word_embeddings.weight" in state:
        state[tied] = state["text_decoder.bert.embeddings.word_embeddings.weight"]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)} configured"
                  for k in own if k in state and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and k.startswith(("visual_encoder.", "text_decoder."))]
    if mismatched or missing or unexpected:
        problems = [f"{name}: {key_list(keys)}" for name, keys in (("shape mismatches", mismatched),
                                                                ("missing", missing), ("unexpected", unexpected))
                    if keys]
        raise ValueError(f"{source}: does not fit the configured model; {'; '.join(problems)}")
    model.load_state_dict({k: state[k] for k in own}, strict=True)
    model.text_decoder.tie_weights()


# ---- BLIP's released .pth -------------------------------------------------------------------------------------

def read_blip_state(path: str | Path) -> dict:
    """The weights of a released BLIP checkpoint (a pickle with them under 'model'), read without running any
    pickled code (`weights_only=True`); a `BadFileError` for a file that is not one."""
    checkpoint = load_pickled(path, map_location="cpu")
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("text_decoder.") for k in state):
        raise BadFileError(path, "not a BLIP caption checkpoint (expected the weights under 'model', with "
                                 "text_decoder.* keys)")
    # the output bias is stored twice (decoder.bias is cls.predictions.bias); position_ids are an old buffer
    return {k: v for k, v in state.items()
            if k != "text_decoder.cls.predictions.decoder.bias" and not k.endswith("position_ids")}


def load_blip_checkpoint(model: Captioner, path: str | Path, state: dict | None = None) -> None:
    """Load a BLIP caption checkpoint into `model` (see `load_state`)."""
    load_state(model, read_blip_state(path) if state is None else state, str(path))


def convert_blip(path: str | Path, out_dir: str | Path, tokenizer: str = "bert-base-uncased",
                 image_size: int | None = None) -> Captioner:
    """`med convert blip`: a released BLIP caption checkpoint -> a med_train model directory. The sizes are read
    from the weights (heads = width / 64, as in every BLIP model); `image_size` defaults to the checkpoint's."""
    state = read_blip_state(path)
    tok = load_tokenizer(tokenizer)
    width = state["visual_encoder.cls_token"].shape[-1]
    patch = state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    grid = round((state["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
    depth = len({k.split(".")[2] for k in state if k.startswith("visual_encoder.blocks.")})
    hidden = state["text_decoder.bert.embeddings.word_embeddings.weight"].shape[1]
    vocab = state["text_decoder.bert.embeddings.word_embeddings.weight"].shape[0]
    if vocab != len(tok):
        raise ValueError(f"{path}: the checkpoint's vocabulary has {vocab} tokens but the tokenizer {tokenizer!r} "
                         f"has {len(tok)} (with [DEC] and [ENC])")
    cfg = ModelConfig(
        vision=VisionConfig(name=_vit_name(width), image_size=image_size or grid * patch, mean=CLIP_MEAN,
                            std=CLIP_STD,
                            kwargs=dict(patch_size=patch, embed_dim=width, depth=depth, num_heads=width // 64)),
        text=TextConfig(
            hidden_size=hidden, num_attention_heads=hidden // 64,
            num_hidden_layers=len({k.split(".")[4] for k in state if k.startswith("text_decoder.bert.encoder.layer.")}),
            intermediate_size=state["text_decoder.bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=state["text_decoder.bert.embeddings.position_embeddings.weight"].shape[0]),
    )
    model = Captioner(cfg, tok, load_weights=False)
    load_blip_checkpoint(model, path, state)
    model.save_pretrained(out_dir)
    return model


def _vit_name(width: int) -> str:
    """A timm ViT whose defaults are near the weights' (the sizes themselves are given as kwargs)."""
    return "vit_large_patch16_224" if width == 1024 else "vit_base_patch16_224"


# ---- transformers' BLIP captioners ----------------------------------------------------------------------------

@dataclass
class HfCaptioner:
    """A transformers BLIP captioner read into our terms."""

    config: ModelConfig
    state: dict  # our names
    tokenizer: object


def read_hf_captioner(source: str, prompt: str = "") -> HfCaptioner:
    """A `BlipForConditionalGeneration` (hub id or local folder, `from_pretrained`) as our config, weights and
    tokenizer. The image size, mean and std come from its processor when it has one (else the vision config's
    size and BLIP's CLIP statistics). Raises ValueError (one line) for anything that is not a BLIP captioner."""
    from transformers import AutoConfig, BlipForConditionalGeneration

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        tried = "" if Path(source).exists() else "not a local file or folder; as a hub id: "
        raise ValueError(f"{source}: {tried}cannot read a transformers model config ({first_line(err)})") from None
    architectures = getattr(config, "architectures", None) or []
    if config.model_type != "blip" or (architectures and "BlipForConditionalGeneration" not in architectures):
        raise ValueError(f"{source}: not a transformers BLIP captioner (model_type {config.model_type!r}, "
                         f"architectures {architectures}); expected BlipForConditionalGeneration")
    v, t = config.vision_config, config.text_config
    if v.hidden_act != "gelu" or t.hidden_act != "gelu":
        raise ValueError(f"{source}: activations {v.hidden_act!r}/{t.hidden_act!r}: only BLIP's exact GELU is "
                         f"supported")
    tokenizer = load_tokenizer(source)
    ids = {"bos ([DEC])": (tokenizer.bos_token_id, t.bos_token_id), "sep": (tokenizer.sep_token_id, t.sep_token_id),
           "pad": (tokenizer.pad_token_id, t.pad_token_id), "vocabulary size": (len(tokenizer), t.vocab_size)}
    wrong = [f"{name} {ours} in the tokenizer vs {theirs} in the config" for name, (ours, theirs) in ids.items()
             if ours != theirs]
    if wrong:
        raise ValueError(f"{source}: the tokenizer does not match the model: {', '.join(wrong)}")
    size, mean, std = _processor_image_config(source, v.image_size)
    kwargs = dict(patch_size=v.patch_size, embed_dim=v.hidden_size, depth=v.num_hidden_layers,
                  num_heads=v.num_attention_heads, mlp_ratio=v.intermediate_size / v.hidden_size)
    if v.layer_norm_eps != TIMM_VIT_EPS:
        kwargs["layer_norm_eps"] = v.layer_norm_eps
    model_config = ModelConfig(
        vision=VisionConfig(name=_vit_name(v.hidden_size), image_size=size, mean=mean, std=std, kwargs=kwargs),
        text=TextConfig(hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
                        num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
                        max_position_embeddings=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
                        hidden_dropout_prob=t.hidden_dropout_prob,
                        attention_probs_dropout_prob=t.attention_probs_dropout_prob),
        prompt=prompt)
    with quiet_progress():
        hf = BlipForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    return HfCaptioner(model_config, state_from_hf(hf.state_dict()), tokenizer)


@contextmanager
def quiet_progress():
    """Without transformers' progress bars (loading, writing): an error after them stays the one line on
    stderr."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _processor_image_config(source: str, default_size: int) -> tuple[int, list[float], list[float]]:
    from transformers import BlipImageProcessor

    try:
        processor = BlipImageProcessor.from_pretrained(source)
    except OSError:  # no preprocessor config: transformers' BLIP defaults
        return default_size, CLIP_MEAN, CLIP_STD
    size = processor.size or {}
    if size.get("height", default_size) != size.get("width", default_size):
        raise ValueError(f"{source}: the processor resizes to {size}; only square images are supported")
    return (size.get("height", default_size), [float(x) for x in processor.image_mean],
            [float(x) for x in processor.image_std])


def state_from_hf(hf_state: dict) -> dict:
    """transformers BLIP captioner state dict -> ours (the text decoder's names are the same)."""
    state = {}
    for key, value in hf_state.items():
        if key.startswith("vision_model."):
            state["visual_encoder." + timm_vision_key(key.removeprefix("vision_model."))] = value
        elif (key.startswith("text_decoder.") and key != "text_decoder.cls.predictions.decoder.bias"
              and not key.endswith("position_ids")):
            state[key] = value
    return state


def convert_hf(source: str, out_dir: str | Path, prompt: str = "") -> Captioner:
    """`med convert hf`: a transformers BLIP captioner -> a med_train model directory."""
    hf = read_hf_captioner(source, prompt)
    model = Captioner(hf.config, hf.tokenizer, load_weights=False)
    load_state(model, hf.state, source)
    model.save_pretrained(out_dir)
    return model


# ---- model.init: start from any weights -----------------------------------------------------------------------

def init_kind(source: str) -> tuple[str, str]:
    """("blip", path) for a BLIP .pth (`blip:PATH` or a file), ("med", dir) for a med_train model directory or run
    folder (its top-level, last weights), else ("hf", source): a transformers folder or hub id."""
    if source.startswith("blip:"):
        return "blip", source.removeprefix("blip:")
    path = Path(source)
    if path.is_file():
        return "blip", source
    if (path / CONFIG_NAME).is_file():
        return "med", source
    return "hf", source


@dataclass
class InitWeights:
    state: dict  # our names
    mean: list[float] | None  # the normalisation the weights expect, when known
    std: list[float] | None


def read_init(source: str) -> InitWeights:
    """The weights `model.init` names, in our names. A file there that cannot be used is the `BadFileError` that
    `med caption --model` gives for it (a bad file, not a bad config); other errors are `ConfigError`s naming
    model.init."""
    kind, where = init_kind(source)
    try:
        if kind == "blip":
            return InitWeights(read_blip_state(where), CLIP_MEAN, CLIP_STD)
        if kind == "med":
            return _read_model_dir(Path(where))
        hf = read_hf_captioner(where)
        return InitWeights(hf.state, hf.config.vision.mean, hf.config.vision.std)
    except BadFileError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"model.init: {first_line(err)}", key="model.init") from None


def _read_model_dir(folder: Path) -> InitWeights:
    """A med_train model directory's weights, checked as `Captioner.from_pretrained` checks them: against its own
    med_config.json (a model built on the meta device: shapes only, no memory), so that weights of other shapes
    are blamed on the file, not on the config being trained."""
    cfg, _ = read_model_config(folder)
    with torch.device("meta"):
        shell = Captioner(cfg, read_tokenizer(folder), load_weights=False)
    check_weights(shell, folder / WEIGHTS_NAME)
    return InitWeights(read_weights(folder / WEIGHTS_NAME), cfg.vision.mean, cfg.vision.std)


def load_init(model: Captioner, weights: InitWeights, source: str) -> None:
    try:
        load_state(model, weights.state, source)
    except ValueError as err:
        raise ConfigError(f"model.init: {err}", key="model.init") from None


def init_tokenizer(model_cfg: ModelConfig, tokenizer_name: str):
    """The tokenizer of `model.init`'s weights (their vocabulary), unless `tokenizer.name` names another one:
    None when there is no init, the init has no tokenizer (a BLIP .pth), or the config names a tokenizer other
    than the default; `"train"` would make a new vocabulary the weights do not know, so the init's wins."""
    from med_train.config import TokenizerConfig

    if not model_cfg.init or tokenizer_name not in (TokenizerConfig.name, "train"):
        return None
    kind, where = init_kind(model_cfg.init)
    if kind == "blip":
        return None
    if kind == "med":
        return read_tokenizer(Path(where))  # a damaged tokenizer file: named, as `med caption` names it
    try:
        return load_tokenizer(where)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.init: {where}: cannot load its tokenizer ({first_line(err)})",
                          key="model.init") from None
