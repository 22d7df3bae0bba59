"""The run folder: what it holds, its name, runs/latest, and checkpoints written whole or not at all.

A run folder describes itself (med_train.train writes it):
    runs/<name>/config.yaml             the resolved config
    runs/<name>/run.json                the run's length in steps (counted from train.epochs when that is set)
    runs/<name>/val_holdout.json        the training images held out for validation, when the source has no
                                        data.val_split (the rule, the seed and the image keys)
    runs/<name>/med_config.json, tokenizer files, model.safetensors      the last model (Captioner.from_pretrained)
    runs/<name>/best/                   the model with the best validation CIDEr (data.val_split, not the
                                        reported data.eval_split)
    runs/<name>/checkpoints/step_N/     model, optimizer, scheduler, scaler, RNG, data position, trainer state
                                        (trainer_state.json: step, epoch, best metric and the mixed precision
                                        the run used: the config's train.mixed_precision, else the launcher's)
    runs/<name>/metrics.jsonl           one line per logging step and per evaluation
    runs/<name>/curves.png              loss and metric curves
and runs/latest points at the newest run. A new run that fails before its first step is removed, and runs/latest
points back where it pointed before (discard_run).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from med_train.config import Config

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
RUN_FILE = "run.json"  # the resolved length of the run: max_steps (counted from train.epochs when that is set)
HOLDOUT_FILE = "val_holdout.json"  # the validation images held out of the training split, when it came to that
METRICS_FILE = "metrics.jsonl"


class TrainingError(RuntimeError):
    """Training cannot go on (the message says why and how to resume)."""


@dataclass
class TrainerState:
    """What a checkpoint needs beyond accelerate's state: where we are and what we have seen."""

    step: int = 0
    epoch: int = 0  # the data epoch (the slowest dataloader worker's)
    best_metric: float | None = None
    best_step: int | None = None
    nonfinite_steps: int = 0
    mixed_precision: str | None = None  # the precision used (train.choose_precision); None in older checkpoints
    data: dict = field(default_factory=dict)  # the dataloader's state_dict


# ---- its name and runs/latest ----------------------------------------------------------------------------------

def new_run_dir(cfg: Config, config_path: str | Path | None) -> Path:
    stem = Path(config_path).stem if config_path else "run"
    name = cfg.train.run_name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.train.output_dir) / name
    suffix = 1
    while run_dir.exists():  # two runs started in the same second
        suffix += 1
        run_dir = Path(cfg.train.output_dir) / f"{name}-{suffix}"
    return run_dir


def point_latest(run_dir: Path) -> None:
    """runs/latest -> the newest run (a relative symlink, replaced atomically)."""
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, latest)


def latest_target(output_dir: Path) -> str | None:
    """What runs/latest points at now (None: no runs/latest)."""
    latest = output_dir / "latest"
    return os.readlink(latest) if latest.is_symlink() else None


def discard_run(run_dir: Path, latest_before: str | None) -> None:
    """Remove a run that failed before its first step, and point runs/latest back where it pointed before."""
    shutil.rmtree(run_dir, ignore_errors=True)
    latest = run_dir.parent / "latest"
    if latest.is_symlink() and os.readlink(latest) == run_dir.name:
        latest.unlink()
        if latest_before is not None:
            latest.symlink_to(latest_before)


def resolve_run(path: str | Path | None, output_dir: str | Path = "runs") -> Path:
    """A run folder or model directory given by the user, or runs/latest when none is given."""
    if path is None:
        latest = Path(output_dir) / "latest"
        if not latest.exists():
            raise FileNotFoundError(f"no model given and no {latest}: train one first, e.g. "
                                    f"`med train configs/shapes.yaml`, or pass --model DIR")
        return latest.resolve()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder or model directory")
    return path.resolve()


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A checkpoint is complete once renamed from its temporary name, so a
    half-written one (killed mid-write) is never listed."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


# ---- checkpoints and the metrics log ---------------------------------------------------------------------------

class _TiedHeadNotice(logging.Filter):
    """accelerate's `save_state` drops tensors that share storage from the safetensors file and says so, every
    checkpoint. For the LM head, tied to the word embeddings, that is expected: the tie is made again when the
    model is built, before its state is loaded (resuming is tested). Other shared tensors are still reported."""

    NOTICE = "Removed shared tensor {'text_decoder.cls.predictions.decoder.weight'} while saving"

    def filter(self, record: logging.LogRecord) -> bool:
        return self.NOTICE not in record.getMessage()  # after "[RANK n] "


logging.getLogger("accelerate.utils.other").addFilter(_TiedHeadNotice())


def save_checkpoint(accelerator, model, run_dir: Path, state: TrainerState, loader, keep: int) -> None:
    """Write into a temporary folder, then rename: a checkpoint exists whole or not at all. A failed write (full
    disk, unwritable folder), in any process, stops every process with a clear error and leaves the previous
    checkpoints intact: after each phase the processes agree on whether all of them succeeded, so none is left
    waiting for one that gave up."""
    root = run_dir / CHECKPOINTS
    final = root / f"step_{state.step}"
    tmp = root / f".tmp_step_{state.step}"
    if final.exists():  # already saved at this step (e.g. a signal right after a periodic save)
        return
    state.data = loader.state_dict()  # on every process: it gathers the positions of all of them
    main = accelerator.is_main_process
    error: OSError | None = None

    def phase(work) -> bool:  # every process calls it, in the same order: True when no process has failed
        nonlocal error
        try:
            work()
        except OSError as err:
            error = err
        return _no_process_failed(accelerator, error)

    def prepare() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)

    def publish() -> None:  # once every process's files are in
        if main:
            (tmp / STATE_FILE).write_text(json.dumps(state.__dict__))
            _fsync_tree(tmp)
            os.replace(tmp, final)
            for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            model.save_pretrained(run_dir)  # the last weights, loadable alone

    if phase(prepare) and phase(lambda: accelerator.save_state(str(tmp))) and phase(publish):
        return
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = checkpoint_dirs(run_dir)
    cause = (f"{error.strerror or error}" if error is not None
             else "another process could not write its part; its error names the cause")
    raise TrainingError(
        f"could not write checkpoint {final} ({cause}); "
        + (f"the previous checkpoint {previous[-1]} is intact: free space or fix the folder, then "
           f"`med train --resume {run_dir}`" if previous else "no earlier checkpoint exists")) from error


def _no_process_failed(accelerator, error: BaseException | None) -> bool:
    """A barrier that also tells every process whether any of them passed it with an error."""
    import torch

    failed = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    return float(accelerator.reduce(failed, reduction="sum")) == 0.0


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop the lines logged after the checkpoint so no step appears twice."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
