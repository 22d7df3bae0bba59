"""int8 captioning on the CPU: every Linear of a captioner (the ViT's, the decoder's, the LM head) with int8 weights
and int8 activations quantised at each call (dynamic quantisation, torch's own `quantize_dynamic`): a scale per
output channel for the weights, one per call for the activations.

    model = quantize(Captioner.from_pretrained("runs/x/best"))   # in place: a model for captioning only
    captions = model.generate(images, num_beams=3)

Why torch.ao's `quantize_dynamic` and not torchao's `Int8DynamicActivationInt8WeightConfig`: on this project's CPU
(AVX-512 VNNI EPYC, one thread) torch's kernels ran the bench's products 3 to 5x faster than fp32 and torchao's at
best 1.5x (a ViT-B batch's fc2, 4616 x 3072 -> 768: fp32 292 ms, torchao 292, torch.ao 67; the LM head for a
beam-3 step, 24 x 768 -> 30524: 40, 59 and 7.3 ms). Embeddings, LayerNorms, attention and the patch projection
stay in fp32.

Captioning the bench's batch (8 images, ViT-B/16 at 224 px + BERT-base, max length 20), one thread, CPU seconds
(medians of 5, alternating): greedy fp32 4.42, int8 2.28 (1.9x); beam 3: 4.71 and 2.16 (2.2x). The ViT gains most
(3x); decoding about breaks even, the fast paths' fp32 decoding being as quick as int8 through the modules. On the
demo's model (shapes, 200 test images, greedy) 22 captions of 200 changed, CIDEr 4.525 -> 4.508, content_exact
0.45 both.

The quantised modules have no float weight: the model runs its modules as written (timm's own ViT blocks, the
decoder's modules), never the speed-only paths of `med_train.fast`, which leaves a quantised model as it is.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from med_train import med

CPU_ONLY = ("int8 is for captioning on the CPU (torch's int8 products run there only); on a GPU use bf16 or fp16, "
            "which it computes faster")


def int8_problem(device) -> str | None:
    """Why a model on `device` cannot caption in int8, or None where it can."""
    return None if torch.device(device).type == "cpu" else CPU_ONLY


def quantize(model: nn.Module) -> nn.Module:
    """`model` (a Captioner on the CPU) with its Linear layers in int8, in place, in eval mode. The model can no
    longer train (its projections have no float weights): quantise a model loaded for captioning, or a copy."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    problem = int8_problem(next(model.parameters()).device)
    if problem:
        raise ValueError(problem)
    if model.__dict__.get("fast_paths") is not None and model.fast_paths.pieces:
        raise ValueError("int8 quantises a plain model: quantise it before med_train.fast.prepare, not after")
    model.eval()
    with warnings.catch_warnings():
        # torch.ao.quantization and its qint8 tensors are deprecated for torchao, whose CPU int8 products were 3 to
        # 5x slower here (above): the warnings would tell every `--precision int8` user about a choice made for them
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    for module in model.modules():
        if type(module) is med.BertLMPredictionHead:
            module.__class__ = _Int8Head
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether `quantize` has turned `model`'s Linear layers to int8."""
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    return any(isinstance(m, Int8Linear) for m in model.modules())


class _Int8Head(med.BertLMPredictionHead):
    """The LM head with its projection run as a module (a quantised one has no float weight to hand F.linear)."""

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states)) + self.bias
