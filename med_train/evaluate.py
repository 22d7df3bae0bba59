"""Evaluation and captioning: one function that scores a held-out split, used by training and `med eval` alike.

    scores = evaluate(model, cfg, split="test", num_beams=3, out_dir="runs/x/eval")
    # {"Bleu_1": ..., "Bleu_4": ..., "METEOR": ..., "ROUGE_L": ..., "CIDEr": ..., "content_exact": ... (shapes)}
    for path, caption, error in caption_files(model, ["a.jpg", "photos/"], batch_size=16): ...

`out_dir` receives metrics.json, predictions.json (COCO results format: image_id, caption) and gallery.html
(images with the predicted caption and the references, worst CIDEr first).
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from med_train.config import Config, load_config

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_run(path: str | Path, which: str = "best", overrides: Iterable[str] = ()):
    """(model, config) from a run folder (its best model when there is one, else the last) or a model
    directory. The config is the run's resolved config (or the defaults for a bare model directory), with
    `overrides` (`a.b=c`) applied."""
    from med_train.model import Captioner

    path = Path(path)
    model_dir = path / "best" if which == "best" and (path / "best").is_dir() else path
    model = Captioner.from_pretrained(model_dir).eval()
    config_file = path / "config.yaml"
    cfg = load_config(config_file if config_file.is_file() else None, list(overrides))
    cfg.model = model.cfg
    return model, cfg


def generate_kwargs(cfg: Config, num_beams: int | None = None) -> dict:
    """`model.generate`'s keyword arguments from cfg.generate (`num_beams`: instead of generate.num_beams)."""
    g = cfg.generate
    kwargs = dict(num_beams=num_beams or g.num_beams, max_length=g.max_length, min_length=g.min_length,
                  repetition_penalty=g.repetition_penalty, cuda_graphs=None if g.cuda_graphs else False)
    if g.do_sample:
        kwargs.update(do_sample=True, top_p=g.top_p, top_k=g.top_k, temperature=g.temperature, num_beams=1)
    else:
        kwargs["length_penalty"] = g.length_penalty
    return kwargs


AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def precision_autocast(device, precision: str | None):
    """Autocast on `device` in bf16 or fp16 for precision "bf16" or "fp16" (train.mixed_precision's names); a
    disabled one for "no", "fp32" or None."""
    import torch

    dtype = getattr(torch, AUTOCAST_DTYPES.get(precision, "float32"))
    return torch.autocast(device.type, dtype=dtype, enabled=precision in AUTOCAST_DTYPES)


def precision_problem(device, precision: str) -> str | None:
    """Why `device` cannot caption under `precision`, or None where it can. On the CPU both run in torch (bf16
    without oneDNN's bf16 products takes F.linear's path, see ops.ONEDNN_BF16); fp16 has no fast path there. int8
    runs on the CPU only (`int8.quantize`)."""
    import torch

    if precision == "int8":
        from med_train.int8 import int8_problem

        return int8_problem(device)

    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"{torch.cuda.get_device_name(device)} has no bf16 arithmetic (compute capability 8.0 or newer has): " \
               "use fp16"
    return None


def heldout_loader(model, cfg: Config, split: str, *, batch_size: int | None = None, accelerator=None,
                   holdout=None):
    """This process's share of a held-out split, one example per image (`holdout`: only those images of it)."""
    from med_train import data as data_lib

    device = accelerator.device if accelerator else model.device
    return data_lib.build_dataloader(
        cfg.data, split, train=False, batch_size=batch_size or cfg.generate.batch_size,
        image_size=model.cfg.vision.image_size, tokenizer=model.tokenizer,
        prompt=model.cfg.prompt, max_length=cfg.tokenizer.max_length, seed=cfg.train.seed,
        num_processes=accelerator.num_processes if accelerator else 1,
        process_index=accelerator.process_index if accelerator else 0, pin_memory=device.type == "cuda",
        holdout=holdout)


def evaluate(model, cfg: Config, *, split: str | None = None, num_beams: int | None = None,
             max_images: int | None = None, batch_size: int | None = None, accelerator=None,
             out_dir: str | Path | None = None, gallery_size: int = 50, quiet: bool = False,
             precision: str | None = None, loader=None, progress=None) -> dict:
    """Caption the held-out split (each image once, across processes when launched so) and score it. Precision:
    "no", "bf16" or "fp16" (autocast), "int8" (no autocast: a model `int8.quantize` made); None: the accelerator's
    mixed precision (what training runs with).
    `loader`: a `heldout_loader` built once by a caller that evaluates many times (training), instead of `split`.
    `progress`: a tqdm bar to advance by each batch's images. `quiet`: no note on stderr when METEOR is skipped."""
    import torch
    from accelerate.utils import gather_object

    from med_train.metrics import cider_per_image, meteor_available, score_captions

    num_processes = accelerator.num_processes if accelerator else 1
    process_index = accelerator.process_index if accelerator else 0
    device = accelerator.device if accelerator else model.device
    prepare_decoding(model, device)
    if loader is None:
        loader = heldout_loader(model, cfg, split or cfg.data.eval_split, batch_size=batch_size,
                                accelerator=accelerator)
    per_process = None if max_images is None else -(-max_images // num_processes)
    kwargs = generate_kwargs(cfg, num_beams)
    if kwargs.get("do_sample"):
        kwargs["generator"] = torch.Generator(device=device).manual_seed(cfg.train.seed + process_index)

    records, seen = [], 0
    was_training = model.training
    model.eval()
    autocast = accelerator.autocast() if precision is None and accelerator else precision_autocast(device, precision)
    with torch.no_grad(), autocast:
        for batch in loader:
            if per_process is not None and seen >= per_process:
                break
            captions = model.generate(batch["images"].to(device, non_blocking=True), **kwargs)
            for i, caption in enumerate(captions):
                record = {"id": batch["ids"][i], "caption": caption, "references": batch["references"][i]}
                if batch.get("objects") and batch["objects"][i] is not None:
                    record["objects"] = batch["objects"][i]
                if out_dir is not None:
                    record["thumbnail"] = _thumbnail(batch["images"][i])
                records.append(record)
            seen += len(captions)
            if progress is not None:
                progress.update(len(captions))
    model.train(was_training)
    if model.__dict__.get("fast_paths") is not None:  # a GPU's captured steps: their memory is training's
        from med_train.fast.graphs import release_captured_steps

        release_captured_steps(getattr(model, "text_decoder", model))
    if per_process is not None:
        records = records[:per_process]
    if num_processes > 1:
        records = gather_object(records)
    records = list({r["id"]: r for r in records}.values())[: max_images]  # one per image, bounded

    if accelerator is not None and not accelerator.is_main_process:
        return {}
    predictions = {r["id"]: r["caption"] for r in records}
    references = {r["id"]: r["references"] for r in records}
    scores = score_captions(predictions, references) if records else {}
    with_objects = [r for r in records if "objects" in r]
    if with_objects:  # rows without objects are left out of the content scores, and counted
        from med_train.shapes import score_content

        scores.update(score_content([r["caption"] for r in with_objects], [r["objects"] for r in with_objects]))
        if len(with_objects) < len(records):
            scores["content_images"] = len(with_objects)
    scores["images"] = len(records)
    meteor_ok, meteor_reason = meteor_available()
    if not meteor_ok and not quiet:
        print(f"METEOR skipped: {meteor_reason}", file=sys.stderr)
    if out_dir is not None:
        _write_outputs(Path(out_dir), scores, records, cider_per_image(predictions, references), gallery_size)
    return scores


def _thumbnail(image, size: int = 128) -> str:
    """A uint8 (3, H, W) image tensor as a small JPEG, base64 for the gallery page."""
    from PIL import Image

    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


def _image_id(key):
    return int(key) if isinstance(key, str) and key.isdigit() else key


def _write_outputs(out: Path, scores: dict, records: list, per_image: dict, gallery_size: int) -> None:
    from med_train.run_folder import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "metrics.json", json.dumps(scores, indent=2))
    atomic_write(out / "predictions.json", json.dumps(
        [{"image_id": _image_id(r["id"]), "caption": r["caption"]} for r in records], indent=1))
    worst = sorted(records, key=lambda r: per_image.get(r["id"], 0.0))[:gallery_size]
    rows = []
    for r in worst:
        refs = "".join(f"<li>{html.escape(ref)}</li>" for ref in r["references"])
        rows.append(f'<tr><td><img src="data:image/jpeg;base64,{r["thumbnail"]}"></td>'
                    f"<td><b>{html.escape(r['caption'])}</b><br><small>{html.escape(str(r['id']))} &middot; "
                    f"CIDEr {per_image.get(r['id'], 0.0):.3f}</small><ul>{refs}</ul></td></tr>")
    summary = " &middot; ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float))
    atomic_write(out / "gallery.html", (
        "<!doctype html><meta charset='utf-8'><title>med_train gallery</title>"
        "<style>body{font-family:sans-serif}td{vertical-align:top;padding:6px}</style>"
        f"<h1>Predictions, worst CIDEr first</h1><p>{summary}</p><table>{''.join(rows)}</table>"))


# ---- med caption -------------------------------------------------------------------------------------------------

def expand_image_paths(items: Iterable[str]) -> list[str]:
    """Files as given, folders' image files (sorted, recursive), and glob patterns."""
    import glob

    paths: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths.extend(str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in item for ch in "*?[") and not path.exists():
            paths.extend(sorted(glob.glob(item, recursive=True)))
        else:
            paths.append(item)  # missing files are reported when read
    return paths


def prepare_decoding(model, device) -> None:
    """Before the first batch: the fast paths for decoding on `device` (`fast.prepare`; on the CPU it builds the
    few-row kernel, compiled the first time on a machine, never inside a forward call), unless the model was
    prepared already (a training run's, which `train.fast` decided) or MED_FAST=0."""
    try:
        from med_train import fast
    except ImportError:  # the speed-only subpackage is optional: without it, plain PyTorch
        return
    fast.prepare(model, device, "decode")


def caption_files(model, paths: list[str], *, batch_size: int = 16, max_pixels: int | None = 89_478_485,
                  precision: str = "fp32", **kwargs) -> Iterator[tuple[str, str | None, str | None]]:
    """(path, caption, None) for each readable image, (path, None, error) for the others, in input order, on the
    model's device (`precision="bf16"`: under bf16 autocast). Images over `max_pixels` (decompression bombs) are
    refused before their pixels are decoded."""
    import torch

    from med_train.data import build_transform, load_image

    transform = build_transform(train=False, image_size=model.cfg.vision.image_size)
    prepare_decoding(model, model.device)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        tensors, errors = [], {}
        for i, path in enumerate(chunk):
            try:
                tensors.append((i, transform(load_image(path, max_pixels=max_pixels))))
            except Exception as err:  # noqa: BLE001 - a bad file is reported, the others still captioned
                errors[i] = str(err)
        captions = {}
        if tensors:
            images = torch.stack([t for _, t in tensors]).to(model.device)
            with precision_autocast(model.device, precision):
                texts = model.generate(images, **kwargs)
            captions = dict(zip([i for i, _ in tensors], texts, strict=True))
        for i, path in enumerate(chunk):
            yield path, captions.get(i), errors.get(i)
