"""Shared fixtures: a tokenizer trained on the fly and a tiny captioner config (everything offline, on the CPU)."""

import os

import pytest
import torch

from med_train.config import ModelConfig, TextConfig, VisionConfig
from med_train.fast import few_rows
from med_train.tokenizer import train_tokenizer

# Every fast path on, unmeasured, unless the run says otherwise (MED_FAST=0: `make test`'s second pass): the tests
# see every route whatever this machine's calibration would choose; the calibration has tests of its own.
os.environ.setdefault("MED_FAST", "1")

# The CPU decoding kernel, built once per test run as `med eval` and `med caption` build it before decoding:
# the tests that need it skip only where it cannot be built (`few_rows.missing()`).
few_rows.build()

WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "small", "large", "above", "below", "and",
         "picture", "of", "the", "left", "right", "dog", "cat", "on", "sofa"]


@pytest.fixture(scope="session")
def tokenizer():
    g = torch.Generator().manual_seed(0)
    captions = ["a picture of " + " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g))
                for _ in range(300)]
    return train_tokenizer(captions, vocab_size=200)


def tiny_model_config(**text) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(name="vit_tiny_patch16_224", image_size=32,
                            kwargs=dict(patch_size=8, embed_dim=48, depth=2, num_heads=3)),
        text=TextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, **text),
    )


@pytest.fixture
def tiny_config():
    return tiny_model_config()
