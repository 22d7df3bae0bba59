"""The `med` command line. Each command parses its arguments and calls one plain function.

Heavy libraries (torch, transformers, datasets) are imported inside the commands so that `med --help` is instant.

    med train configs/shapes.yaml --set train.lr=3e-4
    med eval --model runs/latest
    med caption photo.jpg --model runs/latest
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
import typer.core

from med_train.config import Config, ConfigError, config_to_yaml, load_config

app = typer.Typer(help="Train, evaluate and run BLIP-style image captioners.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
data_app = typer.Typer(help="Build, pack and check image-caption datasets.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
convert_app = typer.Typer(help="Import checkpoints from other formats.", no_args_is_help=True)
export_app = typer.Typer(help="Export a model to other formats.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(convert_app, name="convert")
app.add_typer(export_app, name="export")


def _print_version(value: bool) -> None:
    if value:
        from med_train import __version__

        typer.echo(f"med_train {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """Train, evaluate and run BLIP-style image captioners."""
    try:
        from med_train.fast.calibrate import forced
    except ImportError:  # the speed-only subpackage is optional
        return
    try:
        forced()  # a MED_FAST that is neither 0, 1 nor unset stops here, in one line
    except ValueError as err:
        _fail(str(err), 2)


# ---- med train / eval / caption -----------------------------------------------------------------------------------

ModelOption = Annotated[str | None, typer.Option("--model", help="A run folder or model directory "
                                                                   "(default: runs/latest).")]
DeviceOption = Annotated[str | None, typer.Option(
    help="cpu, cuda or cuda:N (default: cuda when there is one; under accelerate launch, each process's own).")]
PrecisionOption = Annotated[Literal["no", "bf16", "fp16", "fp32", "int8"], typer.Option(
    help="Autocast, as train.mixed_precision: no, bf16 or fp16 (fp32: the same as no). bf16 captions about 1.5x "
         "faster on a GPU or a CPU with bf16 instructions; a device that cannot run the one asked is refused. "
         "int8 (CPU only): the Linear layers with int8 weights and activations, about 2x faster there; about one "
         "caption in ten changes.")]
QuietOption = Annotated[bool, typer.Option(help="No progress bar.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout; tables, notes and "
                                                         "progress go to stderr.")]


def _check_model_name(cfg: Config, source: str) -> None:
    """An unknown timm name, or one that is not a ViT, is a config error: caught before data or weights are
    touched. The model is built on the meta device (no memory, no weights) to see its class."""
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer

    name = cfg.model.vision.name
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        _fail(f"{source}: model.vision.name: unknown timm model {name!r}"
              + (f"; did you mean one of {close}?" if close else ""), 2)
    with torch.device("meta"):
        vit = timm.create_model(name, pretrained=False, num_classes=0)
        if not isinstance(vit, VisionTransformer):
            _fail(f"{source}: model.vision.name: {name!r} is a timm {type(vit).__name__}, not a ViT; the "
                  "captioner takes timm's VisionTransformer family (vit_*, deit_*, e.g. vit_base_patch16_224)", 2)
        try:
            timm.create_model(name, pretrained=False, num_classes=0, img_size=cfg.model.vision.image_size,
                              **cfg.model.vision.kwargs)
        except (TypeError, ValueError, AssertionError) as err:  # an argument the ViT does not take or fit
            _fail(f"{source}: model.vision.kwargs: {err}", 2)


def _device(device: str | None):
    """The torch device `--device` names (default: cuda when there is one), or a usage error."""
    import torch

    try:
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise typer.BadParameter(str(err), param_hint="--device") from None
    if target.type not in ("cpu", "cuda"):
        raise typer.BadParameter(f"must be cpu, cuda or cuda:N, got {device!r}", param_hint="--device")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device is available", param_hint="--device")
    return target


def _check_precision(device, precision: str) -> str:
    """"no", "bf16" or "fp16" ("fp32" is "no"), after a one-line error (exit 2) where the device cannot run it."""
    from med_train.evaluate import precision_problem

    problem = precision_problem(device, precision)
    if problem:
        _fail(f"--precision {precision}: {problem}", 2)
    return "no" if precision == "fp32" else precision


def _to_device(captioner, device, precision: str) -> None:
    """The captioner loaded for `med eval` or `med caption` on `device`, its Linear layers in int8 for "int8"."""
    captioner.to(device)
    if precision == "int8":
        from med_train.int8 import quantize

        quantize(captioner)


def _positive(value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise typer.BadParameter(f"must be > 0, got {value}")
    return value


# Generation options of `med eval` and `med caption`; each sets a generate.* key of the run's config.
BeamsOption = Annotated[int | None, typer.Option("--beams", min=1, help="Beam size (default: generate.num_beams).")]
SampleOption = Annotated[bool | None, typer.Option(
    "--sample/--no-sample", help="Nucleus sampling instead of beam search (default: generate.do_sample). Turned on "
                                 "here, BLIP's nucleus recipe: top-p generate.top_p (0.9) and repetition penalty "
                                 "1.1 (unless --repetition-penalty).")]
TopPOption = Annotated[float | None, typer.Option(min=0.0, max=1.0, callback=_positive,
                                                  help="Sampling: the nucleus's probability (default: generate.top_p).")]
TopKOption = Annotated[int | None, typer.Option(min=0, help="Sampling: only the K likeliest tokens, 0: no limit "
                                                             "(default: generate.top_k).")]
TemperatureOption = Annotated[float | None, typer.Option(callback=_positive, help="Sampling: logits divided by "
                                                                                   "this (default: generate.temperature).")]
RepetitionPenaltyOption = Annotated[float | None, typer.Option(callback=_positive, help=(
    "Divides the scores of tokens already in the caption; 1: none (default: generate.repetition_penalty)."))]
MaxLengthOption = Annotated[int | None, typer.Option(min=1, help="Most tokens per caption, prompt included "
                                                                 "(default: generate.max_length).")]
MinLengthOption = Annotated[int | None, typer.Option(min=0, help="Fewest tokens per caption, prompt included "
                                                                 "(default: generate.min_length).")]
SeedOption = Annotated[int | None, typer.Option(help="Sampling: the random seed (default: train.seed).")]
# BLIP's nucleus sampling recipe: top-p 0.9 (generate.top_p's default) with this repetition penalty
SAMPLING_REPETITION_PENALTY = 1.1
# The generation options' parameters, and the generate.* key each one sets
_GENERATE_KEYS = {"beams": "num_beams", "sample": "do_sample", "top_p": "top_p", "top_k": "top_k",
                  "temperature": "temperature", "repetition_penalty": "repetition_penalty",
                  "max_length": "max_length", "min_length": "min_length"}


def _apply_generate_options(cfg: Config, params: dict[str, object]) -> None:
    """Write the generation options given into cfg.generate (`params`: the command's parameters by name, None where
    not given); options that conflict, or that the decoding does not use, are a one-line error (exit 2)."""
    g = cfg.generate
    given = {"--" + name.replace("_", "-"): params[name] for name in (*_GENERATE_KEYS, "seed")
             if params[name] is not None}
    sampling = given.get("--sample", g.do_sample)
    if sampling and given.get("--beams", 1) > 1:
        why = "--sample" if "--sample" in given else "the run samples (generate.do_sample); add --no-sample"
        _fail(f"--beams {given['--beams']} conflicts with {why}: sampling draws one caption per image", 2)
    unused = [k for k in ("--top-p", "--top-k", "--temperature", "--seed") if k in given and not sampling]
    if unused:
        _fail(f"{unused[0]} applies to sampling only: add --sample", 2)
    if given.get("--sample") and not g.do_sample:
        g.repetition_penalty = SAMPLING_REPETITION_PENALTY
    for name, key in _GENERATE_KEYS.items():
        if params[name] is not None:
            setattr(g, key, params[name])
    cfg.train.seed = given.get("--seed", cfg.train.seed)  # sampling's generator starts from it
    if g.min_length > g.max_length:
        _fail(f"--min-length {g.min_length} is over --max-length {g.max_length} (given, or the run's "
              "generate.min_length/max_length)", 2)


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def _progress(quiet: bool, unit: str = "img", total: int | None = None):
    """A progress bar on stderr with the rate and time left; off with --quiet or when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, disable=quiet or not _stderr_is_terminal(),
                dynamic_ncols=True, leave=False)


class _TrainCommand(typer.core.TyperCommand):
    """`--resume=RUN` reads as `--resume RUN`: --resume is a flag (so that it may come last, or before another
    option), and the run folder, when given, is the positional argument."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        split = []
        for arg in args:
            split += ["--resume", arg.removeprefix("--resume=")] if arg.startswith("--resume=") else [arg]
        return super().parse_args(ctx, split)


@app.command("train", cls=_TrainCommand)
def train_command(
    target: Annotated[Path | None, typer.Argument(
        metavar="CONFIG|RUN", help="A YAML config; with --resume, the run folder to continue "
                                       "(default: runs/latest).")] = None,
    sets: SetOption = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue a stopped run from its last checkpoint: `--resume [RUN]`, in any order.")] = False,
    output_dir: Annotated[Path | None, typer.Option(help="Where run folders go (train.output_dir).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar; log lines only.")] = False,
    processes: Annotated[int | None, typer.Option(
        min=1, help="Train in N processes on this machine (torchrun's launcher; a signal stops them as one).")] = None,
) -> None:
    """Train a captioner; writes a self-describing run folder and points runs/latest at it."""
    from med_train import launch
    from med_train.run_folder import resolve_run

    config = run_dir = None
    is_run = target is not None and (target / "config.yaml").is_file()
    if resume:
        latest = Path(output_dir or "runs") / "latest"
        if target is None and not latest.exists():
            _fail(f"nothing to resume: no {latest}; give the run folder, e.g. `med train --resume runs/NAME`", 2)
        if target is not None and not is_run:
            what = "not a run folder (no config.yaml in it)" if target.exists() else "no such run folder"
            _fail(f"{target}: {what}: give the folder of the run to continue, or nothing for {latest}", 2)
        run_dir = resolve_run(target, latest.parent)
        cfg = _load_config_or_exit(run_dir / "config.yaml", sets)
    elif is_run:
        _fail(f"{target} is a run folder: add --resume to continue it", 2)
    elif target is None:
        _fail("give a config file (e.g. configs/shapes.yaml) or --resume [RUN_DIR]", 2)
    else:
        config = target
        cfg = _load_config_or_exit(config, sets)
    if output_dir is not None and run_dir is None:
        cfg.train.output_dir = str(output_dir)
    cfg.train.quiet = cfg.train.quiet or quiet
    _check_model_name(cfg, str(config or run_dir / "config.yaml"))
    if processes is not None and processes > 1:  # the config is known good: each process reads it again
        if launch.inside_launcher():
            _fail("--processes starts the processes itself: drop it under torchrun or accelerate launch", 2)
        args = [str(run_dir if resume else target), *(["--resume"] if resume else []),
                *[arg for setting in sets or [] for arg in ("--set", setting)],
                *(["--output-dir", str(output_dir)] if output_dir is not None else []), *(["--quiet"] if quiet else [])]
        raise typer.Exit(launch.run(processes, args))

    from med_train.run_folder import BadFileError
    from med_train.sources import DataError
    from med_train.train import TrainingError, train

    try:
        run_dir = train(cfg, config_path=config, resume=run_dir)
    except (TrainingError, DataError, BadFileError) as err:  # BadFileError: a damaged checkpoint or weights file
        _fail(str(err))
    except ConfigError as err:  # model.init that cannot be read or does not fit
        _fail(f"{config or run_dir / 'config.yaml'}: {err}", 2)
    typer.echo(f"run folder: {run_dir}")


@app.command("eval")
def eval_command(
    model: ModelOption = None,
    split: Annotated[str | None, typer.Option(help="The held-out split (default: data.eval_split).")] = None,
    max_images: Annotated[int | None, typer.Option(help="Score only the first N images.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch (default: generate.batch_size).")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Output folder (default: RUN/eval-SPLIT).")] = None,
    out: Annotated[Path | None, typer.Option(hidden=True, help="Old name of --output-dir.")] = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    device: DeviceOption = None,
    precision: PrecisionOption = "no",
    sets: SetOption = None,
    beams: BeamsOption = None,
    sample: SampleOption = None,
    top_p: TopPOption = None,
    top_k: TopKOption = None,
    temperature: TemperatureOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    max_length: MaxLengthOption = None,
    min_length: MinLengthOption = None,
    seed: SeedOption = None,
) -> None:
    """Caption a held-out split and score it: BLEU-1..4, METEOR (with Java), ROUGE-L, CIDEr (+ content scores on
    the shapes set). Writes metrics.json, predictions.json and gallery.html. Decoding: the run's generate.*, or
    the options below."""
    import json
    import os

    from med_train.evaluate import evaluate

    if out is not None:
        typer.echo("note: --out is now --output-dir", err=True)
    target = _device(device)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and target.index is not None:
        raise typer.BadParameter("each process of a launch runs on its own device: give cpu or cuda",
                                 param_hint="--device")
    precision = _check_precision(target, precision)
    run_dir, (captioner, cfg) = _load_run_or_exit(model, sets)
    _apply_generate_options(cfg, locals())
    accelerator = None
    if launched:  # each process scores its share of the images
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=target.type == "cpu")
        target = accelerator.device
    _to_device(captioner, target, precision)
    split = split or cfg.data.eval_split
    out_dir = output_dir or out or run_dir / f"eval-{split}"
    main_process = accelerator is None or accelerator.is_main_process
    from med_train.sources import DataError

    try:
        with _progress(quiet or not main_process, total=max_images) as bar:
            scores = evaluate(captioner, cfg, split=split, max_images=max_images, batch_size=batch_size,
                              accelerator=accelerator, out_dir=out_dir, precision=precision, progress=bar)
    except DataError as exc:
        _fail(str(exc))
    if not main_process:
        return
    _print_scores(scores, err=json_output)
    typer.echo(f"wrote {out_dir}/metrics.json, predictions.json, gallery.html", err=json_output)
    if json_output:
        typer.echo(json.dumps(scores))


def _load_run_or_exit(model: str | None, sets: list[str] | None):
    """(run folder, (captioner, config)) for `--model` with `--set` overrides, or a one-line error: exit 2 for a
    missing folder or a bad override, 1 for a file in it that cannot be used."""
    from med_train.evaluate import load_run
    from med_train.run_folder import BadFileError, resolve_run

    try:
        run_dir = resolve_run(model)
        return run_dir, load_run(run_dir, overrides=sets or ())
    except (FileNotFoundError, ConfigError) as err:
        _fail(str(err), 2)
    except BadFileError as err:
        _fail(str(err))


def _print_scores(scores: dict, err: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="scores")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in scores.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console(stderr=err).print(table)


@app.command("caption")
def caption_command(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    model: ModelOption = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch (default: generate.batch_size).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help=(
        'Print one JSON array on stdout, an {"image", "caption", "error"} object per file in input order (error: '
        "null, or why the file was not captioned); errors and progress go to stderr."))] = False,
    quiet: QuietOption = False,
    device: DeviceOption = None,
    precision: PrecisionOption = "no",
    sets: SetOption = None,
    beams: BeamsOption = None,
    sample: SampleOption = None,
    top_p: TopPOption = None,
    top_k: TopKOption = None,
    temperature: TemperatureOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    max_length: MaxLengthOption = None,
    min_length: MinLengthOption = None,
    seed: SeedOption = None,
) -> None:
    """Print a caption for each image (`path<TAB>caption`). Unreadable files get an error line; the others are
    still captioned, and the exit code is then 1. Decoding: the run's generate.*, or the options below."""
    import json

    import torch

    from med_train.evaluate import caption_files, expand_image_paths, generate_kwargs

    target = _device(device)
    precision = _check_precision(target, precision)
    _, (captioner, cfg) = _load_run_or_exit(model, sets)
    _apply_generate_options(cfg, locals())
    _to_device(captioner, target, precision)
    kwargs = generate_kwargs(cfg)
    if cfg.generate.do_sample:
        kwargs["generator"] = torch.Generator(device=target).manual_seed(cfg.train.seed)
    paths = expand_image_paths(images)
    if not paths:
        _fail(f"no images found in {' '.join(images)}", 2)
    results = []
    with _progress(quiet or len(paths) < 2, total=len(paths)) as bar:
        for path, caption, error in caption_files(captioner, paths, batch_size=batch_size or cfg.generate.batch_size,
                                                  precision=precision, max_pixels=cfg.data.max_image_pixels,
                                                  **kwargs):
            bar.update()
            results.append({"image": path, "caption": caption, "error": error})
            if error is not None:
                bar.write(f"error: {path}: {error}", file=sys.stderr)
            elif not json_output:
                bar.write(f"{path}\t{caption}", file=sys.stdout)
    if json_output:
        typer.echo(json.dumps(results, indent=1))
    if any(r["error"] is not None for r in results):
        raise typer.Exit(code=1)


@app.command("race")
def race_command(
    config: Annotated[Path, typer.Argument(help="A config with a shapes-like data source (e.g. configs/shapes.yaml).")],
    budget: Annotated[float, typer.Option(help="Training seconds for each model.")] = 600.0,
    eval_every: Annotated[float, typer.Option(help="Evaluate every this many training seconds.")] = 120.0,
    eval_images: Annotated[int, typer.Option(help="Held-out images per evaluation.")] = 200,
    json_output: JsonOption = False,
    json_out: Annotated[Path | None, typer.Option(help="Also write the results to this JSON file.")] = None,
    sets: SetOption = None,
) -> None:
    """Time to quality: med_train against transformers' BLIP with the same sizes, recipe, batches and budget."""
    cfg = _load_config_or_exit(config, sets)
    _check_model_name(cfg, str(config))
    from med_train.race import format_race, race, write_race

    try:
        results = race(cfg, budget_s=budget, eval_every_s=eval_every, eval_images=eval_images,
                       say=functools.partial(typer.echo, err=json_output))
    except ValueError as err:
        _fail(str(err), 2)
    typer.echo(format_race(results), err=json_output)
    if json_out is not None:
        write_race(results, json_out)
    if json_output:
        import json

        typer.echo(json.dumps(results))


# ---- med data ... -------------------------------------------------------------------------------------------------

SourceArgument = Annotated[str, typer.Argument(
    help="A YAML config (its data section), or a data source: hub id, folder, .json annotations, .tar/.parquet.")]


def _data_config(source_or_config: str, sets: list[str] | None) -> tuple[Config, bool]:
    """(config, whether it came from a YAML file): the file's, or the defaults with data.source = the source."""
    path = Path(source_or_config)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return _load_config_or_exit(path, sets), True
    cfg = _load_config_or_exit(None, sets)
    cfg.data.source = source_or_config
    return cfg, False


@data_app.command("shapes")
def data_shapes(
    out: Annotated[Path, typer.Argument(help="Folder to write (OUT/train, OUT/val, OUT/test).")],
    train: Annotated[int, typer.Option(help="Training images.", min=1)] = 5000,
    val: Annotated[int, typer.Option(help="Validation images (5 reference captions each); 0: none, training "
                                          "then holds out data.val_holdout of its images.", min=0)] = 200,
    test: Annotated[int, typer.Option(help="Test images (5 reference captions each).", min=1)] = 200,
    seed: Annotated[int, typer.Option(help="Same seed, same files.")] = 0,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 96,
) -> None:
    """Write the shapes demo set: 1-3 coloured shapes at five places, captions saying what and where."""
    from med_train.shapes import generate

    generate(out, train=train, val=val, test=test, seed=seed, image_size=image_size)
    typer.echo(f"wrote {train} training, {val} validation and {test} test images to {out}")


@data_app.command("check")
def data_check(
    source_or_config: SourceArgument,
    split: Annotated[str | None, typer.Option(help="Split to read (default: data.train_split).")] = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer (hub name or folder) for the coverage check; "
                                                       "default: the config's, or one trained on the captions.")] = None,
    limit: Annotated[int | None, typer.Option(help="Read at most this many rows.")] = None,
    sets: SetOption = None,
) -> None:
    """Read a split and report rows, bad rows by reason, caption lengths, tokenizer coverage and images/s."""
    import json

    from med_train.data import check
    from med_train.sources import DataError
    from med_train.tokenizer import load_tokenizer

    cfg, from_file = _data_config(source_or_config, sets)
    tok, tokenizer_error = None, None
    name = tokenizer or (cfg.tokenizer.name if from_file and cfg.tokenizer.name != "train" else None)
    if name:
        try:
            tok = load_tokenizer(name)
        except (OSError, ValueError) as exc:  # e.g. a hub tokenizer while offline: report, train one instead
            tokenizer_error = f"cannot load tokenizer {name!r}: {exc}"
    try:
        with _progress(quiet, unit="row", total=limit) as bar:
            report = check(cfg.data, split or cfg.data.train_split, tokenizer=tok,
                           image_size=cfg.model.vision.image_size, prompt=cfg.model.prompt,
                           max_length=cfg.tokenizer.max_length, limit=limit, vocab_size=cfg.tokenizer.vocab_size,
                           progress=bar)
    except DataError as exc:
        _fail(str(exc))
    if tokenizer_error:
        report["tokenizer_error"] = tokenizer_error
    say = functools.partial(typer.echo, err=json_output)  # with --json, stdout holds the document alone
    say(f"{report['source']} [{report['split']}] ({report['format']}): {report['rows']} rows, "
        f"{report['ok']} ok, {report['bad']} bad {report['bad_reasons'] or ''}")
    for example in report["examples"][:10]:
        say(f"  bad row {example['id']}: {example['reason']} ({example['detail']})")
    words = report["words"]
    if words:
        say(f"{report['images']} images, {report['captions']} captions of {words['mean']} words "
            f"(min {words['min']}, p95 {words['p95']}, max {words['max']}), vocabulary {report['vocabulary']}")
        tokens = report["tokens"]
        say(f"tokenizer ({report['tokenizer']}): unknown-token rate {report['unk_rate']:.2%}, "
            f"{tokens['mean']} tokens with the prompt (p95 {tokens['p95']}), "
            f"{report['truncated_fraction']:.1%} over max_length {cfg.tokenizer.max_length}")
        say(f"{report['truncated']} of {report['captions']} captions truncated: {report['over_max_words']} over "
            f"data.max_words ({cfg.data.max_words} words), {report['over_max_length']} over tokenizer.max_length "
            f"({cfg.tokenizer.max_length} tokens with the prompt)")
    if tokenizer_error:
        say(tokenizer_error)
    say(f"decode + transform: {report['images_per_s']} images/s")
    if json_output:
        typer.echo(json.dumps(report))


@data_app.command("pack")
def data_pack(
    source_or_config: SourceArgument,
    out: Annotated[Path, typer.Argument(help="Folder to write: OUT/<split>/<split>-00000.tar|parquet.")],
    format: Annotated[str, typer.Option("--format", help="webdataset | parquet")] = "webdataset",
    shard_size: Annotated[int, typer.Option(help="Rows per shard.")] = 1000,
    split: Annotated[list[str] | None, typer.Option(help="Split to pack (repeatable; default: the train, val "
                                                         "and eval splits the source has).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the training split's shuffle.")] = 0,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    sets: SetOption = None,
) -> None:
    """Rewrite a source as shards for fast parallel streaming (one row per image, bad rows left out)."""
    import json

    from med_train.sources import DataError, pack

    if format not in ("webdataset", "parquet"):
        raise typer.BadParameter(f"must be webdataset or parquet, got {format!r}", param_hint="--format")
    cfg, _ = _data_config(source_or_config, sets)
    try:
        with _progress(quiet, unit="row") as bar:
            stats = pack(cfg.data, out, fmt=format, shard_size=shard_size, splits=split, seed=seed, progress=bar)
    except DataError as exc:
        _fail(str(exc))
    for name, split_stats in stats.items():
        typer.echo(f"{name}: {split_stats.summary()} -> {out / name}", err=json_output)
    if json_output:
        typer.echo(json.dumps({name: {**s.to_dict(), "folder": str(out / name)} for name, s in stats.items()}))


# ---- med config ... -----------------------------------------------------------------------------------------------

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Override a config key, e.g. --set train.lr=3e-4 (repeatable)."),
]


def _load_config_or_exit(path: Path | None, sets: list[str] | None) -> Config:
    """The resolved config, or a one-line `error: ...` on stderr and exit code 2 (a usage error) before heavy work."""
    try:
        return load_config(path, sets or ())
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None


@config_app.command("show")
def config_show(
    config: Annotated[Path | None, typer.Argument(help="A YAML config; without it, the defaults.")] = None,
    sets: SetOption = None,
) -> None:
    """Print the resolved configuration (defaults, then CONFIG, then each --set) as YAML."""
    typer.echo(config_to_yaml(_load_config_or_exit(config, sets)), nl=False)


# ---- med convert / export ------------------------------------------------------------------------------------------


def _fail(message: str, code: int = 1):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@convert_app.command("blip")
def convert_blip(
    checkpoint: Annotated[Path, typer.Argument(help="A released BLIP caption checkpoint (.pth).")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the med_train model directory.")],
    tokenizer: Annotated[str, typer.Option(help="BERT tokenizer: hub name or local directory.")] = "bert-base-uncased",
    image_size: Annotated[int | None, typer.Option(help="Image size; position embeddings are resized.")] = None,
):
    """Import a released BLIP caption checkpoint (read with torch.load(weights_only=True); no code runs)."""
    if not checkpoint.is_file():
        _fail(f"{checkpoint}: no such file", 2)
    from med_train.convert import convert_blip as convert

    try:
        convert(checkpoint, out_dir, tokenizer=tokenizer, image_size=image_size)
    except (ValueError, OSError) as err:
        _fail(str(err))
    typer.echo(f"wrote {out_dir}")


@convert_app.command("hf")
def convert_hf(
    source: Annotated[str, typer.Argument(help="A transformers BlipForConditionalGeneration: hub id or local "
                                               "folder (with its processor and tokenizer).")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the med_train model directory.")],
    prompt: Annotated[str, typer.Option(help="Text every caption starts with, after [DEC]. Default: none, "
                                             "transformers' own behaviour (start from [DEC] alone). BLIP's caption "
                                             "fine-tunes (Salesforce/blip-image-captioning-*) used 'a picture of '.")
                      ] = "",
):
    """Import a transformers BLIP captioner: its weights (the ViT in timm's names), sizes, tokenizer and image
    size/mean/std."""
    from med_train.convert import convert_hf as convert

    try:
        convert(source, out_dir, prompt=prompt)
    except (ValueError, OSError) as err:
        _fail(str(err))
    typer.echo(f"wrote {out_dir}")


@export_app.command("hf")
def export_hf(
    model_dir: Annotated[Path, typer.Argument(help="A run folder (its best model when it has one, else its last) "
                                                   "or a med_train model directory.")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the transformers BLIP directory.")],
    push_to_hub: Annotated[str | None, typer.Option(metavar="REPO", help="Then publish it as this hub model "
                                                    "repository (user/name; the token from HF_TOKEN or `hf auth "
                                                    "login`).")] = None,
    private: Annotated[bool, typer.Option(help="With --push-to-hub: create the repository private.")] = False,
):
    """Write a directory that transformers' BlipForConditionalGeneration and BlipProcessor load, with the run's
    decoding settings (generation_config.json) and a model card (README.md) whose snippet gives `med caption`'s
    captions."""
    from med_train.export import export_run
    from med_train.export import push_to_hub as push

    try:
        export_run(model_dir, out_dir, model_id=push_to_hub)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(f"wrote {out_dir}")
    if push_to_hub:
        try:
            url = push(out_dir, push_to_hub, private=private)
        except Exception as err:  # noqa: BLE001 - network, token and hub errors alike: one line, not a traceback
            _fail(f"--push-to-hub {push_to_hub}: {' '.join(str(err).split()) or type(err).__name__}")
        typer.echo(f"pushed to {url}")


# ---- med bench -----------------------------------------------------------------------------------------------------

@app.command("bench")
def bench_command(
    config: Annotated[Path | None, typer.Option(help="Take the model sizes and data from this config (default: "
                                                     "ViT-B/16 + BERT-base on a generated shapes set).")] = None,
    device: Annotated[Literal["cpu", "cuda"], typer.Option(help="Where both sides run.")] = "cpu",
    json_output: JsonOption = False,
    json_out: Annotated[Path | None, typer.Option(help="Also write the figures to this JSON file.")] = None,
    quick: Annotated[bool, typer.Option(help="Tiny sizes and one repetition: a smoke run.")] = False,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch (default: 8 on cpu, 32 on cuda).")] = None,
    reps: Annotated[int | None, typer.Option(help="Timed repetitions per side (default: 3; --quick: 1).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's); 1 is steadier on a "
                                                     "machine shared with other jobs.")] = None,
    workers: Annotated[int | None, typer.Option(help="Data-pipeline workers (default: the config's; with "
                                                     "--device cuda and no config, BLIP's 8, at most one per "
                                                     "core).", min=0)] = None,
    compile: Annotated[bool, typer.Option("--compile", help="Run both training steps through torch.compile "
                                                            "(the compiling step is not timed).")] = False,
) -> None:
    """Measure med_train against transformers' BLIP (same shapes, weights and inputs, interleaved): training and
    captioning speed, memory, FLOPs against the matmul rate, data-pipeline headroom. Exit code 1 when the greedy
    captions differ."""
    import json

    if config is not None:  # a bad file fails here, before minutes of setup
        _check_model_name(_load_config_or_exit(config, None), str(config))
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device is available", param_hint="--device")
    from med_train.bench import BenchSettings, format_table, run_bench

    settings = BenchSettings.defaults(device, quick=quick)
    if config is not None and not quick:
        settings.image_size = settings.workers = settings.randaugment = None  # the config's
    if batch_size is not None:
        settings.batch_size = batch_size
    if reps is not None:
        settings.reps = reps
    settings.threads = threads
    settings.compile = compile
    if workers is not None:
        settings.workers = workers
    results = run_bench(settings, config, say=lambda message: typer.echo(f"bench: {message}", err=True))
    typer.echo(format_table(results), err=json_output)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2))
        typer.echo(f"wrote {json_out}", err=json_output)
    if json_output:
        typer.echo(json.dumps(results))
    if not results["greedy_captions_identical"]:
        _fail("greedy captions differ between med_train and transformers (see above)")


if __name__ == "__main__":
    app()
