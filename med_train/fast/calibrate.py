"""A fast path taken where it is measured faster on this machine: `faster(key, plain, fast)` times the two
callables (one warm-up call each, then pairs in alternating order) and says whether `fast` wins by MARGIN in
the median and in most pairs; a tie keeps the plain path. The caller runs both on the shapes it will use and
names them in `key`.

    if calibrate.faster(f"packed linear {tuple(x.shape)} {x.dtype}", lambda: plain(x), lambda: packed(x)):
        ...

A verdict is measured once per machine: kept for the process and in $XDG_CACHE_HOME/med_train/fast_paths.json
(default ~/.cache/med_train), under the CPU (model and capability), torch's version, torch's thread count and
`key`, unless its timings were too noisy to stand for the machine (a busy moment: the next process measures
again). A cache that cannot be read or written costs a new measurement and one warning, never a failure; deleting
the file makes every path measured again.
MED_FAST=0 turns every measured path off, MED_FAST=1 on, without measuring (routes forced for tests and figures).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import torch

from med_train.fast import cpu

MARGIN = 0.03  # fast must take at most 97% of plain's time (median over pairs) ...
WINS = 0.75  # ... and be faster in this fraction of the pairs: noise alone must not switch a route
BUDGET_S = 0.3  # timed pairs stop once this is spent (one warm-up call each comes first, a last pair may overrun)
MIN_PAIRS, MAX_PAIRS = 2, 50  # two pairs see both orders; past fifty the median barely moves
NOISY = 0.25  # timings spread wider than this (`_spread`) hold for this process only: not stored for later ones
MIN_TIMING_S = 1e-3  # a timing groups calls until it lasts about this long: a single tiny call is mostly timer


@dataclass(frozen=True)
class Verdict:
    key: str
    fast: bool
    plain_s: float | None  # median seconds per call; None where MED_FAST chose
    fast_s: float | None
    source: str  # "measured", "measured, noisy" (not stored), "cached" (an earlier process's), "MED_FAST=0"/"=1"


_verdicts: dict[str, Verdict] = {}  # this process's, by full key
_warned = False


def forced() -> bool | None:
    """MED_FAST's choice for every fast path: False (0), True (1) or None (unset: measure)."""
    value = os.environ.get("MED_FAST", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"MED_FAST must be 0 (fast paths off), 1 (on) or unset (measured), not {value!r}")
    return None if value == "" else value == "1"


def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(root) if os.path.isabs(root) else Path.home() / ".cache") / "med_train" / "fast_paths.json"


def full_key(key: str) -> str:
    """What a measurement holds for: this CPU, torch build and thread count, and the caller's shapes."""
    return (f"{cpu.model_name()} | {cpu.capability()} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads | {key}")


def faster(key: str, plain: Callable[[], object], fast: Callable[[], object], *, budget_s: float = BUDGET_S) -> bool:
    """Whether `fast` is measured faster than `plain` here (MED_FAST aside); the verdict is cached, see above."""
    name, choice = full_key(key), forced()
    if choice is not None:
        _verdicts[name] = Verdict(key, choice, None, None, f"MED_FAST={int(choice)}")
        return choice
    verdict = _verdicts.get(name)
    if verdict is None or verdict.plain_s is None:
        verdict = _read(key, name) or _measure(key, plain, fast, budget_s)
        if verdict.source == "measured":
            _write(name, verdict)
        _verdicts[name] = verdict
    return verdict.fast


def verdicts() -> list[Verdict]:
    """What this process chose, in the order first asked."""
    return list(_verdicts.values())


def clear() -> None:
    """Forget this process's verdicts (the cache file stays)."""
    _verdicts.clear()


def _measure(key: str, plain: Callable[[], object], fast: Callable[[], object], budget_s: float) -> Verdict:
    start = perf_counter()
    plain(), fast()  # first calls pack weights, build kernels, fill caches: never timed
    calls = max(1, math.ceil(MIN_TIMING_S / max((perf_counter() - start) / 2, 1e-9)))  # warm-up overestimates: fewer
    times: dict[str, list[float]] = {"plain": [], "fast": []}
    order = [("plain", plain), ("fast", fast)]
    deadline = perf_counter() + budget_s
    while len(times["fast"]) < MAX_PAIRS and (len(times["fast"]) < MIN_PAIRS or perf_counter() < deadline):
        for side, fn in order:
            t0 = perf_counter()
            for _ in range(calls):
                fn()
            times[side].append((perf_counter() - t0) / calls)
        order.reverse()  # whichever runs second in a pair may find warmer caches: both get that turn
    # Each pair ran close in time: its ratio cancels a load that drifts, and fast must win most pairs, not just
    # the median, so that a burst of load during the plain calls does not switch a route.
    ratios = [f / p for f, p in zip(times["fast"], times["plain"], strict=True)]
    wins = sum(r < 1 for r in ratios) >= WINS * len(ratios)
    noisy = max(_spread(times["plain"]), _spread(times["fast"])) > NOISY
    return Verdict(key, wins and statistics.median(ratios) <= 1 - MARGIN, statistics.median(times["plain"]),
                   statistics.median(times["fast"]), "measured, noisy" if noisy else "measured")


def _spread(seconds: list[float]) -> float:
    """The interquartile range over the median (2 CPUs under a load of 3, a 512-square product: 0.06 to 1.1)."""
    low, _, high = statistics.quantiles(seconds, n=4)
    return (high - low) / statistics.median(seconds)


def _load() -> dict:
    """The cache file's verdicts by full key; {} where it is missing, and (with a warning) where it is unreadable."""
    path = cache_file()
    try:
        document = json.loads(path.read_text())
        if not isinstance(document, dict) or not isinstance(document.get("verdicts"), dict):
            raise ValueError("not an object with 'verdicts'")
        return document["verdicts"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        _warn(f"the fast-path cache {path} cannot be read ({err}); measuring again")
        return {}


def _read(key: str, name: str) -> Verdict | None:
    entry = _load().get(name)
    if entry is None:
        return None
    try:
        if not isinstance(entry["fast"], bool):
            raise TypeError("'fast' is not true or false")
        return Verdict(key, entry["fast"], float(entry["plain_s"]), float(entry["fast_s"]), "cached")
    except (TypeError, KeyError, ValueError):
        _warn(f"the fast-path cache {cache_file()} holds a malformed entry for {key!r}; measuring again")
        return None


def _write(name: str, verdict: Verdict) -> None:
    """Adds the verdict to the cache file, written whole to a temporary file and renamed over it, so that a
    process reading it (another rank, a second command) sees the old file or the new one, never a part."""
    path = cache_file()
    entry = {"fast": verdict.fast, "plain_s": verdict.plain_s, "fast_s": verdict.fast_s}
    document = {"format": 1, "verdicts": {**_load(), name: entry}}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".fast_paths-", delete=False) as tmp:
            json.dump(document, tmp, indent=1, sort_keys=True)
        os.replace(tmp.name, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp.name).unlink(missing_ok=True)
        _warn(f"the fast-path cache {path} cannot be written ({err}); this process keeps its verdicts in memory")


def _warn(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=2)
