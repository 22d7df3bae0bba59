"""Configuration: nested typed dataclasses holding every default.

A YAML file lists only what differs from these defaults; `--set a.b=c` overrides on top.
`load_config(path, overrides)` validates both the same way (see the loader below) and raises `ConfigError`
with a one-line message naming the file, the dotted key, the bad value and a "did you mean" hint.

    cfg = load_config("configs/shapes.yaml", ["train.lr=3e-4", "train.trackers=[tensorboard]"])
    save_config(cfg, "runs/x/config.yaml")                       # every key, loadable again
    cfg = config_from_dict(yaml.safe_load(text), source="runs/x/config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class VisionConfig:
    name: str = "vit_base_patch16_224"  # any timm ViT name
    image_size: int = 384
    pretrained: bool = False  # load timm's pretrained weights from the hub
    weights: str | None = None  # a local weights file for the ViT (timm names), overrides `pretrained`
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    # Position embeddings of a randomly initialised ViT: "timm" (learned, N(0, 0.02)) or "sincos" (learned, starting
    # from MAE's fixed 2-D sine-cosine table: a small ViT trained from scratch knows where each patch is at once).
    pos_embed_init: str = "timm"
    # The patch embedding: "patch" (timm's, one linear map per patch) or "conv" (a stack of stride-2 3x3
    # convolutions down to the patch grid, as in "Early convolutions help transformers see better"; patch size a
    # power of 2). "conv" sees shapes inside a patch better when training from scratch; it has no transformers
    # BLIP equivalent, so `med export hf` refuses it.
    stem: str = "patch"
    # Add a 2-D sine-cosine position table (learned from there) to the image tokens the decoder reads, so that
    # cross-attention sees where each token is even after the ViT's blocks have mixed its input position in.
    # Not in BLIP; `med export hf` refuses it.
    decoder_pos_embed: bool = False
    # Extra keyword arguments for timm.create_model (e.g. patch_size, embed_dim, depth, num_heads for a tiny ViT).
    kwargs: dict = field(default_factory=dict)
    mean: list[float] | None = None  # None: take the timm model's data config
    std: list[float] | None = None


@dataclass
class TextConfig:
    # Where the decoder starts: "random", a BERT checkpoint (hub name such as "bert-base-uncased" or a local
    # directory; cross-attention starts new), or "blip:PATH" (a released BLIP caption checkpoint).
    init: str = "random"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-12
    label_smoothing: float = 0.1
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
    init: str | None = None


@dataclass
class TokenizerConfig:
    # "bert-base-uncased" (hub), a local directory, or "train": WordPiece trained on the training captions.
    name: str = "bert-base-uncased"
    vocab_size: int = 2000  # only when training one
    max_length: int = 40  # tokens per caption, prompt included


@dataclass
class DataConfig:
    # A hub dataset id, a local folder (imagefolder with metadata.jsonl/csv, webdataset .tar shards, parquet files),
    # or a BLIP/Karpathy annotation JSON file (with `image_root`).
    source: str = "data/shapes"
    format: str = "auto"  # auto | hub | imagefolder | blip_json | webdataset | parquet
    config_name: str | None = None  # hub dataset configuration
    train_split: str = "train"
    # Training validates on `val_split` and keeps `best/` by its CIDEr; `eval_split` is the split reported by
    # `med eval`. A source without a `val_split` (or with val_split null) gives validation a held-out slice of the
    # training split: each image whose hash of (train.seed, image) falls in the first `val_holdout` fraction of the
    # hash range, skipped by training in every epoch, worker and process (see sources.Holdout).
    val_split: str | None = "val"
    val_holdout: float = 0.01
    eval_split: str = "test"
    streaming: bool = False
    image_column: str = "image"
    caption_column: str = "caption"  # a cell may hold a string or a list of strings
    image_root: str | None = None  # for blip_json
    max_words: int = 30
    shuffle_buffer: int = 1000
    num_workers: int = 2
    crop_scale_min: float = 0.5  # RandomResizedCrop(scale=(crop_scale_min, 1.0))
    randaugment: bool = False
    hflip: bool = False  # captions say left/right: off by default
    max_image_pixels: int = 89_478_485  # PIL's decompression-bomb limit
    max_bad_fraction: float = 0.5  # stop when more than this fraction of the first rows are bad
    id_column: str | None = None  # None: `id`, `image_id` or `__key__` if present, else the image path or row number
    cache_dir: str | None = None  # where `datasets` caches non-streamed data; None: its default (~/.cache)


@dataclass
class TrainConfig:
    output_dir: str = "runs"
    run_name: str | None = None  # default: <config name>-<timestamp>
    seed: int = 42
    # How long to train: `max_steps` optimizer steps, or `epochs` passes over the training examples (captions, held
    # out images excluded), counted from the data at the start. Exactly one is set; setting one (in the file or by
    # --set) clears the other's value from an earlier layer, both in one layer is an error.
    max_steps: int | None = 1000
    epochs: float | None = None
    batch_size: int = 32
    grad_accum_steps: int = 1
    lr: float = 1e-4
    vision_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    clip_grad_norm: float | None = 1.0
    mixed_precision: str | None = None  # no | bf16 | fp16; None: accelerate launch's / accelerate config's, or no
    freeze_vision: bool = False
    compile: bool = False  # torch.compile the training forward (inductor; needs a C++ compiler on the CPU)
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_images: int = 200  # held-out images scored during training
    save_every: int = 500
    keep_checkpoints: int = 2
    trackers: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, ...
    project: str = "med_train"  # the trackers' project (W&B project, MLflow experiment); the run is the folder name
    quiet: bool = False


@dataclass
class GenerateConfig:
    num_beams: int = 3
    max_length: int = 20  # tokens, prompt included (BLIP's convention)
    min_length: int = 5
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    do_sample: bool = False
    top_p: float = 0.9
    top_k: int = 0
    temperature: float = 1.0
    batch_size: int = 32
    cuda_graphs: bool = True  # on a GPU, decoding steps replayed from a captured CUDA graph (`decode.generate`)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


# ---- loading, validation, saving -----------------------------------------------------------------------------------

DATA_FORMATS = ("auto", "hub", "imagefolder", "blip_json", "webdataset", "parquet")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
_NULL_WORDS = ("", "~", "null", "Null", "NULL")


class ConfigError(ValueError):
    """A bad configuration. The message is one line naming the source, the dotted key and the bad value."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at `path` (None: no file), then `a.b=c` overrides in order; validated."""
    file = str(path) if path is not None else None
    data = _read_yaml(Path(path)) if path is not None else {}
    origins: dict[str, str] = {}
    for text in overrides:
        key, value = _parse_override(text, file)
        _set_dotted(data, key, value, _Where(file, {key: text}))
        origins[key] = text
        other = _TRAINING_LENGTH.get(key)
        if other and value is not None and other not in origins:  # a later layer's length replaces the file's
            _set_dotted(data, other, None, _Where(file, {key: text}))
    return _build(data, _Where(file, origins))


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Build a Config from a nested dict (e.g. a run folder's config.yaml), with the checks of `load_config`."""
    return _build(data, _Where(source, {}))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Every key of `cfg` as plain nested dicts and lists (what YAML can hold)."""
    return _plain_data(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Config) -> str:
    """The whole resolved config as YAML text; `load_config` reads it back to an equal Config."""
    # A huge width keeps long strings on one line. PyYAML writes some line-break characters (U+0085, U+2028,
    # U+2029) raw even inside double quotes when allow_unicode is on, and reads them back as spaces: if the text
    # does not read back equal, write it again with every non-ASCII character escaped.
    data = config_to_dict(cfg)
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1 << 30)
    if yaml.safe_load(text) != data:
        text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=False, width=1 << 30)
    return text


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config to `path` (parents created), as `load_config` reads it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(cfg), encoding="utf-8")


class _Dumper(yaml.SafeDumper):
    """Block style for sections, but lists of plain values on one line (`mean: [0.48, 0.46, 0.41]`)."""

    def represent_list(self, data: list[Any]) -> yaml.Node:
        flat = all(not isinstance(v, list | dict) for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)

    def represent_text(self, data: str) -> yaml.Node:
        # PyYAML writes U+0085 raw inside single quotes when allow_unicode is on, and reads it back as a line
        # break (a space). Double quotes escape every non-printable character.
        style = None if data.isprintable() else '"'
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(list, _Dumper.represent_list)
_Dumper.add_representer(str, _Dumper.represent_text)


def _plain_data(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):  # safe_dump cannot write tuples
        return [_plain_data(v) for v in value]
    return value


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML loading that also rejects a key written twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(exc).split())  # PyYAML's messages span lines; ours are one line


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # safe: _StrictLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({_yaml_problem(exc)})") from None
    if data is None:  # an empty file, or only comments: all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(_field_names(Config))}) "
                          f"at the top level, got {_show(data)}")
    return data


def _parse_override(text: str, file: str | None) -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", value). String fields take the text as typed, other fields parse it as YAML."""
    key, sep, raw = text.partition("=")
    key = ".".join(part.strip() for part in key.split("."))
    if not sep or any(not part for part in key.split(".")):
        where = f" (on {file})" if file else ""
        raise ConfigError(f"--set {text}{where}: expected KEY=VALUE with a dotted key, e.g. train.lr=3e-4")
    tp = _field_type(key)
    if tp is not None and _is_text(tp):
        # Parsing as YAML would turn `data.train_split=2017` into an int and `model.prompt=a picture of `
        # lose its trailing space; a quoted value is still parsed, so '"null"' gives the word null.
        if raw in _NULL_WORDS and type(None) in typing.get_args(tp):
            return key, None
        if not (len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""):
            return key, raw
    try:
        return key, yaml.load(raw, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        problem = f"value {raw!r} is not valid YAML ({_yaml_problem(exc)})"
        raise _Where(file, {key: text}).error(key, problem) from None


def _set_dotted(data: dict[str, Any], key: str, value: Any, where: _Where) -> None:
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            parent = ".".join(parts[: depth + 1])
            raise where.error(key, f"cannot set it: {parent} is {_show(child)}, not a section")
        node = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        _deep_merge(node[last], value)  # --set model.vision={name: x} keeps the file's other vision keys
    else:
        node[last] = value


def _deep_merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


@dataclass(frozen=True)
class _Where:
    """Where values came from, so that an error can name the file or the `--set` that gave the bad key."""

    file: str | None
    origins: dict[str, str]  # dotted key -> the --set text that set it

    def error(self, key: str, problem: str, also: Sequence[str] = ()) -> ConfigError:
        """`key` is the key at fault; `also` lists other keys the problem involves (for finding the --set)."""

        def related(k: str) -> bool:  # this key, a section above it, or a key inside it
            return any(k == x or x.startswith((k + ".", k + "[")) or k.startswith(x + ".") for x in (key, *also))

        hits = [k for k in self.origins if related(k)]  # the longest (most specific) --set wins
        if hits:
            where = f"--set {self.origins[max(hits, key=len)]}" + (f" (on {self.file})" if self.file else "")
        else:
            where = self.file or "<defaults>"
        return ConfigError(f"{where}: {key}: {problem}" if key else f"{where}: {problem}", key=key)

    def mismatch(self, key: str, value: Any, tp: Any) -> ConfigError:
        # YAML turns unquoted 2017, 1.0 or yes into numbers and bools.
        texts = tp is str or (_is_union(tp) and str in typing.get_args(tp))
        hint = "; quote it to make it a string" if texts and isinstance(value, int | float) else ""
        return self.error(key, f"expected {_describe(tp)}, got {_show(value)} ({type(value).__name__}){hint}")


def _show(value: Any) -> str:
    text = repr(value)  # repr escapes newlines: messages stay on one line
    return text if len(text) <= 80 else text[:77] + "..."


def _name(key: Any) -> str:
    text = str(key)
    return text if text.isprintable() else repr(text)


def _join(prefix: str, name: Any) -> str:
    return f"{prefix}.{_name(name)}" if prefix else _name(name)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # `from __future__ import annotations` leaves annotations as strings; this resolves them.
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _field_names(cls: type) -> list[str]:
    return list(_hints(cls))


def _field_type(key: str) -> Any | None:
    """The declared type of a dotted key, or None when the key is not a dataclass field."""
    tp: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp) or part not in _hints(tp):
            return None
        tp = _hints(tp)[part]
    return tp


@functools.cache
def _all_keys() -> tuple[str, ...]:
    """Every dotted key of Config, sections included."""

    def under(cls: type, prefix: str) -> list[str]:
        keys: list[str] = []
        for name, tp in _hints(cls).items():
            keys.append(_join(prefix, name))
            if dataclasses.is_dataclass(tp):
                keys.extend(under(tp, _join(prefix, name)))
        return keys

    return tuple(under(Config, ""))


def _is_text(tp: Any) -> bool:
    return tp is str or (_is_union(tp) and set(typing.get_args(tp)) == {str, type(None)})


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _describe(tp: Any) -> str:
    if _is_union(tp):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])} values" if args else "a list"
    if tp is dict or origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(_field_names(tp))}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _suggest(name: Any, prefix: str, cls: type) -> str:
    """A "did you mean" hint for an unknown key: a near name in the same section, or the name elsewhere."""
    near = difflib.get_close_matches(str(name), _field_names(cls), n=1)
    if near:
        return f"did you mean '{_join(prefix, near[0])}'?"
    # The name, or a near one, in another section (train.num_beam -> generate.num_beams). Comparing the last
    # part only, because whole dotted keys sharing the section prefix look alike to difflib.
    last_parts = {k.rsplit(".", 1)[-1] for k in _all_keys()}
    near = difflib.get_close_matches(str(name), last_parts, n=1)
    elsewhere = [k for k in _all_keys() if near and k.rsplit(".", 1)[-1] == near[0]]
    if elsewhere:
        return "did you mean " + " or ".join(f"'{k}'" for k in elsewhere) + "?"
    return f"valid keys{' in ' + prefix if prefix else ''}: {', '.join(_field_names(cls))}"


# The two ways of saying how long to train; setting one replaces the other's value from an earlier layer.
_TRAINING_LENGTH = {"train.max_steps": "train.epochs", "train.epochs": "train.max_steps"}


def _build(data: Any, where: _Where) -> Config:
    cfg = _convert(data, Config, "", where)
    given = data.get("train") if isinstance(data, Mapping) else None
    if cfg.train.epochs is not None and "max_steps" not in (given or {}):
        cfg.train.max_steps = None  # the default step count gives way to epochs
    _check_values(cfg, where)
    return cfg


def _build_section(cls: type, raw: Any, prefix: str, where: _Where) -> Any:
    if raw is None:  # `train:` with nothing under it
        raw = {}
    if not isinstance(raw, Mapping):
        raise where.mismatch(prefix, raw, cls)
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        key = _join(prefix, name)
        if name not in hints:
            raise where.error(key, f"unknown key (value {_show(value)}); {_suggest(name, prefix, cls)}")
        values[name] = _convert(value, hints[name], key, where)
    return cls(**values)


def _convert(value: Any, tp: Any, key: str, where: _Where) -> Any:
    """Check `value` against the declared type `tp` and convert where YAML falls short (`1e-5` -> float)."""
    if dataclasses.is_dataclass(tp):
        return _build_section(tp, value, key, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        deeper: list[ConfigError] = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arm, key, where)
            except ConfigError as exc:
                if exc.key != key:  # a bad element further down (model.vision.mean[1]) says more
                    deeper.append(exc)
        if deeper:
            raise deeper[0]
        raise where.mismatch(key, value, tp)
    if origin is typing.Literal:
        if value in args:
            return value
        raise where.mismatch(key, value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise where.mismatch(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise where.mismatch(key, value, tp)
    if tp is float:
        return _to_float(value, key, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise where.mismatch(key, value, tp)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise where.mismatch(key, value, tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise where.error(key, f"expected {len(args)} values, got {_show(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args, strict=True)))
        items = [_convert(v, args[0], f"{key}[{i}]", where) if args else v for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise where.mismatch(key, value, tp)
        for name in value:
            if not isinstance(name, str):  # these dicts become keyword arguments
                raise where.error(_join(key, name), f"keys must be strings, got {_show(name)}")
        if args:
            return {k: _convert(v, args[1], _join(key, k), where) for k, v in value.items()}
        return dict(value)
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp)):
        return value
    raise where.mismatch(key, value, tp)


def _to_float(value: Any, key: str, where: _Where) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # PyYAML reads `1e-5` (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None:
        raise where.mismatch(key, value, float)
    if not math.isfinite(number):
        raise where.error(key, f"must be a finite number, got {_show(value)}")
    return number


# Value checks per dotted key: (test, what it requires). None values (optional fields left unset) are skipped.
_Check = tuple[Callable[[Any], bool], str]
_POSITIVE: _Check = (lambda v: v > 0, "must be > 0")
_NON_NEGATIVE: _Check = (lambda v: v >= 0, "must be >= 0")
_FRACTION: _Check = (lambda v: 0 <= v <= 1, "must be between 0 and 1")
_PROBABILITY: _Check = (lambda v: 0 <= v < 1, "must be >= 0 and < 1")
_NOT_EMPTY: _Check = (lambda v: v.strip() != "", "must not be empty")
_RGB: _Check = (lambda v: len(v) == 3, "must list 3 values (R, G, B)")
_CHECKS: dict[str, _Check] = {
    "model.vision.name": _NOT_EMPTY,
    "model.vision.image_size": _POSITIVE,
    "model.vision.drop_path_rate": _PROBABILITY,
    "model.vision.mean": _RGB,
    "model.vision.std": (lambda v: len(v) == 3 and all(x > 0 for x in v), "must list 3 values (R, G, B), all > 0"),
    "model.text.init": _NOT_EMPTY,
    "model.init": _NOT_EMPTY,
    "model.text.hidden_size": _POSITIVE,
    "model.text.num_hidden_layers": _POSITIVE,
    "model.text.num_attention_heads": _POSITIVE,
    "model.text.intermediate_size": _POSITIVE,
    "model.text.max_position_embeddings": _POSITIVE,
    "model.text.hidden_dropout_prob": _PROBABILITY,
    "model.text.attention_probs_dropout_prob": _PROBABILITY,
    "model.text.layer_norm_eps": _POSITIVE,
    "model.text.label_smoothing": _PROBABILITY,
    "tokenizer.name": _NOT_EMPTY,
    "tokenizer.vocab_size": _POSITIVE,
    "tokenizer.max_length": _POSITIVE,
    "data.source": _NOT_EMPTY,
    "data.train_split": _NOT_EMPTY,
    "data.val_split": _NOT_EMPTY,
    "data.val_holdout": (lambda v: 0 < v < 1, "must be > 0 and < 1 (a fraction of the training images)"),
    "data.eval_split": _NOT_EMPTY,
    "data.image_column": _NOT_EMPTY,
    "data.caption_column": _NOT_EMPTY,
    "data.max_words": _POSITIVE,
    "data.shuffle_buffer": _NON_NEGATIVE,
    "data.num_workers": _NON_NEGATIVE,
    "data.crop_scale_min": (lambda v: 0 < v <= 1, "must be > 0 and <= 1"),
    "data.max_image_pixels": _POSITIVE,
    "data.max_bad_fraction": _FRACTION,
    "train.output_dir": _NOT_EMPTY,
    # The run name becomes one folder under output_dir.
    "train.run_name": (lambda v: v.strip() not in ("", ".", "..") and not set("/\\") & set(v),
                       "must be a plain folder name (no '/', not empty)"),
    "train.seed": (lambda v: 0 <= v < 2**32, "must be between 0 and 2**32 - 1 (numpy's seed range)"),
    "train.max_steps": _POSITIVE,
    "train.epochs": _POSITIVE,
    "train.batch_size": _POSITIVE,
    "train.grad_accum_steps": _POSITIVE,
    "train.lr": _POSITIVE,
    "train.vision_lr": _POSITIVE,
    "train.weight_decay": _NON_NEGATIVE,
    "train.warmup_steps": _NON_NEGATIVE,
    "train.min_lr_ratio": _FRACTION,
    "train.clip_grad_norm": _POSITIVE,
    "train.log_every": _POSITIVE,
    "train.eval_every": _NON_NEGATIVE,
    "train.eval_images": _NON_NEGATIVE,
    "train.save_every": _NON_NEGATIVE,
    "train.keep_checkpoints": _POSITIVE,
    "train.trackers": (lambda v: all(t.strip() for t in v), "must not hold empty names"),
    "train.project": _NOT_EMPTY,
    "generate.num_beams": (lambda v: v >= 1, "must be >= 1"),
    "generate.max_length": _POSITIVE,
    "generate.min_length": _NON_NEGATIVE,
    "generate.repetition_penalty": _POSITIVE,
    "generate.top_p": (lambda v: 0 < v <= 1, "must be > 0 and <= 1"),
    "generate.top_k": _NON_NEGATIVE,
    "generate.temperature": _POSITIVE,
    "generate.batch_size": _POSITIVE,
}
_CHOICES: dict[str, tuple[str, ...]] = {"data.format": DATA_FORMATS, "train.mixed_precision": MIXED_PRECISIONS,
                                         "model.vision.pos_embed_init": ("timm", "sincos"),
                                         "model.vision.stem": ("patch", "conv")}


def _get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_values(cfg: Config, where: _Where) -> None:
    for key, (test, requirement) in _CHECKS.items():
        value = _get(cfg, key)
        if value is not None and not test(value):
            raise where.error(key, f"{requirement}, got {_show(value)}")
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value is not None and value not in choices:
            near = difflib.get_close_matches(value, choices, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise where.error(key, f"must be one of {' | '.join(choices)}, got {_show(value)}{hint}")
    # Relations between keys; the error names the key that is more likely the mistake.
    text, gen = cfg.model.text, cfg.generate
    if text.hidden_size % text.num_attention_heads:
        raise where.error("model.text.num_attention_heads", f"must divide model.text.hidden_size "
                          f"({text.hidden_size}), got {text.num_attention_heads}", also=["model.text.hidden_size"])
    if gen.min_length > gen.max_length:
        raise where.error("generate.min_length", f"must be <= generate.max_length ({gen.max_length}), "
                          f"got {gen.min_length}", also=["generate.max_length"])
    for key in ("tokenizer.max_length", "generate.max_length"):
        if _get(cfg, key) > text.max_position_embeddings:
            raise where.error(key, f"must be <= model.text.max_position_embeddings ({text.max_position_embeddings}),"
                                   f" got {_get(cfg, key)}", also=["model.text.max_position_embeddings"])
    t = cfg.train
    if t.max_steps is not None and t.epochs is not None:
        raise where.error("train.epochs", f"set either train.epochs or train.max_steps, not both (train.max_steps "
                          f"is {t.max_steps}; null clears it)", also=["train.max_steps"])
    if t.epochs is not None and cfg.data.streaming:
        raise where.error("train.epochs", "cannot be counted on a streamed source (data.streaming: true has no known "
                          "length): set train.max_steps instead", also=["data.streaming"])
    if t.max_steps is None and t.epochs is None:
        raise where.error("train.max_steps", "is null and so is train.epochs: set one of them to say how long to "
                          "train", also=["train.epochs"])
    if t.max_steps is not None and t.warmup_steps > t.max_steps:
        raise where.error("train.warmup_steps", f"must be <= train.max_steps ({cfg.train.max_steps}), "
                          f"got {cfg.train.warmup_steps}", also=["train.max_steps"])
