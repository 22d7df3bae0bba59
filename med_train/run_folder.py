"""The run folder: what it holds, its name, runs/latest, and checkpoints written whole or not at all.

A run folder describes itself (med_train.train writes it):
    runs/<name>/config.yaml             the resolved config
    runs/<name>/run.json                the run's length in steps (counted from train.epochs when that is set)
    runs/<name>/val_holdout.json        the training images held out for validation, when the source has no
                                        data.val_split (the rule, the seed and the image keys)
    runs/<name>/med_config.json, tokenizer files, model.safetensors      the last model (Captioner.from_pretrained)
    runs/<name>/best/                   the model with the best validation CIDEr (data.val_split, not the
                                        reported data.eval_split)
    runs/<name>/checkpoints/step_N/     model (weights, med_config.json, tokenizer: a model directory too),
                                        optimizer, scheduler, scaler, RNG, data position, trainer state
                                        (trainer_state.json: step, epoch, best metric and the mixed precision
                                        the run used: the config's train.mixed_precision, else the launcher's)
    runs/<name>/metrics.jsonl           one line per logging step and per evaluation
    runs/<name>/curves.png              loss and metric curves
and runs/latest points at the newest run: the last to claim its folder (new_run_dir), whichever writes its files
first. A new run that fails before its first step is removed, and runs/latest points back where it pointed before
(discard_run).

Every file is written whole or not at all (`atomic_path`: a temporary file beside it, flushed to disk, then renamed
over it), and metrics.jsonl is appended a whole line at a time, so a run killed at any moment leaves files that
load. A checkpoint holds everything a resume reads (its med_config.json and tokenizer files too). A file that
cannot be used is a `BadFileError`: one line that starts with the file's name.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


class BadFileError(ValueError):
    """A file that cannot be used: empty, truncated, corrupt, of another model, or holding pickled code. The message
    is one line that starts with the file's name."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)


class UntrustedFileError(BadFileError, pickle.UnpicklingError):
    """A pickle that would run code when loaded: refused, never run (an UnpicklingError too, as torch's is)."""


def first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def load_pickled(path: str | Path, load=None, **kwargs):
    """`torch.load(path, weights_only=True)` (or accelerate's `load`, which also takes numpy's RNG state, still
    weights only), with a `BadFileError` for a missing, truncated or corrupt file and an `UntrustedFileError` for
    one that holds code: weights_only refuses every global it does not know, so the code never runs."""
    import torch

    if load is None:
        load, kwargs = torch.load, {"weights_only": True, **kwargs}
    if not Path(path).is_file():
        raise BadFileError(path, "no such file")
    try:
        return load(path, **kwargs)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise BadFileError(path, f"corrupt ({first_line(err)})") from None
        refused = next((line.split("Unsupported global:", 1)[1].split(" was not", 1)[0].strip()
                        for line in str(err).splitlines() if "Unsupported global:" in line), "unknown content")
        raise UntrustedFileError(path, f"refused: it holds pickled code ({refused}), which loading would run; "
                                       "only tensors and plain data are read") from None
    except EOFError:
        raise BadFileError(path, "empty or cut short") from None
    except (RuntimeError, ValueError, OSError) as err:  # torch's zip reader: truncated or not a torch file
        raise BadFileError(path, f"unreadable ({first_line(err)})") from None


def read_json(path: str | Path, what: str):
    """The JSON document in `path`; a `BadFileError` when it is missing, empty or not JSON."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise BadFileError(path, f"no such file; {what} expected") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BadFileError(path, f"unreadable ({first_line(err)})") from None
    if not text.strip():
        raise BadFileError(path, f"empty (a write cut short?); {what} expected")
    try:
        return json.loads(text)
    except ValueError as err:
        raise BadFileError(path, f"not valid JSON ({err}); {what} expected") from None


# ---- writing files whole ---------------------------------------------------------------------------------------

@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for the caller to write; when the block ends, that file is flushed to disk
    and renamed over `path`, so every reader (and every later run, after a kill or a power cut) sees the old file
    or the new one, never a part. On an error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Replace `path` by `data` (text as UTF-8) whole (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """`tokenizer.save_pretrained(folder)`, each file replaced whole: they are written into a temporary folder
    first, then each is renamed into `folder`."""
    folder = Path(folder)
    staging = folder / ".tokenizer.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer.save_pretrained(str(staging))
        for part in sorted(staging.iterdir()):
            _fsync(part)
            os.replace(part, folder / part.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _fsync(folder)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (its renames), to disk. Folders cannot be opened for that on Windows."""
    if path.is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """A new, empty run folder, claimed, and runs/latest pointed at it: train.run_name, else CONFIG-DATE-TIME, with
    -2, -3, ... when that name is taken. The folder is made with an exclusive mkdir, so two runs started at once (in
    the same second, or with the same train.run_name) never share one, even on one another's heels; runs/latest
    moves as the folder is claimed, so that it names the run started last, not the one that wrote its files last."""
    root = Path(cfg.train.output_dir)
    stem = Path(config_path).stem if config_path else "run"
    name = cfg.train.run_name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    root.mkdir(parents=True, exist_ok=True)
    run_dir, suffix = root / name, 1
    while True:
        try:
            run_dir.mkdir()
        except FileExistsError:
            suffix += 1
            run_dir = root / f"{name}-{suffix}"
            continue
        point_latest(run_dir)
        return run_dir


def point_latest(run_dir: Path) -> None:
    """runs/latest -> the newest run (a relative symlink, replaced atomically). The temporary link is named after
    the run, whose folder is claimed: runs started at once, in threads or processes, never share it."""
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{run_dir.name}"
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
    disk, unwritable folder; whatever the writer raises: OSError, torch.save's RuntimeError, safetensors'
    SafetensorError), in any process, stops every process with a one-line TrainingError and leaves the previous
    checkpoints intact: after each phase the processes agree on whether all of them succeeded, so none is left
    waiting for one that gave up."""
    root = run_dir / CHECKPOINTS
    final = root / f"step_{state.step}"
    tmp = root / f".tmp_step_{state.step}"
    if final.exists():  # already saved at this step (e.g. a signal right after a periodic save)
        return
    state.data = loader.state_dict()  # on every process: it gathers the positions of all of them
    main = accelerator.is_main_process
    error: Exception | None = None

    def phase(work) -> bool:  # every process calls it, in the same order: True when no process has failed
        nonlocal error
        try:
            work()
        except Exception as err:  # noqa: BLE001 - any writer's error: every process must hear of it, then stop
            error = err
        return _no_process_failed(accelerator, error)

    def prepare() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)

    def publish() -> None:  # once every process's files are in
        if main:
            (tmp / STATE_FILE).write_text(json.dumps(state.__dict__))
            model.save_pretrained(tmp, weights=False)  # the model's config and tokenizer: a resume reads them here
            _fsync_tree(tmp)
            os.replace(tmp, final)
            _fsync(root)
            for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            model.save_pretrained(run_dir)  # the last weights, loadable alone

    if phase(prepare) and phase(lambda: accelerator.save_state(str(tmp))) and phase(publish):
        return
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = checkpoint_dirs(run_dir)
    cause = (_write_failure(error) + _space_note(root, previous) if error is not None
             else "another process could not write its part; its error names the cause")
    raise TrainingError(f"could not write checkpoint {final} ({cause}); {_resume_hint(run_dir, previous)}") from error


def write_on_main(accelerator, run_dir: Path, path: Path, write: Callable[[], object]) -> None:
    """`write()` in the main process: a file of the run folder outside a checkpoint (a metrics line, run.json, the
    run's config and tokenizer). Every process calls it at the same point, and it is a barrier. A failed write (a
    full disk; whatever the writer raises) stops every process with a one-line TrainingError naming the file and
    the cause, agreed as a failed checkpoint is (`_no_process_failed`), so that no process is left waiting for the
    main process in the next step; the last checkpoint is untouched."""
    error: Exception | None = None
    if accelerator.is_main_process:
        try:
            write()
        except Exception as err:  # noqa: BLE001 - any writer's error: every process must hear of it, then stop
            error = err
    if _no_process_failed(accelerator, error):
        return
    cause = _write_failure(error) if error is not None else "the main process could not; its error names the cause"
    raise TrainingError(f"could not write {path} ({cause}); {_resume_hint(run_dir, checkpoint_dirs(run_dir))}"
                        ) from error


def _resume_hint(run_dir: Path, previous: list[Path]) -> str:
    return (f"the last complete checkpoint {previous[-1]} is intact: free space or fix the folder, then "
            f"`med train --resume {run_dir}`" if previous else "no earlier checkpoint exists")


def _write_failure(err: Exception) -> str:
    """What stopped a write, in words: an OSError's reason (and file), any other writer's type and first line."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror + (f": {err.filename}" if err.filename else "")
    return f"{type(err).__name__}: {first_line(err)}"


def _space_note(root: Path, previous: list[Path]) -> str:
    """A hint when the disk is the likely cause, which some writers do not say (torch.save: "file write failed"):
    less space free than the last checkpoint took."""
    try:
        free = shutil.disk_usage(root if root.exists() else root.parent).free
        needed = sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file()) if previous else 0
    except OSError:
        return ""
    if free >= needed:
        return ""
    return f"; {free / 2**20:.1f} MB free there, the last checkpoint took {needed / 2**20:.1f} MB"


def _no_process_failed(accelerator, error: BaseException | None) -> bool:
    """A barrier that also tells every process whether any of them passed it with an error."""
    import torch

    failed = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    return float(accelerator.reduce(failed, reduction="sum")) == 0.0


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            _fsync(path)


def append_jsonl(path: Path, record: dict) -> None:
    """One line, on disk before this returns. A run killed mid-append leaves at most a torn last line, which
    `read_jsonl` leaves out."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for each whole record of the metrics log; a torn line (a kill mid-append) is left out."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            kept.append((line, record))
    return kept


def truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop the lines logged after the checkpoint (and a torn last line), so that every step
    appears once: the resumed run logs them again."""
    if path.exists():
        atomic_write(path, "".join(line + "\n" for line, record in read_jsonl(path) if record["step"] <= step))


# ---- resuming --------------------------------------------------------------------------------------------------

def last_checkpoint(run_dir: Path) -> Path:
    done = checkpoint_dirs(run_dir)
    if not done:
        raise TrainingError(f"{run_dir}: no complete checkpoint to resume from")
    return done[-1]


def read_trainer_state(checkpoint: Path) -> TrainerState:
    path = checkpoint / STATE_FILE
    fields = read_json(path, "the trainer state")
    try:
        return TrainerState(**fields)
    except TypeError as err:
        raise BadFileError(path, f"not a trainer state ({err})") from None


def restore_checkpoint(accelerator, model, checkpoint: Path, warn) -> None:
    """`accelerator.load_state(checkpoint)`, with the part that cannot be restored named. A bad model, optimizer,
    scheduler or scaler file stops the resume (`BadFileError`); so does a random state that holds pickled code.
    A random state that is missing or unreadable, which accelerate skips in silence, is said in a warning: the run
    goes on with other random numbers (augmentations, dropout), its data order unchanged."""
    from accelerate.utils import load

    rng = checkpoint / f"random_states_{accelerator.process_index}.pkl"
    try:
        load_pickled(rng, load)
    except UntrustedFileError:
        raise
    except BadFileError as err:
        warn(f"warning: {err}: the random state is not restored; the run goes on with other random numbers")
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as err:  # noqa: BLE001 - whatever accelerate raised, name the file at fault
        _blame_a_file(checkpoint, model, err)


def _blame_a_file(checkpoint: Path, model, err: Exception):
    """Raise a `BadFileError` for the first part of `checkpoint` that cannot be read or does not fit `model`; a
    `TrainingError` with accelerate's first line when every file reads."""
    from accelerate.utils import load

    from med_train.model import WEIGHTS_NAME, check_weights

    check_weights(model, checkpoint / WEIGHTS_NAME)
    for name in ("optimizer.bin", "scheduler.bin", "scaler.pt"):
        if name != "scaler.pt" or (checkpoint / name).exists():
            load_pickled(checkpoint / name, load, map_location="cpu")
    raise TrainingError(f"{checkpoint}: cannot restore this checkpoint ({first_line(err)})") from err
