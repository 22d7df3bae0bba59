"""Configuration: nested typed dataclasses holding every default, each with its constraint beside it.

A YAML file lists only what differs from these defaults; `--set a.b=c` overrides on top.
`load_config(path, overrides)` validates both the same way (types, then each field's check, then the relations
between keys in `_check_relations`) and raises `ConfigError` with a one-line message naming the file, the dotted
key, the bad value and a "did you mean" hint. The machinery lives in `_config_loader`.

    cfg = load_config("configs/shapes.yaml", ["train.lr=3e-4", "train.trackers=[tensorboard]"])
    save_config(cfg, "runs/x/config.yaml")                       # every key, loadable again
    cfg = config_from_dict(yaml.safe_load(text), source="runs/x/config.yaml")
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from med_train._config_loader import (
    ConfigError,
    Where,
    build,
    checked,
    fraction,
    non_negative,
    not_empty,
    positive,
    probability,
    read_layers,
    rule,
    to_dict,
    to_yaml,
)

__all__ = ["Config", "ModelConfig", "VisionConfig", "TextConfig", "TokenizerConfig", "DataConfig", "TrainConfig",
           "ScstConfig", "GenerateConfig", "ConfigError", "DATA_FORMATS", "MIXED_PRECISIONS", "load_config", "config_from_dict",
           "config_to_dict", "config_to_yaml", "save_config"]

# How `data.source` is read ("auto": from what it is); the choices of train.mixed_precision.
DataFormat = Literal["auto", "hub", "imagefolder", "blip_json", "webdataset", "parquet"]
MixedPrecision = Literal["no", "bf16", "fp16"]
DATA_FORMATS: tuple[str, ...] = typing.get_args(DataFormat)
MIXED_PRECISIONS: tuple[str, ...] = typing.get_args(MixedPrecision)


@dataclass
class VisionConfig:
    name: str = not_empty("vit_base_patch16_224")  # any timm ViT name
    image_size: int = positive(384)
    pretrained: bool = False  # load timm's pretrained weights from the hub
    weights: str | None = None  # a local weights file for the ViT (timm names), overrides `pretrained`
    drop_path_rate: float = probability(0.0)
    grad_checkpointing: bool = False
    # Position embeddings of a randomly initialised ViT: "timm" (learned, N(0, 0.02)) or "sincos" (learned, starting
    # from MAE's fixed 2-D sine-cosine table: a small ViT trained from scratch knows where each patch is at once).
    pos_embed_init: Literal["timm", "sincos"] = "timm"
    # The patch embedding: "patch" (timm's, one linear map per patch) or "conv" (a stack of stride-2 3x3
    # convolutions down to the patch grid, as in "Early convolutions help transformers see better"; patch size a
    # power of 2). "conv" sees shapes inside a patch better when training from scratch; it has no transformers
    # BLIP equivalent, so `med export hf` refuses it.
    stem: Literal["patch", "conv"] = "patch"
    # Add a 2-D sine-cosine position table (learned from there) to the image tokens the decoder reads, so that
    # cross-attention sees where each token is even after the ViT's blocks have mixed its input position in.
    # Not in BLIP; `med export hf` refuses it.
    decoder_pos_embed: bool = False
    # Extra keyword arguments for timm.create_model (e.g. patch_size, embed_dim, depth, num_heads for a tiny ViT).
    kwargs: dict = field(default_factory=dict)
    # None: take the timm model's data config.
    mean: list[float] | None = checked(None, lambda v: len(v) == 3, "must list 3 values (R, G, B)")
    std: list[float] | None = checked(None, lambda v: len(v) == 3 and all(x > 0 for x in v),
                                      "must list 3 values (R, G, B), all > 0")


@dataclass
class TextConfig:
    # Where the decoder starts: "random", a BERT checkpoint (hub name such as "bert-base-uncased" or a local
    # directory; cross-attention starts new), or "blip:PATH" (a released BLIP caption checkpoint).
    init: str = not_empty("random")
    hidden_size: int = positive(768)
    num_hidden_layers: int = positive(12)
    num_attention_heads: int = positive(12)
    intermediate_size: int = positive(3072)
    max_position_embeddings: int = positive(512)
    hidden_dropout_prob: float = probability(0.0)
    attention_probs_dropout_prob: float = probability(0.0)
    layer_norm_eps: float = positive(1e-12)
    label_smoothing: float = probability(0.1)
    grad_checkpointing: bool = False


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    prompt: str = "a picture of "
    # Start from these weights (all of them; a fresh optimizer at step 0, unlike --resume): a med_train model
    # folder, a run folder (its last weights; give RUN/best for the best), a transformers BLIP captioner (hub id
    # or folder), or a BLIP .pth (`blip:PATH`). The sizes above must fit them; `model.text.init` and the vision
    # weights are then not read. The tokenizer comes with them unless `tokenizer.name` names another.
    init: str | None = not_empty(None)


@dataclass
class TokenizerConfig:
    # "bert-base-uncased" (hub), a local directory, or "train": WordPiece trained on the training captions.
    name: str = not_empty("bert-base-uncased")
    vocab_size: int = positive(2000)  # only when training one
    max_length: int = positive(40)  # tokens per caption, prompt included


@dataclass
class DataConfig:
    # A hub dataset id, a local folder (imagefolder with metadata.jsonl/csv, webdataset .tar shards, parquet files),
    # or a BLIP/Karpathy annotation JSON file (with `image_root`).
    source: str = not_empty("data/shapes")
    format: DataFormat = "auto"
    config_name: str | None = None  # hub dataset configuration
    train_split: str = not_empty("train")
    # Training validates on `val_split` and keeps `best/` by its CIDEr; `eval_split` is the split reported by
    # `med eval`. A source without a `val_split` (or with val_split null) gives validation a held-out slice of the
    # training split: each image whose hash of (train.seed, image) falls in the first `val_holdout` fraction of the
    # hash range, skipped by training in every epoch, worker and process (see sources.Holdout).
    val_split: str | None = not_empty("val")
    val_holdout: float = checked(0.01, lambda v: 0 < v < 1, "must be > 0 and < 1 (a fraction of the training images)")
    eval_split: str = not_empty("test")
    streaming: bool = False
    image_column: str = not_empty("image")
    caption_column: str = not_empty("caption")  # a cell may hold a string or a list of strings
    image_root: str | None = None  # for blip_json
    max_words: int = positive(30)
    shuffle_buffer: int = non_negative(1000)
    num_workers: int = non_negative(2)
    crop_scale_min: float = checked(0.5, lambda v: 0 < v <= 1, "must be > 0 and <= 1")  # RandomResizedCrop(scale=(crop_scale_min, 1.0))
    randaugment: bool = False
    hflip: bool = False  # captions say left/right: off by default
    max_image_pixels: int = positive(89_478_485)  # PIL's decompression-bomb limit
    max_bad_fraction: float = fraction(0.5)  # stop when more than this fraction of the first rows are bad
    id_column: str | None = None  # None: `id`, `image_id` or `__key__` if present, else the image path or row number
    cache_dir: str | None = None  # where `datasets` caches non-streamed data; None: its default (~/.cache)


@dataclass
class ScstConfig:
    """Self-critical sequence training (train.objective: scst; med_train/scst.py)."""

    samples: int = positive(5)  # captions sampled per training image (temperature 1, no top-p/top-k)
    # Each sample's baseline: "mean" (the mean reward of the image's other samples; 0 with one sample) or
    # "greedy" (the reward of the image's greedy caption, decoded as validation decodes)
    baseline: Literal["mean", "greedy"] = "mean"
    xe_weight: float = non_negative(0.0)  # adds this weight x the cross-entropy of the image's references


@dataclass
class TrainConfig:
    output_dir: str = not_empty("runs")
    # default: <config name>-<timestamp>; one folder under output_dir
    run_name: str | None = checked(None, lambda v: v.strip() not in ("", ".", "..") and not set("/\\") & set(v),
                                   "must be a plain folder name (no '/', not empty)")
    seed: int = checked(42, lambda v: 0 <= v < 2**32, "must be between 0 and 2**32 - 1 (numpy's seed range)")
    # How long to train: `max_steps` optimizer steps, or `epochs` passes over the training examples (captions, held
    # out images excluded), counted from the data at the start. Exactly one is set; setting one (in the file or by
    # --set) clears the other's value from an earlier layer, both in one layer is an error.
    max_steps: int | None = positive(1000)
    epochs: float | None = positive(None)
    # "xe": cross-entropy on the captions; "scst": self-critical CIDEr-D optimisation of a trained model (model.init)
    objective: Literal["xe", "scst"] = "xe"
    scst: ScstConfig = field(default_factory=ScstConfig)
    batch_size: int = positive(32)
    grad_accum_steps: int = positive(1)
    lr: float = positive(1e-4)
    vision_lr: float | None = positive(None)  # None: same as lr
    weight_decay: float = non_negative(0.05)
    warmup_steps: int = non_negative(0)
    min_lr_ratio: float = fraction(0.0)  # cosine decays to lr * min_lr_ratio
    clip_grad_norm: float | None = positive(1.0)
    mixed_precision: MixedPrecision | None = None  # no | bf16 | fp16; None: accelerate launch's / accelerate config's, or no
    freeze_vision: bool = False
    compile: bool = False  # torch.compile the training forward (inductor; needs a C++ compiler on the CPU)
    # med_train.fast's speed-only paths (fused ops, prepacked products, decoding kernels, CUDA graphs), each where it
    # pays on this machine; false: plain PyTorch, the same results to float rounding (MED_FAST=0 does the same)
    fast: bool = True
    log_every: int = positive(10)
    eval_every: int = non_negative(0)  # 0: only at the end
    eval_images: int = non_negative(200)  # held-out images scored during training
    save_every: int = non_negative(500)
    keep_checkpoints: int = positive(2)
    # accelerate trackers: tensorboard, wandb, ...
    trackers: list[str] = field(default_factory=list,
                                metadata=rule(lambda v: all(t.strip() for t in v), "must not hold empty names"))
    project: str = not_empty("med_train")  # the trackers' project (W&B project, MLflow experiment); the run is the folder name
    quiet: bool = False


@dataclass
class GenerateConfig:
    num_beams: int = checked(3, lambda v: v >= 1, "must be >= 1")
    max_length: int = positive(20)  # tokens, prompt included (BLIP's convention)
    min_length: int = non_negative(5)
    length_penalty: float = 1.0
    repetition_penalty: float = positive(1.0)
    do_sample: bool = False
    top_p: float = checked(0.9, lambda v: 0 < v <= 1, "must be > 0 and <= 1")
    top_k: int = non_negative(0)
    temperature: float = positive(1.0)
    batch_size: int = positive(32)
    cuda_graphs: bool = True  # on a GPU, decoding steps replayed from a captured CUDA graph (`decode.generate`)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


# ---- loading and saving --------------------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at `path` (None: no file), then `a.b=c` overrides in order; validated."""
    data, where = read_layers(Config, path, overrides, replaces=_TRAINING_LENGTH)
    return _build(data, where)


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Build a Config from a nested dict (e.g. a run folder's config.yaml), with the checks of `load_config`."""
    return _build(data, Where(Config, source, {}))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Every key of `cfg` as plain nested dicts and lists (what YAML can hold)."""
    return to_dict(cfg)


def config_to_yaml(cfg: Config) -> str:
    """The whole resolved config as YAML text; `load_config` reads it back to an equal Config."""
    return to_yaml(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config to `path` (parents created, the file replaced whole), as `load_config` reads it."""
    from med_train.run_folder import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, config_to_yaml(cfg))


# The two ways of saying how long to train; setting one replaces the other's value from an earlier layer.
_TRAINING_LENGTH = {"train.max_steps": "train.epochs", "train.epochs": "train.max_steps"}


def _build(data: Any, where: Where) -> Config:
    cfg = build(Config, data, where)
    given = data.get("train") if isinstance(data, Mapping) else None
    if cfg.train.epochs is not None and "max_steps" not in (given or {}):
        cfg.train.max_steps = None  # the default step count gives way to epochs
    _check_relations(cfg, where)
    return cfg


def _check_relations(cfg: Config, where: Where) -> None:
    """Rules that tie keys together, after each key's own check; the error names the key more likely at fault."""
    text, gen, t = cfg.model.text, cfg.generate, cfg.train
    if text.hidden_size % text.num_attention_heads:
        raise where.error("model.text.num_attention_heads", f"must divide model.text.hidden_size "
                          f"({text.hidden_size}), got {text.num_attention_heads}", also=["model.text.hidden_size"])
    if gen.min_length > gen.max_length:
        raise where.error("generate.min_length", f"must be <= generate.max_length ({gen.max_length}), "
                          f"got {gen.min_length}", also=["generate.max_length"])
    for key, length in (("tokenizer.max_length", cfg.tokenizer.max_length), ("generate.max_length", gen.max_length)):
        if length > text.max_position_embeddings:
            raise where.error(key, f"must be <= model.text.max_position_embeddings ({text.max_position_embeddings}),"
                                   f" got {length}", also=["model.text.max_position_embeddings"])
    if t.max_steps is not None and t.epochs is not None:
        raise where.error("train.epochs", f"set either train.epochs or train.max_steps, not both (train.max_steps "
                          f"is {t.max_steps}; null clears it)", also=["train.max_steps"])
    if t.epochs is not None and cfg.data.streaming:
        raise where.error("train.epochs", "cannot be counted on a streamed source (data.streaming: true has no known "
                          "length): set train.max_steps instead", also=["data.streaming"])
    if t.max_steps is None and t.epochs is None:
        raise where.error("train.max_steps", "is null and so is train.epochs: set one of them to say how long to "
                          "train", also=["train.epochs"])
    if t.objective == "scst" and cfg.model.init is None:
        raise where.error("train.objective", "scst needs a trained model to start from (sampling from random "
                          "weights gives captions with no reward to learn from): set model.init to a run or model "
                          "folder", also=["model.init"])
    if t.max_steps is not None and t.warmup_steps > t.max_steps:
        raise where.error("train.warmup_steps", f"must be <= train.max_steps ({t.max_steps}), "
                          f"got {t.warmup_steps}", also=["train.max_steps"])
