"""`med bench`: a quick run through the real CLI, and the measuring pieces on their own."""

import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from med_train.bench import bert_layout_tokenizer, format_table, interleaved, peak_increase
from med_train.cli import app
from med_train.fast import calibrate, cpu, few_rows

runner = CliRunner()
GLIBC = platform.libc_ver()[0] == "glibc"
PAIRS = ("train", "greedy", "beam3", "greedy_decode", "beam3_decode")


def test_quick_bench_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:  # one thread: steady on a shared machine
        result = runner.invoke(app, ["bench", "--quick", "--threads", "1", "--json", "--json-out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert "greedy captions identical: yes" in result.stderr  # the table; stdout holds the document alone
    figures = json.loads(out.read_text())
    assert json.loads(result.stdout) == figures

    for label in PAIRS:
        rates = figures[f"{label}_images_per_s"]
        assert all(math.isfinite(rates[side]) and rates[side] > 0 for side in ("ours", "peer")), label
        assert figures[f"{label}_speedup"] == pytest.approx(rates["ours"] / rates["peer"], rel=0.01), label
    memory, static = figures["train_memory_mb"], figures["train_weights_and_state_mb"]
    # a steady-state step: the weights and AdamW's two moments (the same on both sides) plus what the step adds
    assert static["ours"] == pytest.approx(static["peer"], rel=0.01)
    assert memory["ours"] > static["ours"] > 0 and memory["peer"] > static["peer"]
    assert figures["memory_ratio"] == pytest.approx(memory["ours"] / memory["peer"], rel=0.01)

    # same weights and the same batch reached both models: equal first-step losses and greedy captions
    losses = figures["train_loss_first_step"]
    assert losses["ours"] == pytest.approx(losses["peer"], abs=1e-4)
    assert figures["greedy_captions_identical"] and figures["greedy_mismatches"] == []
    assert figures["greedy_decode_captions_identical"]
    assert 0.0 <= figures["beam3_captions_same_fraction"] <= 1.0

    gflop, rate = figures["train_gflop_per_image"], figures["matmul_gflops"]
    assert gflop > 0 and rate > 0
    assert figures["matmul_fraction"] == pytest.approx(gflop * figures["train_images_per_s"]["ours"] / rate,
                                                       rel=0.05, abs=1e-3)
    assert figures["data_images_per_s"] > 0
    assert figures["data_headroom"] == pytest.approx(
        figures["data_images_per_s"] / figures["train_images_per_s"]["ours"], rel=0.02)
    assert figures["mfu"] is None and figures["time_to_quality_bar"] is None  # CPU; measured elsewhere

    machine, settings = figures["machine"], figures["settings"]
    assert machine["torch"] == torch.__version__ and machine["torch_threads"] == 1 and machine["cpu"]
    assert machine["device_name"].startswith("cpu")
    assert machine["freed_memory_kept"] == GLIBC
    assert machine["few_row_kernel"] == few_rows.available()
    assert ("decodes with the few-row kernel" in format_table(figures)) == few_rows.available()
    assert settings["batch_size"] == 4 and settings["vocab_size"] == 402 and settings["quick"]
    assert settings["optimizer"]["peer"] == "AdamW fused"

    # the CPU in words at the top of the report, and each fast path's verdict as chosen in the run
    assert figures["cpu"].startswith(f"{cpu.model_name()}: {cpu.capability()}, ")
    report = result.stderr.splitlines()
    header = next(i for i, line in enumerate(report) if line.startswith("med bench: "))
    assert report[header + 1] == f"cpu: {figures['cpu']}"
    assert figures["fast_paths"] == [asdict(v) for v in calibrate.verdicts()]
    figures["fast_paths"] = [dict(key="packed linear (8, 768)", fast=True, plain_s=2e-3, fast_s=1.5e-3,
                                  source="measured"),
                             dict(key="few-row kernel", fast=False, plain_s=None, fast_s=None, source="MED_FAST=0")]
    table = format_table(figures)
    assert "fast path packed linear (8, 768): on (1.5 ms against plain 2 ms, measured)" in table
    assert "fast path few-row kernel: off (MED_FAST=0)" in table


def test_interleaved_alternates_the_order_and_reports_medians():
    calls = []

    def side(name, seconds):
        def call():
            calls.append(name)
            time.sleep(seconds)
        return call

    medians = interleaved({"ours": side("ours", 0.002), "peer": side("peer", 0.03)}, reps=3, device="cpu")
    assert calls == ["ours", "peer"] + ["ours", "peer", "peer", "ours", "ours", "peer"]
    assert 0.002 <= medians["ours"] < 0.03 <= medians["peer"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_peak_increase_sees_a_short_lived_allocation():
    def allocate():
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, resident, then freed
        return float(block[-1])

    grown = peak_increase(allocate, "cpu")
    assert grown is not None and grown >= 60 * 2**20
    assert peak_increase(lambda: None, "cpu") < 16 * 2**20


REUSE_FAULTS = """
import resource, sys, torch
from med_train.train import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()

def step():  # activations kept through a forward, then freed in reverse with a gradient-sized temporary each
    kept = []
    for _ in range(6):
        kept += [torch.ones(2**20 + 4096), torch.ones(4 * 2**20 + 1024)]  # about 4 and 16 MiB
    while kept:
        grad = torch.ones(4 * 2**20 + 1024)
        del kept[-2:], grad

step()  # the first step grows the heap
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_keep_freed_memory_reuses_blocks_without_page_faults():
    """Steady-state steps reuse the freed blocks in place: they fault in a small fraction of the pages they use,
    where glibc's defaults hand the large blocks back and fault pages in again (on this VM 9,500 to 54,000 faults a
    step from run to run, as glibc's adaptive thresholds and huge pages fall; kept: 110 to 1,400)."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", REUSE_FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    floats_per_step = 6 * (2**20 + 4096 + 4 * 2**20 + 1024) + 6 * (4 * 2**20 + 1024)  # REUSE_FAULTS's blocks
    pages = 3 * floats_per_step * 4 // 4096  # what three steps would fault in if nothing were reused
    default, kept = faults("default"), faults("keep")
    assert kept < pages / 20, (kept, pages)
    assert default > 4 * kept, (default, kept)  # the defaults do fault blocks in again


def test_bert_layout_tokenizer_has_berts_ids(tmp_path):
    tok = bert_layout_tokenizer(tmp_path, 30522, ["picture", "red", "circle"])
    assert len(tok) == 30524
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0, 100, 101, 102, 103)
    assert (tok.bos_token_id, tok.enc_token_id) == (30522, 30523)
    ids = tok("a picture of a red circle")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a picture of a red circle"
    with pytest.raises(ValueError, match="vocab_size"):
        bert_layout_tokenizer(tmp_path / "small", 50, [])


def test_bench_refuses_an_unknown_device_and_a_missing_config(tmp_path):
    result = runner.invoke(app, ["bench", "--device", "tpu"])
    assert result.exit_code == 2 and "Invalid value for '--device'" in result.output and "'tpu'" in result.output
    result = runner.invoke(app, ["bench", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml" in result.output
