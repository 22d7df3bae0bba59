"""`fast.calibrate`: the measured choice between a plain and a fast path, its caches and MED_FAST."""

import itertools
import json
import subprocess
import sys
import time

import pytest
import torch

from med_train.fast import calibrate, cpu


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """An empty cache folder, MED_FAST unset, no verdicts and no warning given yet."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MED_FAST", raising=False)
    monkeypatch.setattr(calibrate, "_warned", False)
    calibrate.clear()
    yield
    calibrate.clear()


class Clock:
    """A fake perf_counter that only the callables move: timings exact, tests instant and never flaky."""

    def __init__(self):
        self.now, self.calls = 0.0, []

    def __call__(self):
        return self.now

    def work(self, name, *seconds):
        """A callable taking these seconds, in turn (the first for the warm-up call)."""
        durations = itertools.cycle(seconds)

        def call():
            self.calls.append(name)
            self.now += next(durations)
        return call


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(calibrate, "perf_counter", fake)
    return fake


def never(*_):
    raise AssertionError("measured, where a verdict should have been reused or forced")


@pytest.mark.parametrize("fast_s, chosen", [(0.5e-3, True), (0.96e-3, True), (0.98e-3, False), (1e-3, False),
                                            (2e-3, False)])
def test_fast_is_chosen_only_when_faster_by_the_margin(clock, fast_s, chosen):
    assert calibrate.faster("k", clock.work("plain", 1e-3), clock.work("fast", fast_s)) is chosen
    (verdict,) = calibrate.verdicts()
    assert (verdict.key, verdict.fast, verdict.source) == ("k", chosen, "measured")
    assert verdict.plain_s == pytest.approx(1e-3) and verdict.fast_s == pytest.approx(fast_s)


@pytest.mark.parametrize("fast_ms, chosen", [((1, 1, 3), False), ((1, 1, 1, 1, 3), True)])
def test_fast_must_win_most_pairs_not_only_the_median(clock, fast_ms, chosen):
    """Fast wins some pairs by half and loses the others: the median ratio is 0.5 either way, but two wins in
    three could be a burst of load during some plain calls; four in five is taken as a real difference."""
    fast = clock.work("fast", *(ms * 1e-3 for ms in fast_ms))
    assert calibrate.faster("k", clock.work("plain", 2e-3), fast) is chosen


def test_noisy_timings_hold_for_this_process_only(clock):
    assert calibrate.faster("k", clock.work("plain", 2e-3, 4e-3), clock.work("fast", 1e-3))
    (verdict,) = calibrate.verdicts()
    assert verdict.source == "measured, noisy" and not calibrate.cache_file().exists()
    assert calibrate.faster("k", never, never)  # kept in memory
    calibrate.clear()
    clock.calls.clear()
    assert calibrate.faster("k", clock.work("plain", 1e-3), clock.work("fast", 0.5e-3))  # quiet now: stored
    assert clock.calls and calibrate.cache_file().exists()


def test_real_timings_pick_the_plainly_faster_side():
    def sleeper(seconds):
        return lambda: time.sleep(seconds)

    assert calibrate.faster("fast wins", sleeper(0.02), sleeper(0.001), budget_s=0.05)
    assert not calibrate.faster("plain wins", sleeper(0.001), sleeper(0.02), budget_s=0.05)
    first, second = calibrate.verdicts()
    assert first.plain_s > 0.02 > first.fast_s > 0.001 and second.plain_s < 0.02 < second.fast_s


def test_warm_up_first_then_pairs_in_alternating_order(clock):
    calibrate.faster("k", clock.work("plain", 0.1), clock.work("fast", 0.1), budget_s=0.3)
    # slow calls: the two pairs that see both orders, then the budget is spent
    assert clock.calls == ["plain", "fast"] + ["plain", "fast", "fast", "plain"]


def test_the_cost_is_bounded_by_the_budget_and_tiny_calls_are_grouped(clock):
    calibrate.faster("ms", clock.work("plain", 1e-3), clock.work("fast", 1e-3), budget_s=0.05)
    assert 0.05 <= clock.now <= 0.05 + 4e-3  # warm-up, then pairs until the budget, the last one overrunning
    clock.calls.clear()
    calibrate.faster("us", clock.work("plain", 1e-6), clock.work("fast", 1e-6))
    assert len(clock.calls) == 2 + 2 * calibrate.MAX_PAIRS * 1000  # each timing groups 1 ms worth of calls
    assert calibrate.verdicts()[-1].plain_s == pytest.approx(1e-6)


def test_a_verdict_is_kept_in_memory_and_on_disk(clock, tmp_path):
    assert calibrate.faster("k", clock.work("plain", 2**-9), clock.work("fast", 2**-10))  # exact sums
    assert calibrate.faster("k", never, never)  # the same process: not measured again
    stored = json.loads((tmp_path / "cache" / "med_train" / "fast_paths.json").read_text())
    assert stored["format"] == 1
    assert stored["verdicts"] == {calibrate.full_key("k"): {"fast": True, "plain_s": 2**-9, "fast_s": 2**-10}}
    name = calibrate.full_key("k")
    assert cpu.model_name() in name and cpu.capability() in name and torch.__version__ in name

    calibrate.clear()  # as a new process would start
    assert calibrate.faster("k", never, never)
    (verdict,) = calibrate.verdicts()
    assert (verdict.fast, verdict.plain_s, verdict.fast_s, verdict.source) == (True, 2**-9, 2**-10, "cached")
    assert not calibrate.faster("other", clock.work("plain", 1e-3), clock.work("fast", 1e-3))  # another key
    assert len(json.loads(calibrate.cache_file().read_text())["verdicts"]) == 2


SECOND_PROCESS = """
import sys, torch
from med_train.fast import calibrate
torch.set_num_threads(int(sys.argv[1]))
def never():
    raise AssertionError("measured again")
print(calibrate.faster("k", never, never), calibrate.verdicts()[0].source)
"""


def test_a_second_process_reuses_the_verdict(clock):
    calibrate.faster("k", clock.work("plain", 2e-3), clock.work("fast", 1e-3))
    out = subprocess.run([sys.executable, "-c", SECOND_PROCESS, str(torch.get_num_threads())],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "cached"]


def test_another_thread_count_or_cpu_is_measured_again(clock, monkeypatch):
    threads = torch.get_num_threads()
    calibrate.faster("k", clock.work("plain", 2e-3), clock.work("fast", 1e-3))
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert not calibrate.faster("k", clock.work("plain", 1e-3), clock.work("fast", 2e-3))
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(cpu, "capability", lambda: "AVX2")
    clock.calls.clear()
    assert not calibrate.faster("k", clock.work("plain", 1e-3), clock.work("fast", 2e-3))
    assert clock.calls
    assert [v.fast for v in calibrate.verdicts()] == [True, False, False]
    assert len(json.loads(calibrate.cache_file().read_text())["verdicts"]) == 3


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"verdicts": 3}', "\xff\xfe"])
def test_an_unreadable_cache_file_is_measured_again_with_one_warning(clock, content):
    path = calibrate.cache_file()
    path.parent.mkdir(parents=True)
    path.write_bytes(content.encode("latin-1"))
    with pytest.warns(RuntimeWarning, match="cannot be read") as caught:
        assert calibrate.faster("k", clock.work("plain", 2e-3), clock.work("fast", 1e-3))
    assert len(caught) == 1 and str(path) in str(caught[0].message)
    assert json.loads(path.read_text())["verdicts"][calibrate.full_key("k")]["fast"] is True  # replaced


def test_a_malformed_entry_is_measured_again(clock):
    path = calibrate.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": 1, "verdicts": {calibrate.full_key("k"): {"fast": "yes"}}}))
    with pytest.warns(RuntimeWarning, match="malformed entry for 'k'"):
        assert calibrate.faster("k", clock.work("plain", 2e-3), clock.work("fast", 1e-3))
    assert clock.calls


def test_an_unusable_cache_folder_still_gives_verdicts_and_warns_once(clock, tmp_path, monkeypatch):
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a file"))  # its med_train folder cannot be made
    with pytest.warns(RuntimeWarning, match="fast-path cache .*a file.* cannot be") as caught:
        assert calibrate.faster("k", clock.work("plain", 2e-3), clock.work("fast", 1e-3))
        assert not calibrate.faster("j", clock.work("plain", 1e-3), clock.work("fast", 2e-3))
        assert calibrate.faster("k", never, never)  # still kept in memory
    assert len(caught) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file"]


def test_a_failed_write_keeps_the_verdict_and_leaves_no_partial_file(clock, monkeypatch):
    def disk_full(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(calibrate.json, "dump", disk_full)
    with pytest.warns(RuntimeWarning, match="cannot be written .*No space left") as caught:
        assert calibrate.faster("k", clock.work("plain", 2e-3), clock.work("fast", 1e-3))
    assert len(caught) == 1
    assert list(calibrate.cache_file().parent.iterdir()) == []  # the temporary file is gone, no cache file made
    assert calibrate.faster("k", never, never)


def test_med_fast_forces_every_path_without_measuring(tmp_path, monkeypatch):
    monkeypatch.setenv("MED_FAST", "0")
    assert calibrate.faster("k", never, never) is False
    monkeypatch.setenv("MED_FAST", "1")
    assert calibrate.faster("k", never, never) is True
    assert [(v.key, v.fast, v.plain_s, v.source) for v in calibrate.verdicts()] == [("k", True, None, "MED_FAST=1")]
    assert not calibrate.cache_file().exists()  # a forced route is no measurement: nothing stored
    monkeypatch.setenv("MED_FAST", "yes")
    with pytest.raises(ValueError, match="MED_FAST must be 0 .* not 'yes'"):
        calibrate.faster("k", never, never)


def test_a_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert calibrate.cache_file() == tmp_path / ".cache" / "med_train" / "fast_paths.json"
