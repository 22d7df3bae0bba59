"""`med bench`: med_train against transformers' `BlipForConditionalGeneration` with the same shapes, batch, weights
(through `export_hf`) and inputs, in one process.

    med bench                                  # ViT-B/16 224 px + BERT-base (vocab 30524), fp32, batch 8, CPU
    med bench --device cuda                    # 384 px, bf16 autocast for both, batch 32, BLIP's data recipe
    med bench --compile                        # both training steps through torch.compile
    med bench --config configs/shapes.yaml     # that config's model sizes and data
    med bench --quick --json bench.json        # tiny sizes, one repetition (what the test runs)

    results = run_bench(BenchSettings.defaults("cpu"))     # the figures, as `--json` writes them

Repetitions alternate between the two models (ours, peer, then peer, ours, ...) so that noise from a shared
machine hits both alike; each figure is the median over repetitions, after an untimed warm-up per side. Weights
are random (no hub): the speed of a model does not depend on its values. Figures, ours and the peer's:
- training step (forward, backward, AdamW step) images/s and peak memory of a steady-state step (after the first;
  median over `reps` steps): the weights and AdamW's state plus the step's high-water increase (activations,
  gradients, temporaries), from CUDA's
  max_memory_allocated or, on the CPU, the kernel's resident high-water mark (VmHWM, reset just before the step,
  after handing freed heap memory back with malloc_trim). Ours uses `train.build_optimizer` (what `med train`
  runs); the peer the same parameter groups in fused AdamW, the transformers Trainer's default;
- captioning images/s end to end (ViT + decoding) and decoding alone (from the same precomputed image tokens),
  greedy and beam 3, max length 20, min length 5; greedy captions must be identical token for token;
- model FLOPs per training image (FlopCounterMode over the peer's forward and backward: its eager attention
  exposes every matmul) and the achieved fraction of this machine's dense matmul rate, measured here
  (`matmul_fraction`; on a GPU also `mfu`, against the datasheet peak);
- the data pipeline's images/s (decode + train transform + collate, the configured workers) against what
  training consumes (`data_headroom`). Without a config the pipeline is the default one on the CPU (2 workers);
  with `--device cuda` it is BLIP's COCO recipe (configs/coco_karpathy_base.yaml: RandAugment, 8 workers, or
  fewer where the machine has fewer cores), what a GPU run of that recipe feeds the model with.
- the CPU in words (model, vector extensions, CPUs, torch threads: `fast.cpu.describe`) and, for each fast path
  the run chose, whether it is on and the two timings that chose it (`fast.calibrate.verdicts`).

On the CPU the process keeps freed memory for reuse (`train.keep_freed_memory`, as `med train` does there), which
speeds up both sides alike and takes page faults out of the noise.

With `compile=True` both models' training forward runs through `torch.compile` (the first step compiles it and is
not timed); the captioning figures stay eager.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from med_train import fast
from med_train.config import Config, load_config
from med_train.fast import calibrate, few_rows
from med_train.fast import cpu as fast_cpu
from med_train.model import normalize_images
from med_train.tokenizer import load_tokenizer

# Dense bf16 tensor-core peaks from the vendor datasheets (FLOP/s), for MFU; other GPUs get no MFU.
GPU_PEAK_BF16 = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}
BERT_VOCAB = 30522  # bert-base-uncased; [DEC] and [ENC] make 30524
SIDES = ("ours", "peer")


@dataclass
class BenchSettings:
    device: str = "cpu"
    batch_size: int = 8
    image_size: int | None = 224  # None: the config's
    bf16: bool = False  # autocast, for both models
    reps: int = 3  # timed repetitions per side
    threads: int | None = None  # torch intra-op threads; None: torch's default
    max_length: int = 20
    min_length: int = 5
    data_batches: int = 6  # timed data-pipeline batches, at least 2 per worker (after each worker's first)
    matmul_size: int = 2048
    workers: int | None = None  # data-pipeline workers; None: the config's (or, generated data, see defaults)
    randaugment: bool | None = None  # None: the config's
    compile: bool = False  # torch.compile both training steps
    quick: bool = False  # tiny sizes: a smoke run for the tests

    @classmethod
    def defaults(cls, device: str = "cpu", quick: bool = False) -> BenchSettings:
        if quick:
            return cls(device=device, batch_size=4, image_size=32, reps=1, data_batches=2, matmul_size=256,
                       quick=True)
        if device == "cuda":  # BLIP's COCO recipe: 384 px, 32 images per GPU, RandAugment, 8 loader workers
            return cls(device=device, batch_size=32, image_size=384, bf16=True, matmul_size=8192,
                       workers=min(8, os.cpu_count() or 1), randaugment=True)
        return cls(device=device)


# ---- setup: config, tokenizer, data, the two models -----------------------------------------------------------------

def bench_config(settings: BenchSettings, config_path: str | Path | None, workdir: Path) -> Config:
    """The config's model (random weights, nothing from the hub) and data; without one, ViT-B/16 + BERT-base on a
    shapes set drawn at 384 px (PNG) into `workdir`."""
    cfg = load_config(config_path) if config_path else Config()
    vision, text = cfg.model.vision, cfg.model.text
    vision.pretrained, vision.weights, text.init = False, None, "random"
    if settings.quick:  # the tests' tiny sizes
        vision.name, vision.kwargs = "vit_tiny_patch16_224", dict(patch_size=8, embed_dim=48, depth=2, num_heads=3)
        text.hidden_size, text.num_hidden_layers, text.num_attention_heads = 32, 2, 4
        text.intermediate_size, text.max_position_embeddings = 64, 64
    if settings.image_size is not None:
        vision.image_size = settings.image_size
    if generated_data(settings, config_path):
        from med_train.shapes import generate

        rows = settings.batch_size * (settings.data_batches + 2)
        side = vision.image_size if settings.quick else max(384, vision.image_size)  # BLIP's size, or more
        generate(workdir / "shapes", train=rows, val=0, test=1, seed=0, image_size=side)
        cfg.data.source, cfg.data.format = str(workdir / "shapes"), "imagefolder"
        if settings.quick:
            cfg.data.num_workers = 0
    if settings.workers is not None:
        cfg.data.num_workers = settings.workers
    if settings.randaugment is not None:
        cfg.data.randaugment = settings.randaugment
    if cfg.data.cache_dir is None:
        cfg.data.cache_dir = str(workdir / "datasets-cache")  # keep the user's cache clean
    return cfg


def generated_data(settings: BenchSettings, config_path: str | Path | None) -> bool:
    return config_path is None or settings.quick


def bench_tokenizer(cfg: Config, workdir: Path, vocab_size: int):
    """The config's tokenizer when it is trained on the captions or a local folder; else (a hub name, and no hub
    here) a BERT-layout WordPiece vocabulary of `vocab_size` entries holding the caption words."""
    from med_train.data import iter_captions
    from med_train.tokenizer import train_tokenizer

    name = cfg.tokenizer.name
    if name == "train":
        return train_tokenizer((cfg.model.prompt + c for c in iter_captions(cfg.data, cfg.data.train_split)),
                               cfg.tokenizer.vocab_size)
    if Path(name).is_dir():
        return load_tokenizer(name)
    words = {w for c in iter_captions(cfg.data, cfg.data.train_split, limit=1000) for w in c.split()}
    return bert_layout_tokenizer(workdir / "tokenizer", vocab_size, sorted(words | set(cfg.model.prompt.split())))


def bert_layout_tokenizer(folder: Path, vocab_size: int, words: list[str]):
    """A lower-casing WordPiece tokenizer with bert-base-uncased's special ids ([PAD] 0, [UNK] 100, [CLS] 101,
    [SEP] 102, [MASK] 103), `words`, single characters, and `[unused]` fillers up to `vocab_size`; [DEC] and
    [ENC] come after, as for BERT."""
    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(",.!?'-")
    vocab = list(dict.fromkeys(specials + chars + ["##" + c for c in chars] + words))
    if len(vocab) > vocab_size:
        raise ValueError(f"the tokenizer needs {len(vocab)} entries but vocab_size is {vocab_size}")
    vocab += [f"[unused{i}]" for i in range(99, 99 + vocab_size - len(vocab))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return load_tokenizer(str(folder))


def data_throughput(cfg: Config, settings: BenchSettings, tokenizer) -> tuple[float, dict]:
    """(images/s of the training data pipeline with the configured workers, its first batch). The first round
    (one batch from each worker: start-up, opening the table) is not timed, since the workers start together and
    their first batches arrive at once; the next max(`data_batches`, 2 x workers) batches are."""
    from med_train.data import build_dataloader

    loader = build_dataloader(cfg.data, cfg.data.train_split, train=True, batch_size=settings.batch_size,
                              image_size=cfg.model.vision.image_size, tokenizer=tokenizer,
                              prompt=cfg.model.prompt, max_length=cfg.tokenizer.max_length, seed=0)
    workers = max(1, cfg.data.num_workers)
    batches = iter(loader)  # endless: the timed batches may run into later epochs of the same rows
    first = next(batches)
    for _ in range(workers - 1):
        next(batches)
    start, images = time.perf_counter(), 0
    for _ in range(max(settings.data_batches, 2 * workers)):
        images += next(batches)["images"].shape[0]
    seconds = time.perf_counter() - start
    batches.close()  # stops the workers of the endless loader
    return images / seconds, first


def build_models(cfg: Config, tokenizer, workdir: Path, device: str):
    """(ours, peer): our Captioner with random weights and transformers' BLIP loaded from its `export_hf`."""
    from transformers import BlipForConditionalGeneration

    from med_train.export import export_hf
    from med_train.model import Captioner

    torch.manual_seed(0)
    ours = Captioner(cfg.model, tokenizer, load_weights=False, max_caption_tokens=cfg.tokenizer.max_length)
    export_hf(ours, workdir / "hf")
    peer = BlipForConditionalGeneration.from_pretrained(workdir / "hf", dtype=torch.float32)
    return ours.to(device), peer.to(device)


def build_optimizers(ours, peer, cfg: Config, device: str) -> dict:
    """Ours: `build_optimizer`, as `med train`. The peer: the same groups and hyperparameters in fused AdamW, the
    transformers Trainer's default optimizer (`adamw_torch_fused`, on the CPU too)."""
    from med_train.train import build_optimizer

    groups = [{k: g[k] for k in ("params", "lr", "weight_decay")}
              for g in build_optimizer(peer, cfg, device).param_groups]
    return {"ours": build_optimizer(ours, cfg, device),
            "peer": torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.999), fused=True)}


def _adamw_kind(optimizer, device: str) -> str:
    """Which AdamW implementation runs: torch picks foreach on CUDA and the per-tensor loop on the CPU by default."""
    if optimizer.defaults.get("fused"):
        return "AdamW fused"
    foreach = optimizer.defaults.get("foreach")
    return "AdamW foreach" if foreach or (foreach is None and device == "cuda") else "AdamW for-loop"


# ---- measuring ------------------------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], reps: int, device: str, warmup: bool = True
                ) -> dict[str, float]:
    """Median seconds per call of each function: an optional warm-up call each, then `reps` rounds whose order
    flips every round (ours, peer / peer, ours), so drifting machine load hits both sides alike."""
    for fn in fns.values() if warmup else ():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_increase(fn: Callable[[], object], device: str) -> int | None:
    """Bytes by which memory use peaks above its level when `fn` starts: CUDA allocated memory, or (CPU, Linux)
    resident memory; None where the kernel's high-water mark cannot be reset (`fn` still runs)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        # freed heap memory would otherwise stay resident and hide part of the step's own high-water mark
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except (OSError, KeyError):
        fn()
        return None
    fn()
    return (_status_kb("VmHWM") - base) * 1024


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.untyped_storage().nbytes() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def parameter_bytes(model: torch.nn.Module) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())  # tied weights counted once


def matmul_rate(device: str, dtype: torch.dtype, size: int, reps: int = 3) -> float:
    """This machine's dense matmul rate in FLOP/s: the best of `reps` (size x size) @ (size x size) products."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def machine_info(device: str) -> dict:
    import timm
    import transformers

    cpu = fast_cpu.model_name()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
            "transformers": transformers.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({cpu})"}


def _strip_pads(ids: torch.Tensor, pad: int) -> list[list[int]]:
    rows = []
    for row in ids.tolist():
        while row and row[-1] == pad:
            row.pop()
        rows.append(row)
    return rows


def _rates(results: dict, label: str, batch: int, seconds: dict[str, float]) -> None:
    rate = {name: round(batch / s, 3) for name, s in seconds.items()}
    results[f"{label}_images_per_s"] = rate
    results[f"{label}_speedup"] = round(rate["ours"] / rate["peer"], 3)


# ---- the benchmark --------------------------------------------------------------------------------------------------

def run_bench(settings: BenchSettings, config_path: str | Path | None = None,
              say: Callable[[str], None] = lambda _: None) -> dict:
    """Every figure of the module docstring, as a JSON-safe dict (ratios are ours / peer)."""
    import datasets
    from transformers.utils import logging as hf_logging

    from med_train.train import keep_freed_memory

    device = settings.device
    if settings.threads:
        torch.set_num_threads(settings.threads)
    # as `med train` on the CPU: for both sides, since they share the process (fewer page faults, less noise)
    kept = keep_freed_memory() if device == "cpu" else False
    datasets.disable_progress_bars()  # the command prints its own progress lines
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # generation-config chatter
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="med-bench-") as tmp:
        workdir = Path(tmp)
        say("preparing data and tokenizer")
        cfg = bench_config(settings, config_path, workdir)
        tokenizer = bench_tokenizer(cfg, workdir, 400 if settings.quick else BERT_VOCAB)
        say(f"building the models (vocab {len(tokenizer)}) and exporting ours to transformers")
        ours, peer = build_models(cfg, tokenizer, workdir, device)
        # as `med train` and `med caption` do, before anything is timed (the kernel's first build compiles)
        fast.prepare(ours, device, "train")
        prepared = fast.prepare(ours, device, "decode")
        say("measuring the data pipeline")
        data_rate, batch = data_throughput(cfg, settings, tokenizer)

    matmul_dtype = torch.bfloat16 if settings.bf16 else torch.float32
    rates = [matmul_rate(device, matmul_dtype, settings.matmul_size)]
    optimizers = build_optimizers(ours, peer, cfg, device)
    results: dict = {
        "cpu": fast_cpu.describe(),
        "settings": {**asdict(settings), "image_size": cfg.model.vision.image_size, "vision": cfg.model.vision.name,
                     "workers": cfg.data.num_workers, "randaugment": cfg.data.randaugment,
                     "vision_kwargs": cfg.model.vision.kwargs, "text": asdict(cfg.model.text),
                     "vocab_size": len(tokenizer), "config": str(config_path) if config_path else None,
                     "data_source": "shapes set, generated" if generated_data(settings, config_path)
                     else cfg.data.source,
                     "optimizer": {name: _adamw_kind(opt, device) for name, opt in optimizers.items()}},
        "machine": {**machine_info(device), "freed_memory_kept": kept,
                    "few_row_kernel": device == "cpu" and few_rows.available(),
                    "fast_prepared": prepared.describe()}}
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if settings.bf16 else nullcontext
    # ours takes the loader's uint8 images and normalises them on the device; the peer, like transformers'
    # BlipProcessor users, gets float pixels normalised beforehand (the same values), outside its timing
    images = batch["images"].to(device)
    pixels = normalize_images(images, *ours.image_mean_std())
    text = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}

    say("captioning")  # first, while both models hold the same weights
    results.update(_captioning(ours, peer, images, pixels, tokenizer, settings, autocast))
    say("training steps")
    results.update(_training(ours, peer, optimizers, images, pixels, text, settings, autocast))

    rates.append(matmul_rate(device, matmul_dtype, settings.matmul_size))
    rate, train_rate = max(rates), results["train_images_per_s"]
    flops = results["train_gflop_per_image"] * 1e9
    results["matmul_gflops"] = round(rate / 1e9, 1)
    results["matmul_fraction"] = round(flops * train_rate["ours"] / rate, 3)
    results["peer_matmul_fraction"] = round(flops * train_rate["peer"] / rate, 3)
    peak = next((v for k, v in GPU_PEAK_BF16.items() if k in results["machine"]["device_name"]), None)
    results["mfu"] = round(flops * train_rate["ours"] / peak, 3) if peak and device == "cuda" else None
    results["data_images_per_s"] = round(data_rate, 1)
    results["data_workers"] = cfg.data.num_workers
    results["data_randaugment"] = cfg.data.randaugment
    results["data_headroom"] = round(data_rate / train_rate["ours"], 2)
    # Time to the demo's quality bar takes two trainings on the shapes set: `med race` (race.py) measures it.
    # The key stays so that one JSON can carry both once a run joins them; never estimated here.
    results["time_to_quality_bar"] = None
    results["fast_paths"] = [asdict(verdict) for verdict in calibrate.verdicts()]  # as chosen for this machine
    return results


def _captioning(ours, peer, images, pixels, tokenizer, settings: BenchSettings, autocast) -> dict:
    """Captioning images/s, end to end and decoding alone, greedy and beam 3, and the caption checks."""
    from med_train import decode

    device, sep, pad = settings.device, tokenizer.sep_token_id, tokenizer.pad_token_id
    lengths = dict(max_length=settings.max_length, min_length=settings.min_length)
    prompt = ours.prompt_ids[None].expand(images.shape[0], -1)  # [DEC] a picture of
    prompt_sep = torch.cat([prompt, torch.full_like(prompt[:, :1], sep)], 1)  # BLIP's generate drops the last
    ours.eval()
    peer.eval()
    with torch.no_grad(), autocast():
        image_embeds = ours.encode_images(images)  # one input for both decoders
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=device)
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str, fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad(), autocast():
                outputs[name] = fn()
        return call

    def peer_end_to_end(beams: int) -> torch.Tensor:
        return peer.generate(pixel_values=pixels, input_ids=prompt_sep.clone(), num_beams=beams, do_sample=False,
                             **lengths)

    def ours_decode(beams: int, embeds: torch.Tensor) -> torch.Tensor:
        return decode.generate(ours.text_decoder, embeds, ours.prompt_ids, num_beams=beams, eos_token_id=sep,
                               pad_token_id=pad, **lengths)

    def peer_decode(beams: int, embeds: torch.Tensor) -> torch.Tensor:
        return peer.text_decoder.generate(input_ids=prompt.clone(), encoder_hidden_states=embeds,
                                          encoder_attention_mask=image_mask, eos_token_id=sep, pad_token_id=pad,
                                          num_beams=beams, do_sample=False, **lengths)

    results: dict = {}
    for beams, label in ((1, "greedy"), (3, "beam3")):
        seconds = interleaved({
            "ours": keep(f"ours_{label}", lambda b=beams: ours.generate_ids(images, num_beams=b, **lengths)),
            "peer": keep(f"peer_{label}", lambda b=beams: peer_end_to_end(b)),
        }, settings.reps, device)
        _rates(results, label, images.shape[0], seconds)
        seconds = interleaved({  # no warm-up: the end-to-end runs just ran these decoders on these shapes
            "ours": keep(f"ours_{label}_decode", lambda b=beams: ours_decode(b, image_embeds)),
            "peer": keep(f"peer_{label}_decode", lambda b=beams: peer_decode(b, image_embeds)),
        }, settings.reps, device, warmup=False)
        _rates(results, f"{label}_decode", images.shape[0], seconds)

    if settings.bf16:  # the token-for-token checks are made in fp32, where the two implementations agree
        with torch.no_grad():
            embeds = ours.encode_images(images)
            outputs.update(ours_greedy=ours.generate_ids(images, num_beams=1, **lengths),
                           peer_greedy=peer_end_to_end(1), ours_greedy_decode=ours_decode(1, embeds),
                           peer_greedy_decode=peer_decode(1, embeds))
    ours_rows, peer_rows = _strip_pads(outputs["ours_greedy"], pad), _strip_pads(outputs["peer_greedy"], pad)
    mismatched = [i for i, (a, b) in enumerate(zip(ours_rows, peer_rows, strict=True)) if a != b]
    beam_pairs = zip(_strip_pads(outputs["ours_beam3"], pad), _strip_pads(outputs["peer_beam3"], pad), strict=True)
    results.update(
        greedy_captions_identical=not mismatched,
        greedy_mismatches=[{"image": i, "ours": tokenizer.decode(ours_rows[i]), "peer": tokenizer.decode(peer_rows[i])}
                           for i in mismatched],
        greedy_decode_captions_identical=(_strip_pads(outputs["ours_greedy_decode"], pad)
                                          == _strip_pads(outputs["peer_greedy_decode"], pad)),
        beam3_captions_same_fraction=statistics.mean(a == b for a, b in beam_pairs))
    fast.release(ours)  # a GPU's captured steps, the packed weights: not part of training's memory
    return results


def _training(ours, peer, optimizers: dict, images, pixels, text: dict, settings: BenchSettings, autocast) -> dict:
    """Training-step images/s, peak memory, first-step losses and the model FLOPs per image."""
    from torch.utils.flop_counter import FlopCounterMode

    device = settings.device
    ours.train()
    peer.train()
    losses: dict[str, float] = {}
    forward = {"ours": ours, "peer": peer}
    if settings.compile:
        forward = {name: torch.compile(model) for name, model in forward.items()}
    loss_fns = {"ours": lambda: forward["ours"](images, **text),
                "peer": lambda: forward["peer"](pixel_values=pixels, **text).loss}

    def step(name: str, counter=None) -> Callable[[], None]:
        def call() -> None:
            with counter or nullcontext():  # counts the forward and backward matmuls, not the optimizer
                with autocast():
                    loss = loss_fns[name]()
                loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            losses.setdefault(name, float(loss.detach()))  # the first step's, on equal weights
        return call

    counter = FlopCounterMode(display=False)
    if settings.compile:
        with torch.no_grad(), autocast():  # the first-step losses on equal weights, and the FLOPs, from eager runs
            losses.update(ours=float(ours(images, **text)), peer=float(peer(pixel_values=pixels, **text).loss))
        with counter, autocast():
            peer(pixel_values=pixels, **text).loss.backward()
        peer.zero_grad(set_to_none=True)
    # The first step of each side warms up (and compiles, with `compile`) and creates AdamW's state; the peak is
    # measured over the next, a steady-state step: weights and optimizer state, plus what the step adds on top
    step("ours")()
    step("peer", None if settings.compile else counter)()
    state_bytes = {name: optimizer_state_bytes(optimizers[name]) for name in SIDES}
    seconds = interleaved({name: step(name) for name in SIDES}, settings.reps, device, warmup=False)
    # the resident high-water mark moves by a few percent from step to step (the C allocator's choices):
    # the median over `reps` steady-state steps per side, alternated like the timings
    peaks: dict[str, list] = {name: [] for name in SIDES}
    for rep in range(settings.reps):
        for name in SIDES if rep % 2 == 0 else SIDES[::-1]:
            peaks[name].append(peak_increase(step(name), device))
    increase = {name: None if None in values else statistics.median(values) for name, values in peaks.items()}
    results: dict = {}
    _rates(results, "train", images.shape[0], seconds)
    static = {name: parameter_bytes(model) + state_bytes[name] for name, model in (("ours", ours), ("peer", peer))}
    memory = {name: None if increase[name] is None else round((static[name] + increase[name]) / 2**20, 1)
              for name in SIDES}
    results.update(train_memory_mb=memory, train_weights_and_state_mb={k: round(v / 2**20, 1) for k, v in static.items()},
                   memory_ratio=None if None in memory.values() else round(memory["ours"] / memory["peer"], 3),
                   train_loss_first_step=losses,
                   train_gflop_per_image=round(counter.get_total_flops() / images.shape[0] / 1e9, 3))
    return results


# ---- the table ------------------------------------------------------------------------------------------------------

def _chosen_by(verdict: dict) -> str:
    if verdict["plain_s"] is None:
        return verdict["source"]
    return f"{verdict['fast_s'] * 1e3:.3g} ms against plain {verdict['plain_s'] * 1e3:.3g} ms, {verdict['source']}"


def format_table(results: dict) -> str:
    """The figures as a plain-text table (what the README shows)."""
    s, m = results["settings"], results["machine"]
    precision = ("bf16 autocast" if s["bf16"] else "fp32") + (", training compiled" if s["compile"] else "")
    lines = [f"med bench: {s['vision']} {s['image_size']} px + MED {s['text']['hidden_size']}x"
             f"{s['text']['num_hidden_layers']} (vocab {s['vocab_size']}), batch {s['batch_size']}, {precision}, "
             f"median of {s['reps']}",
             f"cpu: {results['cpu']}",
             f"machine: {m['device_name']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, load "
             f"average {m['load_average'][0]}; torch {m['torch']}, transformers {m['transformers']}, timm {m['timm']}",
             f"optimizers: ours {s['optimizer']['ours']}, peer {s['optimizer']['peer']}"
             + ("; freed memory kept for reuse (both)" if m.get("freed_memory_kept") else "")
             + ("; ours decodes with the few-row kernel" if m.get("few_row_kernel") else ""),
             f"ours: {m['fast_prepared']}" if m.get("fast_prepared") else "ours: fast paths not recorded",
             *(f"fast path {v['key']}: {'on' if v['fast'] else 'off'} ({_chosen_by(v)})"
               for v in results["fast_paths"]),
             "",
             f"{'figure':<34}{'ours':>10}{'peer':>10}{'ours/peer':>11}"]

    def row(name: str, pair: dict, ratio) -> None:
        def fmt(v):
            if v is None:
                return "-"
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        lines.append(f"{name:<34}{fmt(pair['ours']):>10}{fmt(pair['peer']):>10}{fmt(ratio):>11}")

    row("train images/s", results["train_images_per_s"], results["train_speedup"])
    row("train peak memory MB", results["train_memory_mb"], results["memory_ratio"])
    for label, name in (("greedy", "caption greedy images/s"), ("beam3", "caption beam-3 images/s"),
                        ("greedy_decode", "decode only, greedy images/s"),
                        ("beam3_decode", "decode only, beam-3 images/s")):
        row(name, results[f"{label}_images_per_s"], results[f"{label}_speedup"])
    row("train, fraction of matmul rate", {"ours": results["matmul_fraction"],
                                           "peer": results["peer_matmul_fraction"]}, None)
    losses = results["train_loss_first_step"]
    lines += ["",
              f"model FLOPs per training image {results['train_gflop_per_image']} GFLOP; dense matmul rate "
              f"{results['matmul_gflops']} GFLOP/s" + (f"; MFU {results['mfu']}" if results["mfu"] else ""),
              f"data pipeline {results['data_images_per_s']} images/s with {results['data_workers']} workers"
              f"{' and RandAugment' if results['data_randaugment'] else ''} = "
              f"{results['data_headroom']}x what training consumes",
              f"first-step loss: ours {losses['ours']:.5f}, peer {losses['peer']:.5f}; beam-3 captions equal: "
              f"{results['beam3_captions_same_fraction']:.0%}",
              "time to the demo's quality bar: see `med race`"]
    if results["greedy_captions_identical"]:
        lines.append("greedy captions identical: yes")
    else:
        lines.append(f"GREEDY CAPTIONS DIFFER on {len(results['greedy_mismatches'])} images:")
        lines += [f"  image {m['image']}: ours {m['ours']!r} / peer {m['peer']!r}"
                  for m in results["greedy_mismatches"]]
    return "\n".join(lines)
