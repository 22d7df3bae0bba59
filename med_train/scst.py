"""Self-critical sequence training (SCST, Rennie et al. 2017; the mean-of-others baseline of Luo 2020): fine-tune a
trained captioner on the CIDEr-D of its own samples.

    med train configs/x.yaml --set train.objective=scst --set model.init=runs/xe/best --set train.lr=1e-5

Each step, for every training image (one example per image with all its references: data.CaptionStream's
`per_image`), `train.scst.samples` captions are sampled from the model's own distribution (temperature 1, no top-p
or top-k, no minimum length: the samples come from the distribution whose log-probabilities are trained; the
prompt kept; generate.max_length), without gradients. Each is scored with CIDEr-D against the image's references,
with document frequencies from the training split's references (computed once per run, DOC_FREQ_FILE in the run
folder, reused on resume). A sample's baseline is the mean reward of the image's other samples ("mean"; with one
sample there are none, and the baseline is 0: plain REINFORCE), or the reward of the image's greedy caption
("greedy", decoded with generate.min_length and generate.repetition_penalty, as validation decodes). One
teacher-forced forward through the training model gives the samples' log-probabilities (no label smoothing), and

    loss = -sum_i (reward_i - baseline_i) * sum_t log p(token_it)  /  sum_i tokens_i

over the samples i and their sampled tokens t ([SEP] included; prompt and padding masked). With
`train.scst.xe_weight` w > 0 the same forward also reads the image's references, and w times their mean token
cross-entropy (without label smoothing too) is added.

The training forward takes images, not image features, so the ViT runs once per sample and reference there.
The metrics line gains `reward`, `baseline` (means over the samples), `sample_length` (tokens after the prompt,
[SEP] included) and `entropy`: the mean per-token entropy of the teacher-forced distribution at the sampled
positions; all of this process's micro-batches since the last line.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from med_train import decode
from med_train.config import Config, DataConfig
from med_train.metrics import cider_d_per_image, cider_doc_freq, ptb_tokenize
from med_train.run_folder import BadFileError, atomic_write, read_json, write_on_main
from med_train.sources import (
    BadRow,
    DataError,
    Holdout,
    clean_captions,
    image_key,
    image_root,
    iter_table,
    open_split,
    parse_row,
)

DOC_FREQ_FILE = "cider_doc_freq.json"
NGRAMS = 4


# ---- the reward -------------------------------------------------------------------------------------------------

@dataclass
class CiderReward:
    """CIDEr-D of captions against their image's references, with the document frequencies of a fixed corpus (the
    training split's references) instead of those of the captions being scored."""

    doc_freq: Mapping[tuple, int]
    images: int  # the corpus's images: the IDF's log(images)

    def __call__(self, captions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
        """Raw captions, raw references (a list per caption; the same list object may repeat, and is tokenised
        once)."""
        tokenised: dict[int, list[str]] = {}
        for refs in references:
            if id(refs) not in tokenised:
                tokenised[id(refs)] = [ptb_tokenize(r) for r in refs]
        preds = {i: ptb_tokenize(c) for i, c in enumerate(captions)}
        refs_of = {i: tokenised[id(refs)] for i, refs in enumerate(references)}
        scores = cider_d_per_image(preds, refs_of, NGRAMS, doc_freq=self.doc_freq, num_images=self.images)
        return [scores[i] for i in range(len(captions))]

    @classmethod
    def of_references(cls, reference_sets: Sequence[Sequence[str]]) -> CiderReward:
        """From raw reference lists, one per image."""
        tokenised = [[ptb_tokenize(r) for r in refs] for refs in reference_sets]
        return cls(cider_doc_freq(tokenised, NGRAMS), len(tokenised))

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps({"images": self.images, "ngrams": NGRAMS, "doc_freq": {
            " ".join(gram): count for gram, count in sorted(self.doc_freq.items())}}) + "\n")

    @classmethod
    def load(cls, path: Path) -> CiderReward:
        data = read_json(path, "CIDEr document frequencies")
        if (not isinstance(data, dict) or not isinstance(data.get("images"), int) or data["images"] < 1
                or data.get("ngrams") != NGRAMS or not isinstance(data.get("doc_freq"), dict)):
            raise BadFileError(path, f"not CIDEr document frequencies (images >= 1, ngrams {NGRAMS}, doc_freq); "
                                     "delete it to count them again")
        return cls(Counter({tuple(gram.split(" ")): int(n) for gram, n in data["doc_freq"].items()}), data["images"])


def training_references(cfg: DataConfig, split: str, holdout: Holdout | None = None) -> list[list[str]]:
    """The cleaned references of each image of `split` (rows grouped by sources.image_key, as training groups
    them), without those `holdout` sets aside; images not decoded, bad rows left out."""
    images: dict[str, list[str]] = {}
    root = image_root(cfg)
    for label, raw in iter_table(open_split(cfg, split), split):
        row = parse_row(raw, cfg, label, root)
        if holdout is not None and row in holdout:
            continue
        try:
            captions = clean_captions(row.captions, cfg.max_words)
        except BadRow:
            continue
        images.setdefault(image_key(row), []).extend(captions)
    return list(images.values())


def run_reward(cfg: Config, run_dir: Path, holdout: Holdout | None, accelerator, say) -> CiderReward:
    """The run's reward: its document frequencies counted by the main process into the run folder the first time,
    read from there by every process (and on resume)."""
    path = Path(run_dir) / DOC_FREQ_FILE

    def count() -> None:
        if path.is_file():  # a resumed run's
            return
        reward = CiderReward.of_references(training_references(cfg.data, cfg.data.train_split, holdout))
        if not reward.images:
            raise DataError(f"train.objective scst: {cfg.data.source!r} [{cfg.data.train_split}] has no usable "
                            "caption to score samples against")
        reward.save(path)
        say(f"scst: CIDEr-D document frequencies of {reward.images} training images in {path}")

    write_on_main(accelerator, run_dir, path, count)  # a failure there stops every process in one line
    return CiderReward.load(path)


def baselines(rewards: torch.Tensor, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's baseline, rewards (B, K) -> (B, K): the greedy caption's reward of its image (greedy (B,)),
    else the mean reward of the image's other K - 1 samples (0 when K is 1: no other sample)."""
    if greedy is not None:
        return greedy[:, None].expand_as(rewards)
    k = rewards.shape[1]
    if k == 1:
        return torch.zeros_like(rewards)
    return (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def policy_loss(token_log_probs_sum: torch.Tensor, advantages: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-sum_i advantage_i * (sum of sample i's token log-probabilities) / all samples' tokens. (N,) each."""
    return -(advantages.detach() * token_log_probs_sum).sum() / tokens.sum().clamp(min=1)


# ---- a step -----------------------------------------------------------------------------------------------------

def sample_mask(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(N, L) True up to and including each row's first [SEP] (all of a row without one): a sampled [PAD] inside
    a caption is a token like any other, so the mask cannot be `ids != pad`."""
    is_eos = ids == eos_token_id
    return (is_eos.long().cumsum(1) - is_eos.long()) == 0


@contextmanager
def no_label_smoothing(decoder):
    """The policy gradient needs the samples' own log-probabilities, not a smoothed loss."""
    kept = decoder.label_smoothing
    decoder.label_smoothing = 0.0
    try:
        yield
    finally:
        decoder.label_smoothing = kept


@dataclass
class SelfCritic:
    """SCST's loss for a batch of images with their references; sums its statistics for the metrics line."""

    cfg: Config
    reward: CiderReward
    sums: dict = field(default_factory=dict)

    def loss(self, model, raw_model, images: torch.Tensor, references: list[list[str]]) -> torch.Tensor:
        """`model`: what the training forward calls (accelerate's wrapper: gradients are synchronised there);
        `raw_model`: the Captioner itself, which samples. images (B, 3, H, W) on the device."""
        s, tokenizer = self.cfg.train.scst, raw_model.tokenizer
        k, prompt_len = s.samples, raw_model.prompt_length
        ids, image_embeds, greedy = self._sample(raw_model, images)
        captions = _texts(tokenizer, ids, prompt_len)
        per_sample_refs = [refs for refs in references for _ in range(k)]
        rewards = torch.tensor(self.reward(captions, per_sample_refs)).view(-1, k)
        greedy_rewards = None if greedy is None else torch.tensor(
            self.reward(_texts(tokenizer, greedy, prompt_len), references))
        base = baselines(rewards, greedy_rewards)
        mask = sample_mask(ids, tokenizer.sep_token_id)
        labels = ids.masked_fill(~mask, -100)
        labels[:, :prompt_len] = -100
        rows = {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}
        n = ids.shape[0]
        image_rows = torch.arange(images.shape[0], device=images.device).repeat_interleave(k)
        if s.xe_weight > 0:
            refs = raw_model.tokenize([r for refs in references for r in refs])
            rows = {key: _cat_padded(rows[key], refs[key], -100 if key == "labels" else 0) for key in rows}
            image_rows = torch.cat([image_rows, torch.arange(images.shape[0], device=images.device)
                                    .repeat_interleave(torch.tensor([len(r) for r in references],
                                                                    device=images.device))])
        with no_label_smoothing(raw_model.text_decoder):
            nll = model(images[image_rows], **rows, reduction="none")  # (rows,) summed over each row's targets
        tokens = (rows["labels"][:, 1:] != -100).sum(1)
        advantages = (rewards - base).flatten().to(nll.device)
        loss = policy_loss(-nll[:n], advantages, tokens[:n])
        if s.xe_weight > 0:
            loss = loss + s.xe_weight * nll[n:].sum() / tokens[n:].sum().clamp(min=1)
        self._add({"reward": rewards.mean(), "baseline": base.mean(), "sample_length": (mask[:, prompt_len:]).sum(1)
                   .float().mean(), "entropy": _entropy(raw_model, ids, mask, labels, image_embeds, k)})
        return loss

    @torch.no_grad()
    def _sample(self, raw_model, images):
        """(K samples per image (B*K, L), the image features (B, 1+N, D), the greedy captions (B, L) or None),
        decoded in eval mode (no dropout) by the decoder's own decoding paths (fast ones where prepared)."""
        g, s = self.cfg.generate, self.cfg.train.scst
        was_training = raw_model.training
        raw_model.eval()
        try:
            image_embeds = raw_model.encode_images(images)  # once per image; the samples share its features
            common = dict(eos_token_id=raw_model.tokenizer.sep_token_id, pad_token_id=raw_model.tokenizer.pad_token_id,
                          max_length=g.max_length, cuda_graphs=None if g.cuda_graphs else False)
            ids = decode.generate(raw_model.text_decoder, image_embeds.repeat_interleave(s.samples, 0),
                                  raw_model.prompt_ids, do_sample=True, top_p=1.0, top_k=0, temperature=1.0,
                                  min_length=0, **common)
            greedy = None if s.baseline != "greedy" else decode.generate(
                raw_model.text_decoder, image_embeds, raw_model.prompt_ids, num_beams=1, min_length=g.min_length,
                repetition_penalty=g.repetition_penalty, **common)
        finally:
            raw_model.train(was_training)
        return ids, image_embeds, greedy

    def _add(self, values: dict) -> None:
        for name, value in values.items():
            total, count = self.sums.get(name, (0.0, 0))
            self.sums[name] = (total + value.detach().float(), count + 1)

    def pop_means(self) -> dict:
        """The means since the last call, for the metrics line (read from the device here, once per line)."""
        means = {name: float(total) / count for name, (total, count) in self.sums.items()}
        self.sums = {}
        return means


@torch.no_grad()
def _entropy(raw_model, ids, mask, labels, image_embeds, k: int) -> torch.Tensor:
    """The mean entropy of the teacher-forced next-token distributions at the sampled positions."""
    logits = raw_model.text_decoder(ids, attention_mask=mask.long(), return_logits=True,
                                    encoder_hidden_states=image_embeds.repeat_interleave(k, 0)).float()
    log_p = logits.log_softmax(-1)  # (N, L-1, V)
    entropy = -(log_p.exp() * log_p).sum(-1)
    targets = labels[:, 1:] != -100
    return (entropy * targets).sum() / targets.sum().clamp(min=1)


def _texts(tokenizer, ids: torch.Tensor, prompt_len: int) -> list[str]:
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids[:, prompt_len:].tolist()]


def _cat_padded(a: torch.Tensor, b: torch.Tensor, pad: int) -> torch.Tensor:
    """Rows of (N, La) and (M, Lb) as one (N + M, max(La, Lb)), right-padded with `pad`."""
    length = max(a.shape[1], b.shape[1])
    a, b = (torch.nn.functional.pad(t.to(a.device), (0, length - t.shape[1]), value=pad) for t in (a, b))
    return torch.cat([a, b])
