"""The training loop: `train()` runs its stages top to bottom (set up, build, the steps, validation, checkpoints,
the end), every process the same ones in the same order.

    med train configs/shapes.yaml --set train.lr=3e-4          # one process, CPU or GPU
    med train configs/x.yaml --processes 8                      # several on this machine (launch.py)
    accelerate launch -m med_train.cli train configs/x.yaml     # several GPUs / machines (or torchrun)
    med train --resume [RUN]                                    # continue a stopped run (default: runs/latest)

Stopping: SIGTERM or SIGINT (`timeout`, Slurm, Kubernetes, Ctrl-C), to one process or the whole process group,
any number of processes: every process finishes the same step, a checkpoint is written, and the run exits 0 with
the command that resumes it. A checkpoint, or a file of the run folder (a metrics line, run.json), that cannot
be written stops every process in one line (run_folder).

Mixed precision: train.mixed_precision when the config sets it, else the launcher's (`accelerate launch
--mixed_precision bf16`, or `accelerate config`), else none.

The run folder it writes, and what each file holds: med_train/run_folder.py.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from med_train.config import Config, save_config
from med_train.run_folder import (
    HOLDOUT_FILE,
    METRICS_FILE,
    RUN_FILE,
    TrainerState,
    TrainingError,
    append_jsonl,
    atomic_path,
    atomic_write,
    checkpoint_dirs,
    discard_run,
    first_line,
    last_checkpoint,
    latest_target,
    new_run_dir,
    read_json,
    read_jsonl,
    read_trainer_state,
    restore_checkpoint,
    save_checkpoint,
    save_tokenizer,
    truncate_metrics,
    write_on_main,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from med_train.model import Captioner
    from med_train.sources import Holdout

MAX_NONFINITE_IN_A_ROW = 20
LAUNCHER_PRECISIONS = ("no", "fp16", "bf16", "fp8")  # what accelerate accepts


# ---- setting up ------------------------------------------------------------------------------------------------

def cpu_processes() -> bool:
    """True when torchrun (or accelerate launch) started several processes on a machine without CUDA: accelerate
    then needs `cpu=True` to join them with gloo, and without it silently runs each process as a whole run."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def choose_precision(configured: str | None, environ: Mapping[str, str] = os.environ) -> tuple[str, str | None]:
    """(the mixed precision to train with, a line to show or None). `accelerate launch --mixed_precision X` and
    `accelerate config` reach the script as ACCELERATE_MIXED_PRECISION; `Accelerator(mixed_precision=...)` would
    silently override it. So the launcher's choice applies when train.mixed_precision is unset (null), "no" when
    neither says; when both say and differ, the config wins, and the line says so."""
    launcher = environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower() or None
    if launcher is not None and launcher not in LAUNCHER_PRECISIONS:
        raise TrainingError(f"ACCELERATE_MIXED_PRECISION={launcher!r} (from accelerate launch or accelerate config) "
                            f"must be one of {' | '.join(LAUNCHER_PRECISIONS)}")
    if configured is None:
        return launcher or "no", None
    if launcher is None or launcher == configured:
        return configured, None
    return configured, (f"mixed precision {configured} (train.mixed_precision in the config) wins over {launcher} "
                        "(ACCELERATE_MIXED_PRECISION, from accelerate launch or accelerate config); "
                        "--set train.mixed_precision=null lets the launcher's apply")


def keep_freed_memory() -> bool:
    """Let the C allocator (glibc) keep freed memory for reuse instead of handing it back to the kernel: blocks up
    to 32 MB (glibc's maximum) come from the heap, and the heap's free top is never trimmed. A CPU training step
    frees and re-allocates the same activation-sized blocks many times; handed back, every reuse costs a page fault
    per 4 KB page (a ViT-B + BERT-base step here: about 7% of its time, minor faults 2.7M -> 1.9M over a run;
    peak resident memory unchanged). False where there is no glibc `mallopt` (macOS, Windows, musl)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


# ---- optimisation ----------------------------------------------------------------------------------------------

def _no_decay(name: str, param) -> bool:
    """Norms, biases and embeddings get no weight decay."""
    return param.ndim < 2 or any(s in name for s in ("norm", "bias", "embeddings", "pos_embed", "cls_token",
                                                      "reg_token"))


def build_optimizer(model, cfg: Config, device_type: str):
    import torch

    t = cfg.train
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_vision = name.startswith("visual_encoder.")
        groups.setdefault((is_vision, _no_decay(name, param)), []).append(param)
    param_groups = [{"params": params, "weight_decay": 0.0 if no_decay else t.weight_decay,
                     "lr": (t.vision_lr if is_vision and t.vision_lr is not None else t.lr)}
                    for (is_vision, no_decay), params in sorted(groups.items())]
    # fused AdamW (one kernel for all parameters) exists on CUDA and CPU; elsewhere the per-tensor loop
    return torch.optim.AdamW(param_groups, lr=t.lr, betas=(0.9, 0.999), fused=device_type in ("cuda", "cpu"))


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` at `max_steps` (per optimizer step)."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---- validation, length and tracking ---------------------------------------------------------------------------

def validation_source(cfg: Config):
    """(split, holdout): what training validates on. `data.val_split` when the source has it; otherwise the
    images of the training split that `data.val_holdout` sets aside (the same ones the training stream skips)."""
    from med_train.sources import Holdout, has_split

    d = cfg.data
    if d.val_split is not None and has_split(d, d.val_split):
        return d.val_split, None
    return d.train_split, Holdout.of(d, cfg.train.seed)


def _announce_validation(cfg: Config, split: str, holdout, val_loader, run_dir: Path, *,
                         record: Callable[[Path, str], None] | None, say, notice) -> None:
    """Warn when validation is also the reported split; for a held-out slice, check it is not empty and record it
    (`record(path, text)`, None: not recorded)."""
    d = cfg.data
    if holdout is None:
        if split == d.eval_split:
            notice(f"warning: data.val_split {split!r} is also data.eval_split: best/ is chosen on the split it is "
                   f"then reported on, which flatters the report; give validation its own split")
        return
    keys = [holdout.key(group) for group in val_loader.stream.groups]
    why = "data.val_split is null" if d.val_split is None else f"the source has no {d.val_split!r} split"
    if not keys:
        raise TrainingError(f"data.val_holdout {holdout.fraction} holds out no image of {split!r} ({why}): "
                            f"raise it, or set data.val_split to a split the source has")
    if record is not None:
        record(run_dir / HOLDOUT_FILE, json.dumps(
            {"split": split, "fraction": holdout.fraction, "seed": holdout.seed, "rule": holdout.RULE,
             "base": holdout.base, "images": len(keys), "keys": keys}, indent=1) + "\n")
    say(f"validation: {len(keys)} images of {split!r} held out from training ({why}; data.val_holdout "
        f"{holdout.fraction}), listed in {run_dir / HOLDOUT_FILE}")


def epoch_steps(epochs: float, examples: int, examples_per_step: int) -> int:
    """Optimizer steps for `epochs` passes over `examples`: ceil(epochs * examples / examples_per_step), at least
    1. The epochs are read as written (0.1, not the float just above it), so that a whole count is not rounded up."""
    return max(1, math.ceil(Fraction(repr(epochs)) * examples / examples_per_step))


def _steps_for_epochs(cfg: Config, loader, accelerator, run_dir: Path, resume, say) -> int:
    """train.epochs as optimizer steps: counted from the training examples (main process, then shared), or the
    count recorded in run.json when resuming (a resume with other processes keeps the run's length)."""
    from accelerate.utils import broadcast_object_list

    t = cfg.train
    if resume and (run_dir / RUN_FILE).is_file():
        recorded = read_json(run_dir / RUN_FILE, "the run's length")
        if not isinstance(recorded, dict) or not isinstance(recorded.get("max_steps"), int):
            raise TrainingError(f"{run_dir / RUN_FILE}: no max_steps in it; give the run's length with "
                                f"--set train.max_steps=N")
        return recorded["max_steps"]
    counted = [loader.stream.epoch_size() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(counted)
    examples, per_step = counted[0], t.batch_size * accelerator.num_processes * t.grad_accum_steps
    if not examples:
        raise TrainingError(f"train.epochs: {cfg.data.source!r} [{cfg.data.train_split}] has no usable caption "
                            f"to train on")
    steps = epoch_steps(t.epochs, examples, per_step)
    if t.warmup_steps > steps:
        raise TrainingError(f"train.warmup_steps ({t.warmup_steps}) is more than the {steps} steps of "
                            f"train.epochs {t.epochs}")
    say(f"train.epochs {t.epochs}: {examples} examples an epoch, {per_step} a step "
        f"(batch {t.batch_size} x {accelerator.num_processes} processes x {t.grad_accum_steps} accumulated): "
        f"{steps} steps")
    return steps


def tracker_config(cfg: Config) -> dict:
    """The resolved config for the trackers, as dotted keys with scalar values: TensorBoard's hparams take no
    sections or lists, so sections are flattened and lists written as JSON text (`"model.vision.mean": "[0.5, 0.5,
    0.5]"`)."""
    from med_train.config import config_to_dict

    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for name, inner in value.items():
                walk(f"{prefix}.{name}" if prefix else name, inner)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list | dict) else value

    walk("", config_to_dict(cfg))
    return flat


def tracker_run_names(run_name: str) -> dict:
    """The run's name for each tracker that takes one. accelerate gives every tracker `train.project` as its
    project (TensorBoard: a folder in the run folder); the run's own name goes through each tracker's keyword."""
    return {"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}, "clearml": {"task_name": run_name}}


# ---- the run, stage by stage -----------------------------------------------------------------------------------

@dataclass
class Run:
    """What the stages of one run share: set up first, then filled in by the build stages."""

    cfg: Config  # with train.max_steps once the run's length is known (train.epochs: see _set_length)
    run_dir: Path
    accelerator: Accelerator
    resumed: bool
    say: Callable[[str], None]  # progress notes, silent with train.quiet
    notice: Callable[[str], None]  # what a user must see even with train.quiet
    checkpoint: Path | None = None  # the checkpoint a resumed run starts from: its model, state and position
    val_split: str | None = None
    holdout: Holdout | None = None  # the training images validation reads, when the source has no data.val_split
    model: Any = None  # what the training forward calls: prepared by accelerate, compiled with train.compile
    raw_model: Captioner | None = None  # the model itself, for evaluation and checkpoints
    loader: Any = None  # endless: it moves through epochs itself and remembers its position
    val_loader: Any = None
    stats: Any = None  # the training data's bad rows
    scst: Any = None  # train.objective scst: its loss (scst.SelfCritic)
    optimizer: Any = None
    scheduler: Any = None
    state: TrainerState = field(default_factory=TrainerState)
    nonfinite_in_a_row: int = 0
    signal_received: int | None = None  # SIGTERM/SIGINT, as this process got it (_stop_signals)
    stop_signal: int | None = None  # the one every process has agreed to stop on: finish the step, save, exit

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE


@dataclass
class _Window:
    """What the next metrics line averages: the steps since the last one."""

    loss: float = 0.0
    steps: int = 0
    images: int = 0
    wait: float = 0.0  # seconds spent waiting for batches
    start: float = field(default_factory=time.perf_counter)
    grad_norm: Any = None  # the last step's, a tensor: read only when logged


def train(cfg: Config, config_path: str | Path | None = None, resume: str | Path | None = None) -> Path:
    """Train `cfg` (or resume the run folder `resume`); returns the run folder. Every process runs every stage, in
    this order: their collective calls (barriers, broadcasts, gathers) must pair up across processes."""
    latest_before = latest_target(Path(cfg.train.output_dir))
    run = _set_up(cfg, config_path, resume)
    try:
        run.val_split, run.holdout = validation_source(run.cfg)
        model = _build_model(run, _build_tokenizer(run))
        _write_run_folder(run, model)
        _build_data(run, model)
        _set_length(run)
        _prepare(run, model)
        _start(run)
        with _stop_signals(run):  # to the end: a second signal must not cut the last checkpoint short
            _loop(run)
            _checkpoint_on_stop(run)
            _finish(run)
    except BaseException:
        if run.main and not run.resumed and run.state.step == 0:  # nothing trained: nothing worth keeping
            discard_run(run.run_dir, latest_before)
        raise
    return run.run_dir


# -- setting up: the run folder's name, the accelerator, its precision, the seed, the notices

def _set_up(cfg: Config, config_path: str | Path | None, resume: str | Path | None) -> Run:
    """The run folder's name (claimed: runs/latest moves to it), the accelerator in its precision, the seed, and the
    ways to speak to the user."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import broadcast_object_list, set_seed

    t = cfg.train
    cpu = cpu_processes()
    precision, precision_note = choose_precision(t.mixed_precision)  # before a folder is claimed: it may refuse
    if resume:
        run_dir = Path(resume)
    else:  # one name for every process: each picking its own could differ by a second, or by a "-2" suffix
        process = PartialState(cpu=cpu)
        chosen = [str(new_run_dir(cfg, config_path)) if process.is_main_process else None]
        if process.num_processes > 1:
            broadcast_object_list(chosen)
        run_dir = Path(chosen[0])
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision,
                              gradient_accumulation_steps=t.grad_accum_steps, log_with=t.trackers or None,
                              project_dir=str(run_dir))
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    set_seed(t.seed, device_specific=True)
    run = Run(cfg, run_dir, accelerator, resumed=bool(resume), notice=accelerator.print,
              say=accelerator.print if not t.quiet else (lambda *a, **k: None),
              checkpoint=last_checkpoint(run_dir) if resume else None)
    if precision_note:
        run.notice(precision_note)
    return run


# -- building: tokenizer, model, data, length, optimizer and schedule, then the start (or the resumed state)

def _build_tokenizer(run: Run):
    """The run's vocabulary: the resumed run's, model.init's, one trained on the training captions, or
    tokenizer.name's."""
    from med_train import data as data_lib
    from med_train.convert import init_tokenizer
    from med_train.model import read_tokenizer
    from med_train.tokenizer import build_tokenizer, load_tokenizer

    cfg, accelerator = run.cfg, run.accelerator
    if run.resumed:
        return read_tokenizer(_model_source(run))
    if (tokenizer := init_tokenizer(cfg.model, cfg.tokenizer.name)) is not None:  # the init weights' vocabulary
        run.say(f"tokenizer: model.init's ({cfg.model.init})")
        return tokenizer
    if cfg.tokenizer.name != "train":
        return build_tokenizer(cfg.tokenizer)
    # trained on prompt + caption, so that the prompt's words are whole tokens too. By the main process only:
    # the trainer can break ties differently in each process, and every process must use the same vocabulary
    if run.main:
        captions = data_lib.iter_captions(cfg.data, cfg.data.train_split, holdout=run.holdout)
        tokenizer = build_tokenizer(cfg.tokenizer, (cfg.model.prompt + c for c in captions))
        run.run_dir.mkdir(parents=True, exist_ok=True)
    _write_on_main(run, run.run_dir / "tokenizer.json", lambda: save_tokenizer(tokenizer, run.run_dir))
    if not run.main:
        tokenizer = load_tokenizer(str(run.run_dir))
    accelerator.wait_for_everyone()  # all read it before the main process writes the run's files (_write_run_folder)
    return tokenizer


def _build_model(run: Run, tokenizer) -> Captioner:
    """The captioner: a new run's with model.init's weights, a resumed run's bare (_start loads its checkpoint)."""
    from med_train.model import Captioner, read_model_config

    if run.resumed:  # the checkpoint's own model config: the one its weights were saved with
        run.cfg = replace(run.cfg, model=read_model_config(_model_source(run))[0])
    cfg = run.cfg
    model = Captioner(cfg.model, tokenizer, load_weights=not run.resumed, max_caption_tokens=cfg.tokenizer.max_length)
    if cfg.train.freeze_vision:
        model.visual_encoder.requires_grad_(False)
    try:
        from med_train import fast
    except ImportError:  # the speed-only subpackage is optional: without it, plain PyTorch
        return model
    fast.prepare(model, run.accelerator.device, "train", enabled_here=cfg.train.fast)
    return model


def _model_source(run: Run) -> Path:
    """Where a resumed run reads its model's config and tokenizer: the checkpoint (the run folder for checkpoints
    written before they held them)."""
    from med_train.model import CONFIG_NAME

    return run.checkpoint if (run.checkpoint / CONFIG_NAME).is_file() else run.run_dir


def _write_run_folder(run: Run, model: Captioner) -> None:
    """A new run's config, tokenizer and model config (runs/latest already points at it: new_run_dir)."""
    def write() -> None:
        if not run.resumed:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(run.cfg, run.run_dir / "config.yaml")
            model.save_pretrained(run.run_dir)  # config + tokenizer now; the weights are rewritten as training goes

    _write_on_main(run, run.run_dir, write)


def _build_data(run: Run, model: Captioner) -> None:
    """The training loader and the validation loader. The data layer shards across processes and workers itself,
    so accelerate must not re-shard them."""
    from med_train import data as data_lib
    from med_train.evaluate import heldout_loader

    cfg, accelerator, t = run.cfg, run.accelerator, run.cfg.train
    run.stats = data_lib.BadRowStats()
    run.loader = data_lib.build_dataloader(
        cfg.data, cfg.data.train_split, train=True, batch_size=t.batch_size, image_size=cfg.model.vision.image_size,
        tokenizer=model.tokenizer, prompt=cfg.model.prompt, max_length=cfg.tokenizer.max_length,
        seed=t.seed, num_processes=accelerator.num_processes, process_index=accelerator.process_index,
        stats=run.stats, pin_memory=accelerator.device.type == "cuda", holdout=run.holdout,
        per_image=t.objective == "scst")
    run.val_loader = heldout_loader(model, cfg, run.val_split, accelerator=accelerator, holdout=run.holdout)
    _announce_validation(cfg, run.val_split, run.holdout, run.val_loader, run.run_dir,
                         record=None if run.resumed else lambda path, text: _write_on_main(
                             run, path, lambda: atomic_write(path, text)),
                         say=run.say, notice=run.notice)
    if t.objective == "scst":
        from med_train.scst import SelfCritic, run_reward

        run.scst = SelfCritic(cfg, run_reward(cfg, run.run_dir, run.holdout, accelerator, run.say))


def _set_length(run: Run) -> None:
    """train.max_steps, or train.epochs counted from the data once (a resume keeps the recorded count); run.json."""
    t = run.cfg.train
    if t.max_steps is None:
        steps = _steps_for_epochs(run.cfg, run.loader, run.accelerator, run.run_dir, run.resumed, run.say)
        run.cfg = replace(run.cfg, train=replace(t, max_steps=steps))
    _write_on_main(run, run.run_dir / RUN_FILE, lambda: atomic_write(
        run.run_dir / RUN_FILE, json.dumps({"max_steps": run.cfg.train.max_steps, "epochs": t.epochs}) + "\n"))


def _prepare(run: Run, model: Captioner) -> None:
    """The optimizer and its schedule, handed to accelerate with the model."""
    import torch

    cfg, accelerator = run.cfg, run.accelerator
    optimizer = build_optimizer(model, cfg, accelerator.device.type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    run.model, run.optimizer, run.scheduler = accelerator.prepare(model, optimizer, scheduler)
    run.raw_model = accelerator.unwrap_model(run.model)
    if cfg.train.compile:  # the training forward only: evaluation and checkpoints use raw_model
        run.model = torch.compile(run.model)


def _start(run: Run) -> None:
    """The trainer's state, fresh or from the last checkpoint; the trackers."""
    t = run.cfg.train
    run.state = TrainerState(mixed_precision=run.accelerator.mixed_precision)
    if run.resumed:
        run.state = _resume(run.accelerator, run.run_dir, run.loader, run.notice, run.raw_model)
        _write_on_main(run, run.metrics_path, lambda: truncate_metrics(run.metrics_path, run.state.step))
        run.say(f"resuming {run.run_dir} from step {run.state.step}")
    if t.trackers:
        run.accelerator.init_trackers(t.project, config=tracker_config(run.cfg),
                                      init_kwargs=tracker_run_names(run.run_dir.name))


def _resume(accelerator, run_dir: Path, loader, notice, model=None) -> TrainerState:
    """Load the last complete checkpoint into the prepared objects and the loader; say what differs from the run
    that wrote it (precision; processes or workers, whose data the loader shares out anew or refuses). `model`
    (unwrapped) is what a weights file that cannot be loaded is checked against, to name what does not fit."""
    checkpoint = last_checkpoint(run_dir)
    state = read_trainer_state(checkpoint)
    now, then = accelerator.mixed_precision, state.mixed_precision
    if accelerator.scaler is not None and not (checkpoint / "scaler.pt").is_file():  # load_state would stop on it
        raise TrainingError(f"{checkpoint} holds no fp16 loss scaler (trained with {then or 'another precision'}): "
                            f"resume with --set train.mixed_precision={then or 'no'}")
    if then is not None and then != now:
        notice(f"resuming with mixed precision {now}; {checkpoint} was trained with {then}")
    loader.load_state_dict(state.data)  # before the weights: a refused data layout stops at once
    # every process warns of its own random state
    restore_checkpoint(accelerator, model, checkpoint, warn=lambda line: print(line, file=sys.stderr))
    if loader.resharded_from is not None:
        from med_train.data import layout_text

        notice(f"data: the checkpoint was written by {layout_text(*loader.resharded_from)}, now "
               f"{layout_text(accelerator.num_processes, max(1, loader.num_workers))}: the rest of each unfinished "
               "epoch is shared out anew (no row repeated or skipped, in another order)")
    state.mixed_precision = now
    return state


# -- training: optimizer steps, each logged, validated and checkpointed on its schedule

@contextmanager
def _stop_signals(run: Run):
    """SIGTERM and SIGINT set run.signal_received instead of stopping the process mid-step; the processes agree
    on it at the next step's sync (_step_loss), so that all of them stop after the same step. (The loader workers
    ignore both: data._ignore_stop_signals.)"""
    def request_stop(signum, _frame):
        run.signal_received = signum

    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)


def _loop(run: Run) -> None:
    """Steps until train.max_steps or a stop signal; after each, the metrics line, validation and the checkpoint
    when they are due (all three at the last step)."""
    t = run.cfg.train
    progress = _progress(t.max_steps, run.state.step, disabled=not run.main or t.quiet)
    window = _Window()
    run.model.train()
    batches = iter(run.loader)
    try:
        while run.state.step < t.max_steps and run.stop_signal is None:
            if not _step(run, batches, window):
                continue
            progress.update(1)
            if run.state.step % t.log_every == 0 or run.state.step == t.max_steps:
                _log(run, window, progress)
                window = _Window()
            is_last = run.state.step == t.max_steps
            if (t.eval_every and run.state.step % t.eval_every == 0) or is_last:
                _validate(run)
            if (t.save_every and run.state.step % t.save_every == 0) or is_last:
                _checkpoint(run)
    finally:
        progress.close()


def _step(run: Run, batches, window: _Window) -> bool:
    """One optimizer step over train.grad_accum_steps micro-batches; False when it was skipped (_skip_update)."""
    accelerator, t = run.accelerator, run.cfg.train
    micro_losses = []
    for _ in range(t.grad_accum_steps):
        fetch_start = time.perf_counter()
        batch = next(batches)
        window.wait += time.perf_counter() - fetch_start
        images = batch["images"].to(accelerator.device, non_blocking=True)  # pinned on CUDA: async
        with accelerator.accumulate(run.model), accelerator.autocast():
            if run.scst is not None:
                loss = run.scst.loss(run.model, run.raw_model, images, batch["references"])
            else:
                loss = run.model(images, **{k: batch[k].to(accelerator.device, non_blocking=True)
                                            for k in ("input_ids", "attention_mask", "labels")})
            # always backward, even a non-finite loss: every process must join the gradient all-reduce
            accelerator.backward(loss)
        micro_losses.append(loss.detach().float())
        window.images += images.shape[0] * accelerator.num_processes
    # clipped in place; a tensor, read only when logged
    grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), t.clip_grad_norm) if t.clip_grad_norm else None
    # the step's one host-device sync, and the processes' one exchange: skip the update? stop after this step?
    step_loss, skipped, run.stop_signal = _step_loss(accelerator, micro_losses, grad_norm, run.signal_received)
    if skipped:
        _skip_update(run)
        return False
    run.nonfinite_in_a_row = 0
    window.grad_norm = grad_norm
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step += 1
    run.state.epoch = run.loader.epoch
    window.loss += step_loss
    window.steps += 1
    return True


def _skip_update(run: Run) -> None:
    """Drop a step whose loss or gradients are not finite; too many in a row stop the run."""
    state = run.state
    run.optimizer.zero_grad(set_to_none=True)
    state.nonfinite_steps += 1
    run.nonfinite_in_a_row += 1
    run.notice(f"step {state.step + 1}: non-finite loss or gradients, update skipped "
               f"({state.nonfinite_steps} so far)")
    if run.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
        raise TrainingError(
            f"step {state.step + 1}: {run.nonfinite_in_a_row} non-finite steps in a row; lower train.lr or "
            f"check the data, then resume from the last good checkpoint with --resume {run.run_dir}")


def _step_loss(accelerator, micro_losses: list, grad_norm, signal_received: int | None
               ) -> tuple[float, bool, int | None]:
    """(the step's mean loss on this process, whether any process saw a non-finite micro-batch loss or gradient
    norm, the stop signal any process has received). Both decisions are shared: gradients are all-reduced, so a
    NaN in one process's backward reaches every process's gradients, and all of them must drop the update; and a
    process that stopped alone would leave the others waiting in the next collective. One reduction, one
    device-to-host read for all three numbers."""
    import torch

    losses = torch.stack(micro_losses)
    bad = (~torch.isfinite(losses)).sum().float()
    if grad_norm is not None:
        bad = bad + (~torch.isfinite(grad_norm)).float()
    shared = torch.stack([bad, torch.full_like(bad, float(signal_received or 0))])  # no host-to-device copy
    if accelerator.num_processes > 1:
        shared = accelerator.reduce(shared, reduction="max")
    mean, bad, signum = torch.cat([losses.mean().reshape(1), shared]).tolist()
    return mean, bad > 0, int(signum) or None


def _log(run: Run, window: _Window, progress) -> None:
    """One metrics line: the window's mean loss, speed and data wait, and the last step's lr and gradient norm."""
    elapsed = time.perf_counter() - window.start
    record = {"step": run.state.step, "epoch": run.state.epoch, "loss": window.loss / window.steps,
              "lr": run.scheduler.get_last_lr()[0], "images_per_s": window.images / elapsed,
              "data_wait": window.wait / elapsed,
              "grad_norm": None if window.grad_norm is None else float(window.grad_norm),
              **(run.scst.pop_means() if run.scst is not None else {})}
    progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.1f}")
    _write_on_main(run, run.metrics_path, lambda: append_jsonl(run.metrics_path, record))
    run.accelerator.log({k: v for k, v in record.items() if v is not None}, step=run.state.step)


def _validate(run: Run) -> None:
    """Score the validation split (every process its share); the best CIDEr so far is kept in best/."""
    from med_train.evaluate import evaluate

    t, state = run.cfg.train, run.state
    run.model.eval()
    scores = evaluate(run.raw_model, run.cfg, max_images=t.eval_images, num_beams=1, accelerator=run.accelerator,
                      quiet=True, loader=run.val_loader)
    run.model.train()
    _write_on_main(run, run.metrics_path, lambda: append_jsonl(run.metrics_path, {"step": state.step, "eval": scores}))
    if run.main:
        metric = scores.get("CIDEr")
        if metric is not None and (state.best_metric is None or metric > state.best_metric):
            state.best_metric, state.best_step = metric, state.step
            _write(run, run.run_dir / "best", run.raw_model.save_pretrained)
        run.say(f"step {state.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float)))
    run.accelerator.log({f"eval/{k}": v for k, v in scores.items() if isinstance(v, float)}, step=state.step)


# -- checkpoints: periodic and last (_loop), on a stop signal, and the last weights (_finish)

def _checkpoint(run: Run) -> None:
    save_checkpoint(run.accelerator, run.raw_model, run.run_dir, run.state, run.loader,
                    run.cfg.train.keep_checkpoints)


def _checkpoint_on_stop(run: Run) -> None:
    if run.stop_signal is not None:
        _checkpoint(run)
        run.notice(f"stopped by signal {run.stop_signal} at step {run.state.step}; resume with "
                   f"`med train --resume {run.run_dir}`")


# -- the end

def _finish(run: Run) -> None:
    """Every process's bad rows in one report, the last weights and the curves; the trackers closed."""
    accelerator = run.accelerator
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        everyone = gather_object([run.stats.to_dict()])  # a collective: every process calls it
        if run.main:
            for other in everyone[1:]:
                run.stats.merge(other)
    written = plotted = True
    if run.main:
        written = _write(run, run.run_dir / "model.safetensors", lambda _: run.raw_model.save_pretrained(run.run_dir))
        plotted = _write(run, run.run_dir / "curves.png", lambda path: _plot_curves(run.metrics_path, path))
        run.notice(f"data: {run.stats.summary()}")
    if run.cfg.train.trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    if not written:  # after the barrier: the other processes are done, none waits for this one
        checkpoints = checkpoint_dirs(run.run_dir)
        raise TrainingError(f"the last weights could not be written to {run.run_dir} (said above); "
                            + (f"the last complete checkpoint {checkpoints[-1]} holds step {run.state.step}"
                               if checkpoints else "no checkpoint was kept"))
    if not plotted:
        raise TrainingError(f"{run.run_dir / 'curves.png'} could not be written (said above); the run is complete, "
                            f"its last weights in {run.run_dir}")


def _write_on_main(run: Run, path: Path, write: Callable[[], object]) -> None:
    """A file of the run folder that training cannot go on without, written by the main process while the others
    wait: one that cannot be written stops every process in one line (run_folder.write_on_main)."""
    write_on_main(run.accelerator, run.run_dir, path, write)


def _write(run: Run, path: Path, write: Callable[[Path], object]) -> bool:
    """`write(path)`, a file only the main process writes outside a checkpoint (best/, the last weights, the
    curves): a failure (a full disk, whatever the writer raises) is one line naming the path and the cause, and
    the run goes on to its next checkpoint, which stops it in one line if the disk stays full."""
    try:
        write(path)
    except Exception as err:  # noqa: BLE001 - any writer's error: said, never a traceback
        run.notice(f"warning: could not write {path} ({type(err).__name__}: {first_line(err)})")
        return False
    return True


def _progress(total: int, initial: int, disabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=disabled, unit="step", dynamic_ncols=True)


def _plot_curves(metrics_path: Path, out: Path) -> None:
    """The training loss and each validation metric against the step, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return
    records = [record for _, record in read_jsonl(metrics_path)]
    train_rows = [r for r in records if "loss" in r]
    eval_rows = [r for r in records if "eval" in r]
    names = sorted({k for r in eval_rows for k, v in r["eval"].items() if isinstance(v, float)})
    # CIDEr runs to 10, the other scores to 1; content accuracies (shapes sets) apart, so no colour repeats
    panels = [[n for n in names if n == "CIDEr"], [n for n in names if n != "CIDEr" and not n.startswith("content_")],
              [n for n in names if n.startswith("content_")]]
    panels = [p for p in panels if p]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5 + 5 * len(panels), 4), squeeze=False)
    axes = axes[0]
    axes[0].plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows])
    axes[0].set(title="training loss", xlabel="step")
    for ax, group in zip(axes[1:], panels, strict=True):
        for name in group:
            ax.plot([r["step"] for r in eval_rows], [r["eval"].get(name) for r in eval_rows], marker="o",
                    label=name)
        ax.set(title="content accuracy" if group[0].startswith("content_") else "validation", xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
