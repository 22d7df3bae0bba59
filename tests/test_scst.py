"""Self-critical training: the reward is pycocoevalcap's CIDEr-D with the training split's document frequencies,
the baselines and the loss's sign are as documented, training images come with all their references in every
source format, and `med train` with train.objective scst runs, logs its metrics and resumes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import tiny_model_config
from test_data import (
    add_member,
    held_out_refs,
    png,
    write_blip_json,
    write_imagefolder,
    write_parquet,
    write_webdataset,
)
from test_e2e import TINY
from typer.testing import CliRunner

from med_train.cli import app
from med_train.config import Config, ConfigError, DataConfig, load_config
from med_train.data import build_dataset
from med_train.metrics import ptb_tokenize
from med_train.model import Captioner
from med_train.run_folder import BadFileError, checkpoint_dirs
from med_train.scst import (
    DOC_FREQ_FILE,
    CiderReward,
    SelfCritic,
    baselines,
    no_label_smoothing,
    policy_loss,
    sample_mask,
    training_references,
)
from med_train.sources import clean_caption

runner = CliRunner()
needs_coco = pytest.mark.skipif(importlib.util.find_spec("pycocoevalcap") is None,
                                reason="pycocoevalcap is not installed")

REFERENCES = [
    ["a red circle above a blue square", "the red circle is over a blue square", "red circle, blue square"],
    ["a small green triangle", "one green triangle on the left"],
    ["a large blue square below a red circle", "blue square under a circle"],
    ["two shapes: a dog and a cat on a sofa"],
]
CANDIDATES = ["a red circle above a square", "a green triangle on the left", "a blue square", "a cat on a sofa",
              "red red red", "a large blue square below a red circle"]


# ---- the reward ---------------------------------------------------------------------------------------------------

@needs_coco
def test_reward_is_pycocoevalcaps_cider_with_the_training_document_frequencies():
    """pycocoevalcap counts document frequencies over the references it scores: score every training image, so
    that its references ARE the corpus the reward counts them from; each candidate is tried on every image."""
    from pycocoevalcap.cider.cider import Cider

    reward = CiderReward.of_references(REFERENCES)
    gts = {i: [ptb_tokenize(r) for r in refs] for i, refs in enumerate(REFERENCES)}
    for shift in range(len(CANDIDATES)):
        captions = [CANDIDATES[(i + shift) % len(CANDIDATES)] for i in range(len(REFERENCES))]
        _, expected = Cider().compute_score(gts, {i: [ptb_tokenize(c)] for i, c in enumerate(captions)})
        assert reward(captions, REFERENCES) == pytest.approx(list(expected), abs=1e-9)
    # not the frequencies of the captions being scored: a subset scores differently with its own IDF
    _, subset = Cider().compute_score({0: gts[0], 1: gts[1]}, {0: [ptb_tokenize(CANDIDATES[0])],
                                                               1: [ptb_tokenize(CANDIDATES[1])]})
    assert reward(CANDIDATES[:2], REFERENCES[:2]) != pytest.approx(list(subset), abs=1e-6)


def test_document_frequencies_round_trip_and_a_bad_file_is_one_line(tmp_path):
    reward = CiderReward.of_references(REFERENCES)
    reward.save(tmp_path / DOC_FREQ_FILE)
    again = CiderReward.load(tmp_path / DOC_FREQ_FILE)
    assert again.images == 4 and again.doc_freq == reward.doc_freq
    assert again(CANDIDATES[:4], REFERENCES) == reward(CANDIDATES[:4], REFERENCES)
    (tmp_path / DOC_FREQ_FILE).write_text('{"images": 0, "doc_freq": {}}')
    with pytest.raises(BadFileError, match=f"{DOC_FREQ_FILE}: not CIDEr document frequencies") as err:
        CiderReward.load(tmp_path / DOC_FREQ_FILE)
    assert "\n" not in str(err.value)


def test_baselines_give_the_documented_values():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 0.0]])
    assert torch.allclose(baselines(rewards), torch.tensor([[11 / 3, 10 / 3, 3.0, 2.0], [4 / 3, 4 / 3, 0.0, 4 / 3]]))
    assert baselines(rewards, torch.tensor([0.5, 2.0])).tolist() == [[0.5] * 4, [2.0] * 4]
    assert baselines(torch.tensor([[0.7], [0.2]])).tolist() == [[0.0], [0.0]]  # one sample: no other, baseline 0


def test_the_sample_mask_ends_at_the_first_sep_and_keeps_a_sampled_pad():
    ids = torch.tensor([[30, 5, 0, 7, 102, 0, 0], [30, 5, 6, 7, 8, 9, 10], [30, 102, 102, 0, 0, 0, 0]])
    assert sample_mask(ids, 102).long().tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7, [1, 1, 0, 0, 0, 0, 0]]


def test_policy_loss_averages_over_tokens():
    loss = policy_loss(torch.tensor([-2.0, -4.0]), torch.tensor([1.0, -0.5]), torch.tensor([3, 1]))
    assert float(loss) == pytest.approx(-(1.0 * -2.0 + -0.5 * -4.0) / 4)


# ---- the loss on a tiny model -------------------------------------------------------------------------------------

def _tiny_model(tokenizer, tiny_config):
    torch.manual_seed(0)
    return Captioner(tiny_config, tokenizer, max_caption_tokens=16)


def _sequence_log_probs(model, images, batch) -> torch.Tensor:
    """Each caption's summed token log-probabilities (prompt and padding masked), unsmoothed."""
    with no_label_smoothing(model.text_decoder):
        return -model(images, **batch, reduction="none")


def test_one_step_raises_the_better_sample_and_lowers_the_worse(tokenizer, tiny_config):
    model = _tiny_model(tokenizer, tiny_config)
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).expand(2, -1, -1, -1)
    batch = model.tokenize(["red circle above blue square", "green triangle"])  # two samples of one image
    tokens = (batch["labels"][:, 1:] != -100).sum(1)
    before = _sequence_log_probs(model, images, batch).detach()
    rewards = torch.tensor([[1.2, 0.2]])
    advantages = (rewards - baselines(rewards)).flatten()
    assert advantages.tolist() == pytest.approx([1.0, -1.0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    policy_loss(_sequence_log_probs(model, images, batch), advantages, tokens).backward()
    optimizer.step()
    after = _sequence_log_probs(model, images, batch).detach()
    assert after[0] > before[0] and after[1] < before[1]
    # the sign is the loss's: the opposite advantages move them the other way
    model = _tiny_model(tokenizer, tiny_config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    policy_loss(_sequence_log_probs(model, images, batch), -advantages, tokens).backward()
    optimizer.step()
    flipped = _sequence_log_probs(model, images, batch).detach()
    assert flipped[0] < before[0] and flipped[1] > before[1]


@pytest.mark.parametrize("baseline,samples,xe_weight", [("mean", 1, 0.0), ("mean", 3, 0.5), ("greedy", 2, 0.0)])
def test_the_loss_of_images_with_one_reference_or_several(tokenizer, tiny_config, baseline, samples, xe_weight):
    model = _tiny_model(tokenizer, tiny_config)
    cfg = Config()
    cfg.model = tiny_config
    cfg.generate.max_length, cfg.train.scst.samples = 10, samples
    cfg.train.scst.baseline, cfg.train.scst.xe_weight = baseline, xe_weight
    critic = SelfCritic(cfg, CiderReward.of_references(REFERENCES))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    loss = critic.loss(model, model, images, [["a red circle"], REFERENCES[0]])
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.training and model.text_decoder.label_smoothing == 0.1  # as they were
    means = critic.pop_means()
    assert set(means) == {"reward", "baseline", "sample_length", "entropy"} and critic.pop_means() == {}
    assert 0 < means["sample_length"] <= 10 - model.prompt_length and means["entropy"] > 0
    if baseline == "mean" and samples == 1:
        assert means["baseline"] == 0.0
    elif baseline == "mean":  # the mean of the others' means is the mean reward
        assert means["baseline"] == pytest.approx(means["reward"], abs=1e-6)


# ---- training images with all their references ----------------------------------------------------------------

def _write_repeated_rows(root: Path) -> None:
    """Two rows (three for image 1) showing each image: imagefolder by file name, parquet and webdataset by bytes."""
    rows = [(i, f"caption {j} of image {i}") for i in range(3) for j in range(2 + (i == 1))]
    folder = root / "imagefolder" / "train"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"i{i}.png").write_bytes(png(i))
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"i{i}.png", "caption": c}) + "\n"
                                                   for i, c in rows))
    (root / "parquet").mkdir()
    pq.write_table(pa.table({"image": [{"bytes": png(i), "path": None} for i, _ in rows],
                             "caption": [c for _, c in rows]}), root / "parquet" / "train-00000.parquet")
    (root / "wds" / "train").mkdir(parents=True)
    with tarfile.open(root / "wds" / "train" / "shard-0.tar", "w") as tar:
        for k, (i, c) in enumerate(rows):
            add_member(tar, f"k{k}.png", png(i))
            add_member(tar, f"k{k}.txt", c.encode())


@pytest.fixture(scope="module")
def grouped_sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("grouped")
    cache = str(base / "hf-cache")
    for name, write in (("list_imagefolder", write_imagefolder), ("karpathy", write_blip_json),
                        ("list_webdataset", write_webdataset), ("list_parquet", write_parquet)):
        write(base / name)
    _write_repeated_rows(base / "rows")
    several = {i: sorted(f"caption {j} of image {i}" for j in range(2 + (i == 1))) for i in range(3)}
    lists = {f"t{i}": sorted(clean_caption(c, 30) for c in held_out_refs(i)) for i in range(4)}
    return {  # (config, the split whose images have several references, {image: references})
        "imagefolder captions list": (DataConfig(source=str(base / "list_imagefolder"), cache_dir=cache), "test",
                                      lists),
        "karpathy json": (DataConfig(source=str(base / "karpathy" / "ann" / "blip_{split}.json"),
                                     image_root=str(base / "karpathy"), cache_dir=cache), "test", lists),
        "webdataset json list": (DataConfig(source=str(base / "list_webdataset"), cache_dir=cache), "test", lists),
        "parquet captions list": (DataConfig(source=str(base / "list_parquet"), cache_dir=cache), "test", lists),
        "imagefolder rows": (DataConfig(source=str(base / "rows" / "imagefolder"), cache_dir=cache), "train",
                             several),
        "parquet rows": (DataConfig(source=str(base / "rows" / "parquet"), cache_dir=cache), "train", several),
        "webdataset rows": (DataConfig(source=str(base / "rows" / "wds"), cache_dir=cache), "train", several),
    }


def _reference_sets(examples: list[dict]) -> list[list[str]]:
    return sorted(sorted(e["references"]) for e in examples)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kind", ["imagefolder captions list", "karpathy json", "webdataset json list",
                                  "parquet captions list", "imagefolder rows", "parquet rows", "webdataset rows"])
def test_training_examples_hold_every_reference_of_their_image(grouped_sources, kind, streaming):
    cfg, split, expected = grouped_sources[kind]
    cfg = DataConfig(**{**cfg.__dict__, "streaming": streaming, "train_split": split})
    stream = build_dataset(cfg, split, train=True, image_size=8, epochs=2, per_image=True)
    examples = list(stream)
    assert _reference_sets(examples) == sorted(list(expected.values()) * 2)  # each image once an epoch, all refs
    assert all(e["image"].shape == (3, 8, 8) for e in examples)
    rows = len(expected) if kind.endswith("list") else sum(len(refs) for refs in expected.values())
    assert (stream.stats.rows, stream.stats.bad) == (2 * rows, 0)  # the source rows read, each counted once
    assert sorted(sorted(refs) for refs in training_references(cfg, split)) == sorted(expected.values())
    if not streaming:
        assert stream.epoch_size() == len(expected)


# ---- config -------------------------------------------------------------------------------------------------------

def test_scst_without_model_init_is_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        load_config("configs/shapes.yaml", ["train.objective=scst"])
    message = str(err.value)
    assert "train.objective" in message and "model.init" in message and "\n" not in message
    with pytest.raises(ConfigError, match="did you mean 'train.scst.samples'"):
        load_config("configs/shapes.yaml", ["model.init=runs/x", "train.scst.sample=3"])
    cfg = load_config("configs/shapes.yaml", ["model.init=runs/x", "train.objective=scst"])
    assert (cfg.train.scst.samples, cfg.train.scst.baseline, cfg.train.scst.xe_weight) == (5, "mean", 0.0)


# ---- through the CLI ----------------------------------------------------------------------------------------------

def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def scst_run(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("scst")
    assert runner.invoke(app, ["data", "shapes", str(root / "shapes"), "--train", "16", "--val", "0", "--test", "2",
                               "--seed", "2"]).exit_code == 0
    metadata = root / "shapes" / "train" / "metadata.jsonl"  # a second phrasing of some images: several references
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    extra = [{**r, "id": r["id"] + "-b", "caption": "a picture with " + r["caption"]} for r in rows[::2]]
    metadata.write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
    config = {**TINY, "data": {**TINY["data"], "source": str(root / "shapes")},
              "train": {**TINY["train"], "max_steps": 4, "batch_size": 4, "eval_every": 0, "eval_images": 2,
                        "save_every": 2},
              "generate": {**TINY["generate"], "max_length": 10, "num_beams": 1}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)  # a model folder to start from: TINY's sizes (tiny_model_config), random weights
    Captioner(tiny_model_config(), tokenizer, max_caption_tokens=16).save_pretrained(root / "init")
    result = runner.invoke(app, ["train", str(root / "tiny.yaml"), "--output-dir", str(root / "runs"),
                                 "--set", "train.run_name=sc", "--set", "train.objective=scst",
                                 "--set", f"model.init={root / 'init'}",
                                 "--set", "train.scst.samples=3",
                                 "--set", "train.lr=1e-4"])
    assert result.exit_code == 0, result.output
    return root / "runs" / "sc"


def test_scst_trains_from_a_run_and_logs_its_metrics(scst_run):
    records = [r for r in _metrics(scst_run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"reward", "baseline", "sample_length", "entropy"} <= set(r)
        assert r["reward"] >= 0 and r["entropy"] > 0 and 0 < r["sample_length"] <= 6
    assert [r["step"] for r in _metrics(scst_run) if "eval" in r] == [4]
    saved = json.loads((scst_run / DOC_FREQ_FILE).read_text())
    held_out = len(json.loads((scst_run / "val_holdout.json").read_text())["keys"])
    assert saved["images"] == 16 - held_out  # one document per training image, however many rows show it
    assert (scst_run / "best" / "model.safetensors").is_file()


def test_scst_resumes_with_the_losses_of_an_uninterrupted_run(scst_run):
    copy = scst_run.parent / "sc-resumed"
    shutil.copytree(scst_run, copy)
    shutil.rmtree(checkpoint_dirs(copy)[-1])  # as if killed after the step-2 checkpoint
    frequencies = (copy / DOC_FREQ_FILE).stat().st_mtime_ns
    result = runner.invoke(app, ["train", "--resume", str(copy)])
    assert result.exit_code == 0, result.output
    want = {r["step"]: r for r in _metrics(scst_run) if "loss" in r}
    got = [r for r in _metrics(copy) if "loss" in r]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for r in got:
        assert r["loss"] == pytest.approx(want[r["step"]]["loss"], abs=1e-5)
        assert r["reward"] == pytest.approx(want[r["step"]]["reward"], abs=1e-6)
    assert (copy / DOC_FREQ_FILE).stat().st_mtime_ns == frequencies  # reused, not counted again
    assert os.path.isdir(copy / "best")

