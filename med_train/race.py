"""Time to quality: med_train against transformers' BLIP trained with the same sizes, recipe and batches.

    med race configs/shapes.yaml --budget 600 --json race.json

Both models are built at the config's sizes (the peer is `BlipForConditionalGeneration` with a plain ViT of the
same width, depth, heads, patch and image size, and the same decoder), see the same batches (one batch is fetched,
then each model takes its step on it), use the same optimizer settings and loss (prompt masked, label smoothing),
and each gets the same wall-clock budget of training time (one untimed warm-up step aside). Each model's cosine
schedule spans the steps it can take in that budget (measured over a few calibration steps), so neither is cut
off mid-schedule. Steps alternate, and so does which model goes first on a batch, so noise from a shared machine
hits both alike. Every `eval_every_s` seconds of its own training time a model captions the held-out images
greedily and is scored (CIDEr, BLEU-4, content scores); evaluation time is not training time. The result: each
model's scores over time and the time it first met QUALITY_BAR (None if never).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from med_train.config import Config
from med_train.model import normalize_images

# The demo's quality bar (issue: the demo and its quality), on the shapes test split, greedy.
QUALITY_BAR = {"CIDEr": 3.5, "Bleu_4": 0.55, "content_colour": 0.9, "content_size": 0.8, "content_shape": 0.6,
               "content_position": 0.4, "content_exact": 0.15}


def meets_bar(scores: dict) -> bool:
    return all(scores.get(k, float("-inf")) >= v for k, v in QUALITY_BAR.items())


class PeerCaptioner(nn.Module):
    """transformers' BLIP behind the small interface `evaluate` uses (generate, image_mean_std, cfg, tokenizer)."""

    def __init__(self, cfg, tokenizer, mean_std):
        from transformers import BlipConfig, BlipForConditionalGeneration, BlipTextConfig, BlipVisionConfig

        super().__init__()
        self.cfg, self.tokenizer, self._mean_std = cfg, tokenizer, mean_std
        v, t, kw = cfg.vision, cfg.text, cfg.vision.kwargs
        if not {"embed_dim", "depth", "num_heads", "patch_size"} <= set(kw):
            raise ValueError("the race needs model.vision.kwargs with embed_dim, depth, num_heads and patch_size")
        self.hf = BlipForConditionalGeneration(BlipConfig(
            text_config=BlipTextConfig(
                vocab_size=len(tokenizer), hidden_size=t.hidden_size, encoder_hidden_size=kw["embed_dim"],
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                num_attention_heads=t.num_attention_heads, max_position_embeddings=t.max_position_embeddings,
                hidden_dropout_prob=t.hidden_dropout_prob, attention_probs_dropout_prob=t.attention_probs_dropout_prob,
                label_smoothing=t.label_smoothing, bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id,
                eos_token_id=tokenizer.sep_token_id),
            vision_config=BlipVisionConfig(
                hidden_size=kw["embed_dim"], intermediate_size=4 * kw["embed_dim"], num_hidden_layers=kw["depth"],
                num_attention_heads=kw["num_heads"], image_size=v.image_size, patch_size=kw["patch_size"],
                layer_norm_eps=1e-6)))
        prompt = torch.tensor(tokenizer(cfg.prompt)["input_ids"][:-1])
        prompt[0] = tokenizer.bos_token_id
        self.register_buffer("prompt_ids", prompt, persistent=False)

    @property
    def device(self):
        return self.prompt_ids.device

    def image_mean_std(self):
        return self._mean_std

    def pixels(self, images):
        return normalize_images(images, *self._mean_std)  # the same float pixels ours computes

    def forward(self, images, *, input_ids, attention_mask, labels):
        return self.hf(pixel_values=self.pixels(images), input_ids=input_ids, attention_mask=attention_mask,
                       labels=labels).loss

    @torch.no_grad()
    def generate(self, images, *, num_beams=1, max_length=20, min_length=5, **_):
        prompt = self.prompt_ids.expand(images.shape[0], -1).clone()
        ids = self.hf.generate(pixel_values=self.pixels(images), input_ids=prompt, num_beams=num_beams,
                               max_length=max_length, min_length=min_length, do_sample=False)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids[:, prompt.shape[1]:]]


def race(cfg: Config, *, budget_s: float = 600.0, eval_every_s: float = 120.0, eval_images: int = 200,
         calibration_steps: int = 10, say=print) -> dict:
    from med_train import data as data_lib
    from med_train.evaluate import evaluate
    from med_train.model import Captioner
    from med_train.tokenizer import build_tokenizer
    from med_train.train import build_optimizer, lr_factor

    torch.manual_seed(cfg.train.seed)
    tokenizer = build_tokenizer(cfg.tokenizer, (cfg.model.prompt + c for c in
                                                data_lib.iter_captions(cfg.data, cfg.data.train_split)))
    ours = Captioner(cfg.model, tokenizer, max_caption_tokens=cfg.tokenizer.max_length)
    peer = PeerCaptioner(cfg.model, tokenizer, ours.image_mean_std())
    models = {"med_train": ours, "transformers": peer}
    loader = data_lib.build_dataloader(
        cfg.data, cfg.data.train_split, train=True, batch_size=cfg.train.batch_size,
        image_size=cfg.model.vision.image_size, tokenizer=tokenizer, prompt=cfg.model.prompt,
        max_length=cfg.tokenizer.max_length, seed=cfg.train.seed)
    batches = iter(loader)
    optimizers = {name: build_optimizer(m, cfg, "cpu") for name, m in models.items()}

    def step(name, batch, scheduler=None):
        model, optimizer = models[name], optimizers[name]
        start = time.perf_counter()
        loss = model(batch["images"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"])
        loss.backward()
        if cfg.train.clip_grad_norm:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        return time.perf_counter() - start, float(loss.detach())

    # calibration: step times at the warm-up learning rate, then each model's schedule fits its budget
    def order(i):  # who goes first on a batch alternates: the first to touch a fresh batch pays for it
        return list(models) if i % 2 == 0 else list(reversed(models))

    spent = {name: 0.0 for name in models}
    warm = next(batches)
    for name in models:  # one untimed step each: first-call costs are not step times
        step(name, warm)
    for i in range(calibration_steps):
        batch = next(batches)
        for name in order(i):
            spent[name] += step(name, batch)[0]
    step_s = {name: spent[name] / calibration_steps for name in models}
    schedules = {}
    for name, optimizer in optimizers.items():
        steps = max(cfg.train.warmup_steps + 1, int(budget_s / step_s[name]) - calibration_steps)
        own = replace(cfg, train=replace(cfg.train, max_steps=steps))
        schedules[name] = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, c=own: lr_factor(s, c))
        say(f"{name}: {step_s[name] * 1000:.0f} ms/step, about {steps} more steps in {budget_s:.0f} s")

    results = {name: {"step_s": step_s[name], "curve": [], "time_to_bar_s": None} for name in models}
    next_eval = dict.fromkeys(models, eval_every_s)
    steps_done = dict.fromkeys(models, calibration_steps + 1)
    last_loss = dict.fromkeys(models, float("nan"))

    def score(name):
        model = models[name].eval()
        scores = evaluate(model, cfg, max_images=eval_images, num_beams=1, quiet=True)
        model.train()
        point = {"train_s": round(spent[name], 1), "steps": steps_done[name], "loss": last_loss[name], **scores}
        results[name]["curve"].append(point)
        if results[name]["time_to_bar_s"] is None and meets_bar(scores):
            results[name]["time_to_bar_s"] = point["train_s"]
        say(f"{name} @ {spent[name]:.0f}s: loss {last_loss[name]:.3f}, CIDEr {scores.get('CIDEr', 0):.2f}, "
            f"exact {scores.get('content_exact', 0):.2f}, position {scores.get('content_position', 0):.2f}")

    i = 0
    while any(spent[n] < budget_s for n in models):
        batch = next(batches)
        i += 1
        for name in order(i):
            if spent[name] >= budget_s:
                continue
            seconds, last_loss[name] = step(name, batch, schedules[name])
            spent[name] += seconds
            steps_done[name] += 1
            if spent[name] >= next_eval[name] and spent[name] < budget_s:
                next_eval[name] += eval_every_s
                score(name)
    for name in models:  # the final score, at the end of the budget
        score(name)
    ours_t, peer_t = (results[n]["time_to_bar_s"] for n in models)
    results["time_to_bar_ratio"] = (ours_t / peer_t) if ours_t and peer_t else None
    results["budget_s"] = budget_s
    results["final"] = {name: results[name]["curve"][-1] for name in models}
    return results


def format_race(results: dict) -> str:
    keys = ["CIDEr", "Bleu_4", *[k for k in QUALITY_BAR if k.startswith("content_")]]
    lines = [f"{'':14}" + "".join(f"{k.removeprefix('content_'):>10}" for k in keys) + f"{'to bar':>10}"]
    for name in ("med_train", "transformers"):
        final = results["final"][name]
        to_bar = results[name]["time_to_bar_s"]
        lines.append(f"{name:14}" + "".join(f"{final.get(k, float('nan')):10.3f}" for k in keys)
                     + (f"{to_bar:9.0f}s" if to_bar else f"{'not met':>10}"))
    lines.append(f"{'bar':14}" + "".join(f"{QUALITY_BAR.get(k, float('nan')):10.2f}" for k in keys))
    return "\n".join(lines)


def write_race(results: dict, path: str | Path) -> None:
    import json

    Path(path).write_text(json.dumps(results, indent=2))
