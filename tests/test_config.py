"""Tests of the config loader (med_train/config.py) and `med config show`.

    .venv/bin/python -m pytest -q tests/test_config.py
"""

from __future__ import annotations

import dataclasses
import json
import string
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from med_train._config_loader import build, positive, read_layers
from med_train.cli import app
from med_train.config import (
    DATA_FORMATS,
    MIXED_PRECISIONS,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    load_config,
    save_config,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """{"train.lr": 1} -> {"train": {"lr": 1}}"""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *sections, last = key.split(".")
        node = out
        for part in sections:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def error_of(path: Path | None, overrides: Sequence[str] = ()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message  # the CLI prints it as one line
    return info.value


def leaf_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key that holds a value, with its declared type."""
    keys: dict[str, Any] = {}
    for name, tp in typing.get_type_hints(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            keys.update(leaf_keys(tp, key + "."))
        else:
            keys[key] = tp
    return keys


# ---- defaults and overrides ----------------------------------------------------------------------------------------


def test_no_file_empty_file_and_comments_give_the_defaults(tmp_path: Path) -> None:
    assert load_config(None) == Config()
    assert load_config(write(tmp_path / "empty.yaml", "")) == Config()
    assert load_config(write(tmp_path / "comments.yaml", "# nothing\ntrain:\n  # lr: 3\n")) == Config()


def test_yaml_lists_only_what_differs(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "model:\n  vision:\n    image_size: 224\ntrain:\n  lr: 3e-4\n  batch_size: 8\n")
    cfg = load_config(path)
    assert cfg.model.vision.image_size == 224
    assert cfg.train.lr == 3e-4 and type(cfg.train.lr) is float  # PyYAML alone reads "3e-4" as a string
    assert cfg.train.batch_size == 8
    expected = Config()
    expected.model.vision.image_size, expected.train.lr, expected.train.batch_size = 224, 3e-4, 8
    assert cfg == expected


def test_set_overrides_parse_yaml_values(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "train:\n  lr: 0.1\n  clip_grad_norm: 2.0\ndata:\n  streaming: false\n")
    cfg = load_config(path, [
        "train.lr=1e-5",  # over the file's value
        "train.max_steps=7",
        "data.streaming=true",
        "train.trackers=[tensorboard, wandb]",
        "train.clip_grad_norm=null",
        "model.vision.kwargs={depth: 2, embed_dim: 64}",
        "model.vision.kwargs.num_heads=4",  # into a dict field, merged with the one above
        "model.vision.mean=[0.5, 0.5, 5e-1]",
        "generate.num_beams=1",
        "generate.num_beams=2",  # the last --set wins
    ])
    assert cfg.train.lr == 1e-5 and cfg.train.max_steps == 7 and cfg.data.streaming is True
    assert cfg.train.trackers == ["tensorboard", "wandb"]
    assert cfg.train.clip_grad_norm is None
    assert cfg.model.vision.kwargs == {"depth": 2, "embed_dim": 64, "num_heads": 4}
    assert cfg.model.vision.mean == [0.5, 0.5, 0.5]
    assert cfg.generate.num_beams == 2


def test_set_on_string_fields_keeps_the_text_as_typed() -> None:
    cfg = load_config(None, ["model.prompt=a photo of ", "data.train_split=2017", "data.eval_split=true",
                             "data.config_name=null", "tokenizer.name='null'", "data.source=a=b"])
    assert cfg.model.prompt == "a photo of "  # YAML would strip the space the decoder prompt needs
    assert cfg.data.train_split == "2017" and cfg.data.eval_split == "true"
    assert cfg.data.config_name is None  # an optional string takes null
    assert cfg.tokenizer.name == "null"  # quoted: the word itself
    assert cfg.data.source == "a=b"  # split on the first "=" only


def test_int_is_a_float_but_bool_is_not_an_int(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "c.yaml", "train:\n  lr: 1\n"))
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert error_of(None, ["train.batch_size=true"]).key == "train.batch_size"
    assert error_of(None, ["train.lr=true"]).key == "train.lr"
    assert error_of(None, ["train.batch_size=2.0"]).key == "train.batch_size"


def test_optional_fields_take_null_others_do_not(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "c.yaml", "train:\n  vision_lr: null\n  run_name: ~\n"))
    assert cfg.train.vision_lr is None and cfg.train.run_name is None
    err = error_of(write(tmp_path / "d.yaml", "train:\n  lr: null\n"))
    assert err.key == "train.lr" and "None" in str(err)


# ---- unknown keys and wrong types ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("yaml_text", "key", "hint"), [
    ("trian:\n  lr: 0.1\n", "trian", "did you mean 'train'?"),
    ("train:\n  lrr: 0.1\n", "train.lrr", "did you mean 'train.lr'?"),
    ("model:\n  vision:\n    imge_size: 224\n", "model.vision.imge_size", "did you mean 'model.vision.image_size'?"),
    ("train:\n  num_beams: 3\n", "train.num_beams", "did you mean 'generate.num_beams'?"),  # wrong section
    ("lr: 0.1\n", "lr", "did you mean 'train.lr'?"),
    ("generate:\n  zzqx: 1\n", "generate.zzqx", "valid keys in generate: num_beams"),
])
def test_unknown_keys_fail_with_a_hint(tmp_path: Path, yaml_text: str, key: str, hint: str) -> None:
    path = write(tmp_path / "c.yaml", yaml_text)
    err = error_of(path)
    assert err.key == key
    message = str(err)
    assert message.startswith(f"{path}: {key}: unknown key"), message
    assert hint in message
    assert "(value " in message


@pytest.mark.parametrize(("dotted", "value", "bad_key", "shown"), [
    ("train.batch_size", "abc", "train.batch_size", "'abc'"),
    ("train.lr", "fast", "train.lr", "'fast'"),
    ("train.lr", [1e-4], "train.lr", "[0.0001]"),
    ("train.trackers", "tensorboard", "train.trackers", "'tensorboard'"),  # a string is not a list
    ("train.trackers", ["tensorboard", 3], "train.trackers[1]", "3"),
    ("model.vision.mean", [0.5, "x", 0.5], "model.vision.mean[1]", "'x'"),
    ("model.vision.kwargs", [1, 2], "model.vision.kwargs", "[1, 2]"),
    ("model.vision.kwargs", {1: 2}, "model.vision.kwargs.1", "1"),
    ("data.source", 123, "data.source", "123"),
    ("data.hflip", "yes please", "data.hflip", "'yes please'"),
    ("model.vision", "vit", "model.vision", "'vit'"),
])
def test_wrong_types_name_the_file_key_and_value(tmp_path: Path, dotted: str, value: Any, bad_key: str,
                                                 shown: str) -> None:
    path = write(tmp_path / "c.yaml", yaml.safe_dump(nested({dotted: value})))
    err = error_of(path)
    assert err.key == bad_key
    assert str(err).startswith(f"{path}: {bad_key}: ")
    assert shown in str(err)


def test_a_number_for_a_string_suggests_quoting(tmp_path: Path) -> None:
    err = error_of(write(tmp_path / "c.yaml", "data:\n  config_name: 2017\n"))
    assert err.key == "data.config_name" and "quote it" in str(err)


# ---- invalid values --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "key"), [
    ("train.batch_size=0", "train.batch_size"),
    ("train.max_steps=-5", "train.max_steps"),
    ("train.lr=0", "train.lr"),
    ("train.lr=-1e-4", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.lr=inf", "train.lr"),
    ("train.mixed_precision=fp32", "train.mixed_precision"),
    ("data.format=csv", "data.format"),
    ("generate.num_beams=0", "generate.num_beams"),
    ("generate.min_length=30", "generate.min_length"),
    ("generate.top_p=1.5", "generate.top_p"),
    ("model.vision.image_size=0", "model.vision.image_size"),
    ("model.vision.std=[0.2, 0.2]", "model.vision.std"),
    ("model.text.num_attention_heads=5", "model.text.num_attention_heads"),
    ("model.text.label_smoothing=1", "model.text.label_smoothing"),
    ("tokenizer.max_length=600", "tokenizer.max_length"),
    ("train.seed=-1", "train.seed"),
    ("train.run_name=../elsewhere", "train.run_name"),
    ("train.warmup_steps=2000", "train.warmup_steps"),
    ("data.source=", "data.source"),
])
def test_obviously_wrong_values_name_the_key(override: str, key: str) -> None:
    err = error_of(None, [override])
    assert err.key == key
    assert str(err).startswith(f"--set {override}: {key}: ")


def test_choice_errors_list_the_choices_and_a_near_one() -> None:
    message = str(error_of(None, ["train.mixed_precision=bf61"]))
    assert "no | bf16 | fp16" in message and "did you mean 'bf16'?" in message
    message = str(error_of(None, ["data.format=parket"]))
    assert all(f in message for f in DATA_FORMATS) and "did you mean 'parquet'?" in message


def test_a_relation_broken_by_a_set_blames_that_set(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "generate:\n  min_length: 5\n")
    err = error_of(path, ["generate.max_length=3"])
    assert err.key == "generate.min_length"
    assert str(err).startswith(f"--set generate.max_length=3 (on {path}): generate.min_length: must be <=")


def test_set_errors_name_the_set_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "train:\n  lr: 0.1\n")
    assert str(error_of(path, ["train.lr=abc"])).startswith(f"--set train.lr=abc (on {path}): train.lr: expected")
    # A bad value that came from the file is still blamed on the file.
    path = write(tmp_path / "d.yaml", "train:\n  batch_size: 0\n")
    assert str(error_of(path, ["train.lr=0.5"])).startswith(f"{path}: train.batch_size: must be > 0")


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=3", ".lr=3"])
def test_malformed_set(override: str) -> None:
    assert "expected KEY=VALUE" in str(error_of(None, [override]))


def test_set_value_that_is_not_yaml() -> None:
    err = error_of(None, ["train.trackers=[a, b"])
    assert err.key == "train.trackers" and "not valid YAML" in str(err)


def test_set_into_a_non_section() -> None:
    err = error_of(None, ["train.lr.x=1"])
    assert err.key == "train.lr" and "--set train.lr.x=1" in str(err)


# ---- how long to train: train.max_steps or train.epochs --------------------------------------------------------------


def test_epochs_in_a_file_replace_the_default_step_count(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "c.yaml", "train:\n  epochs: 2.5\n"))
    assert (cfg.train.epochs, cfg.train.max_steps) == (2.5, None)
    save_config(cfg, tmp_path / "saved.yaml")  # the run folder keeps epochs, with max_steps null
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["train"]["max_steps"] is None
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_a_set_length_replaces_the_files_other_length(tmp_path: Path) -> None:
    steps_file = write(tmp_path / "steps.yaml", "train:\n  max_steps: 300\n")
    epochs_file = write(tmp_path / "epochs.yaml", "train:\n  epochs: 3\n")
    cfg = load_config(steps_file, ["train.epochs=1.5"])
    assert (cfg.train.epochs, cfg.train.max_steps) == (1.5, None)
    cfg = load_config(epochs_file, ["train.max_steps=40"])
    assert (cfg.train.epochs, cfg.train.max_steps) == (None, 40)
    assert load_config(None, ["train.epochs=2"]).train.max_steps is None
    assert load_config(epochs_file, ["train.epochs=null"]).train.max_steps == 1000  # back to the default


@pytest.mark.parametrize(("yaml_text", "sets", "key", "where", "words"), [
    ("train:\n  max_steps: 5\n  epochs: 2\n", [], "train.epochs", "FILE", "not both"),
    ("", ["train.epochs=2", "train.max_steps=5"], "train.epochs", "--set train.max_steps=5", "not both"),
    ("train:\n  max_steps: null\n", [], "train.max_steps", "FILE", "so is train.epochs"),
    ("", ["train.max_steps=null"], "train.max_steps", "--set train.max_steps=null", "so is train.epochs"),
    ("data:\n  streaming: true\n", ["train.epochs=1"], "train.epochs", "--set train.epochs=1", "train.max_steps"),
    ("train:\n  epochs: 0\n", [], "train.epochs", "FILE", "must be > 0"),
])
def test_length_errors_name_both_keys(tmp_path: Path, yaml_text: str, sets: list[str], key: str, where: str,
                                      words: str) -> None:
    path = write(tmp_path / "c.yaml", yaml_text)
    err = error_of(path, sets)
    assert err.key == key
    assert str(err).startswith(where.replace("FILE", str(path))) and f": {key}: " in str(err)
    assert words in str(err)


def test_validation_keys() -> None:
    cfg = load_config(None)
    assert (cfg.data.val_split, cfg.data.eval_split, cfg.data.val_holdout) == ("val", "test", 0.01)
    assert load_config(None, ["data.val_split=null"]).data.val_split is None
    for bad in ("data.val_holdout=0", "data.val_holdout=1", "data.val_split= "):
        assert error_of(None, [bad]).key == bad.split("=")[0]


# ---- files -----------------------------------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert str(error_of(tmp_path / "nope.yaml")) == f"{tmp_path / 'nope.yaml'}: config file not found"
    assert "is a directory" in str(error_of(tmp_path))


def test_yaml_syntax_error_says_where(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "train:\n  lr: 0.1\n  batch_size: [8\n")
    message = str(error_of(path))
    assert message.startswith(f"{path}: invalid YAML (line 4, column 1: ")


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    # Plain PyYAML would keep the second lr silently.
    message = str(error_of(write(tmp_path / "c.yaml", "train:\n  lr: 0.1\n  lr: 0.2\n")))
    assert "duplicate key 'lr'" in message and "line 3" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    message = str(error_of(write(tmp_path / "c.yaml", "- train\n- lr\n")))
    assert message.startswith(f"{tmp_path / 'c.yaml'}: expected a mapping of sections")


def test_yaml_tags_that_build_objects_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "train: !!python/object/apply:os.system ['echo hacked']\n")
    assert "invalid YAML" in str(error_of(path))


# ---- saving and reloading --------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.lr=3e-4", "model.prompt=a photo of ", "train.trackers=[tensorboard]",
                             "model.vision.kwargs={depth: 2, embed_dim: 64}", "model.vision.mean=[0.1, 0.2, 0.3]",
                             "data.config_name=2017", "train.run_name=yes"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg


@pytest.mark.parametrize("text", ["a\x85b", "line\u2028sep", "two\nlines", "tab\there", " 'quoted' ", '"x"',
                                  "une photo de ", "图片", "yes", "null", "1e-5", "- item", "# not a comment"])
def test_awkward_strings_survive_saving(tmp_path: Path, text: str) -> None:
    cfg = Config()
    cfg.model.prompt = cfg.data.config_name = text
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_config_from_dict_validates_and_names_the_source() -> None:
    with pytest.raises(ConfigError, match=r"^runs/x/config.yaml: train.batch_size: must be > 0"):
        config_from_dict({"train": {"batch_size": 0}}, source="runs/x/config.yaml")
    with pytest.raises(ConfigError, match=r"did you mean 'train.lr'"):
        config_from_dict({"train": {"lrr": 1}}, source="runs/x/config.yaml")


# ---- the CLI ---------------------------------------------------------------------------------------------------------

runner = CliRunner()


def test_config_show_prints_the_resolved_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "train:\n  batch_size: 4\n")
    result = runner.invoke(app, ["config", "show", str(path), "--set", "train.lr=1e-5", "--set", "data.hflip=true"])
    assert result.exit_code == 0, result.output
    shown = write(tmp_path / "shown.yaml", result.stdout)
    assert load_config(shown) == load_config(path, ["train.lr=1e-5", "data.hflip=true"])
    assert yaml.safe_load(result.stdout)["train"]["lr"] == 1e-5


def test_config_show_without_a_file_prints_the_defaults() -> None:
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 0
    assert config_from_dict(yaml.safe_load(result.stdout)) == Config()


@pytest.mark.parametrize(("yaml_text", "sets", "needles"), [
    ("train:\n  lrr: 0.1\n", [], ["train.lrr", "did you mean 'train.lr'?"]),
    ("train:\n  batch_size: 0\n", [], ["train.batch_size", "must be > 0"]),
    ("train:\n  lr: 0.1\n", ["train.lr=abc"], ["--set train.lr=abc", "train.lr", "'abc'"]),
    ("train: [\n", [], ["invalid YAML"]),
])
def test_config_show_errors_are_one_line_and_exit_2(tmp_path: Path, yaml_text: str, sets: list[str],
                                                    needles: list[str]) -> None:
    path = write(tmp_path / "c.yaml", yaml_text)
    args = ["config", "show", str(path)] + [a for s in sets for a in ("--set", s)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], result.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def test_config_show_missing_file_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "show", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert result.stderr == f"error: {tmp_path / 'missing.yaml'}: config file not found\n"


# ---- properties ------------------------------------------------------------------------------------------------------

LEAF_TYPES = leaf_keys()
_name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
_fraction = st.floats(0.01, 0.99)
# Keys with rules that tie them to other keys or to a short list get values that are valid together.
_SPECIAL: dict[str, st.SearchStrategy[Any]] = {
    "data.format": st.sampled_from(DATA_FORMATS),
    "train.mixed_precision": st.sampled_from(MIXED_PRECISIONS),
    "model.vision.pos_embed_init": st.sampled_from(["timm", "sincos"]),
    "model.vision.stem": st.sampled_from(["patch", "conv"]),
    "model.text.hidden_size": st.sampled_from([96, 192, 768]),  # divisible by every head count below
    "model.text.num_attention_heads": st.sampled_from([1, 2, 4, 12]),
    "model.text.max_position_embeddings": st.integers(64, 4096),
    "tokenizer.max_length": st.integers(5, 64),
    "generate.max_length": st.integers(5, 64),
    "generate.min_length": st.integers(0, 5),
    "train.max_steps": st.integers(100, 10**7),
    "train.epochs": st.none(),  # exclusive with max_steps: tested on its own
    "train.warmup_steps": st.integers(0, 100),
    "train.run_name": st.none() | st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True),
    "model.vision.mean": st.none() | st.lists(_fraction, min_size=3, max_size=3),
    "model.vision.std": st.none() | st.lists(_fraction, min_size=3, max_size=3),
    "model.vision.kwargs": st.dictionaries(_name, st.integers(-5, 5) | _name | st.booleans(), max_size=3),
    "train.trackers": st.lists(st.sampled_from(["tensorboard", "wandb", "aim"]), max_size=3),
    "train.objective": st.just("xe"),  # scst needs model.init: tested in test_scst
    "train.scst.baseline": st.sampled_from(["mean", "greedy"]),
}


def _valid_value(tp: Any) -> st.SearchStrategy[Any]:
    args = typing.get_args(tp)
    if type(None) in args:
        (arm,) = (a for a in args if a is not type(None))
        return st.none() | _valid_value(arm)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(1, 10**6)
    if tp is float:  # inside every float rule (fractions, probabilities, positive numbers)
        return _fraction
    if tp is str:
        return st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20).filter(str.strip)
    raise NotImplementedError(f"no strategy for {tp}: add one to _SPECIAL")


VALID_VALUES = {key: _SPECIAL[key] if key in _SPECIAL else _valid_value(tp) for key, tp in LEAF_TYPES.items()}


def _set_text(key: str, value: Any) -> str | None:
    """How a user types `value` after `key=`; None when only the file can carry it unchanged."""
    tp = LEAF_TYPES[key]
    if isinstance(value, str):
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        nullable = type(None) in typing.get_args(tp)
        return None if quoted or (nullable and value in ("", "~", "null", "Null", "NULL")) else value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # "1e-05" included: the loader must turn it into a float
    return json.dumps(value)  # ints, lists and dicts: JSON is YAML flow syntax


@st.composite
def valid_overrides(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    keys = draw(st.lists(st.sampled_from(sorted(VALID_VALUES)), unique=True, max_size=12))
    chosen, in_file, sets = {}, {}, []
    for key in keys:
        chosen[key] = value = draw(VALID_VALUES[key])
        text = _set_text(key, value)
        if text is not None and draw(st.booleans()):
            sets.append(f"{key}={text}")
        else:
            in_file[key] = value
    return chosen, in_file, sets


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(valid_overrides())
def test_property_valid_overrides_load_and_round_trip(tmp_path: Path, case: tuple) -> None:
    chosen, in_file, sets = case
    # escaped input: PyYAML writes U+0085 raw with allow_unicode and reads it back as a space
    path = write(tmp_path / "c.yaml", yaml.safe_dump(nested(in_file)))
    cfg = load_config(path, sets)
    defaults = Config()
    for key in LEAF_TYPES:
        assert get(cfg, key) == chosen.get(key, get(defaults, key)), key
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


_SECTIONS = [""] + [k.rsplit(".", 1)[0] + "." for k in LEAF_TYPES if "." in k]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(sorted(set(_SECTIONS))), name=_name,
       value=st.none() | st.booleans() | st.integers() | st.text(string.printable), via_set=st.booleans())
def test_property_junk_keys_are_always_rejected(tmp_path: Path, section: str, name: str, value: Any,
                                                via_set: bool) -> None:
    key = section + name
    assume(key not in LEAF_TYPES and not any(k.startswith(key + ".") for k in LEAF_TYPES))  # not a real key
    path = write(tmp_path / "c.yaml", "" if via_set else yaml.safe_dump(nested({key: value})))
    err = error_of(path, [f"{key}={json.dumps(value)}"] if via_set else [])
    assert err.key == key
    assert f": {key}: unknown key" in str(err) and str(path if not via_set else key) in str(err)


_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(LEAF_TYPES)), value=_junk)
def test_property_any_value_loads_or_fails_naming_its_key(tmp_path: Path, key: str, value: Any) -> None:
    """Whatever a file holds at a key, the loader accepts it or raises ConfigError naming that key."""
    path = write(tmp_path / "c.yaml", yaml.safe_dump(nested({key: value})))
    try:
        cfg = load_config(path)
    except ConfigError as err:
        assert "\n" not in str(err) and str(path) in str(err)
        assert key in str(err), str(err)
    else:
        assert load_config(path) == cfg
        save_config(cfg, tmp_path / "saved.yaml")
        assert load_config(tmp_path / "saved.yaml") == cfg


def test_line_break_characters_survive_the_round_trip(tmp_path):
    # found by hypothesis: PyYAML writes U+0085 raw with allow_unicode and reads it back as a space
    cfg = load_config(None, ["data.caption_column=0\x85", "model.prompt=une photo de \u2028é "])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.data.caption_column == "0\x85"
    assert again.model.prompt == "une photo de \u2028é "


# ---- constraints declared beside their fields ------------------------------------------------------------------------


def test_a_choice_reads_yaml_words_as_text_and_lists_the_choices(tmp_path: Path) -> None:
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # not YAML's false
    assert load_config(None, ["train.mixed_precision=null"]).train.mixed_precision is None
    err = error_of(write(tmp_path / "c.yaml", "train:\n  mixed_precision: no\n"))  # YAML reads false
    assert err.key == "train.mixed_precision" and "quote it" in str(err) and "'bf16'" in str(err)
    err = error_of(write(tmp_path / "d.yaml", "model:\n  vision:\n    stem: [conv]\n"))
    assert err.key == "model.vision.stem" and "one of 'patch', 'conv'" in str(err)
    message = str(error_of(None, ["model.vision.pos_embed_init=sincoss"]))
    assert "must be one of timm | sincos, got 'sincoss'; did you mean 'sincos'?" in message


@dataclasses.dataclass
class Inner:
    size: int = positive(3)
    mode: typing.Literal["a", "b"] = "a"


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    rate: float = positive(0.5)


def test_the_loader_reads_any_dataclass_with_its_field_rules(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "inner:\n  size: 4\n")
    data, where = read_layers(Outer, path, ["rate=2e-3", "inner.mode=b"])
    assert build(Outer, data, where) == Outer(Inner(4, "b"), 2e-3)
    for sets, key, words in [(["inner.size=0"], "inner.size", "must be > 0, got 0"),
                             (["inner.mode=c"], "inner.mode", "must be one of a | b"),
                             (["inner.sise=5"], "inner.sise", "did you mean 'inner.size'?"),
                             (["size=5"], "size", "did you mean 'inner.size'?")]:
        data, where = read_layers(Outer, path, sets)
        with pytest.raises(ConfigError) as info:
            build(Outer, data, where)
        assert info.value.key == key and str(info.value).startswith(f"--set {sets[0]} (on {path}): {key}: ")
        assert words in str(info.value)
