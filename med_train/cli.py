"""The `med` command line. Each command parses its arguments and calls one plain function.

Heavy libraries (torch, transformers, datasets) are imported inside the commands so that `med --help` is instant.

    med train configs/shapes.yaml --set train.lr=3e-4
    med eval --model runs/latest
    med caption photo.jpg --model runs/latest
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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


# ---- med data ... -------------------------------------------------------------------------------------------------


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
    from med_train.model import convert_blip as convert

    try:
        convert(checkpoint, out_dir, tokenizer=tokenizer, image_size=image_size)
    except (ValueError, OSError) as err:
        _fail(str(err))
    typer.echo(f"wrote {out_dir}")


@export_app.command("hf")
def export_hf(
    model_dir: Annotated[Path, typer.Argument(help="A med_train model directory or run folder.")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the transformers BLIP directory.")],
):
    """Write a directory that transformers' BlipForConditionalGeneration and BlipProcessor load."""
    from med_train.model import Captioner
    from med_train.model import export_hf as export

    try:
        export(Captioner.from_pretrained(model_dir), out_dir)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(f"wrote {out_dir}")


if __name__ == "__main__":
    app()
