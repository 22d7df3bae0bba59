"""Every speed-only piece of med_train, behind one door:

    from med_train import fast
    fast.prepare(model, device, "decode")   # or "train": once, before the first forward on `device`

`prepare` changes a model in place, keeping its parameters, state-dict keys and results (to float rounding):
its linears become `ops.FastLinear`s (oneDNN products with prepacked weights in CPU inference, owned by each module
and freed when it trains again), the ViT's blocks `vit.LeanBlock`s and the decoder's layers `decoder.LeanLayer`s
(fused training ops that keep one activation where autograd keeps two; fused element-wise passes in a CPU
decoding step), the decoder a `decoder.SparseTiedDecoder`
on the CPU (the padding skipped, a sparse embedding gradient), and the decoder's decoding a
`decoding.FastDecoding` (the few-row C++ kernel, folded cross-attention and a history cache on the CPU, CUDA
graphs on a GPU). The routes that are only faster on some CPUs are chosen by measuring them on this one
(`choose_routes`).

The model files (`med.py`, `decode.py`, `model.py`) import nothing from here: without `prepare` (or with
MED_FAST=0 in the environment, or `train.fast: false` in a training config) the same model runs plain PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from med_train import med
from med_train.fast import few_rows, ops


def enabled() -> bool:
    """False where MED_FAST=0 turns every fast path off (MED_FAST=1: every one on, unmeasured; unset: measured)."""
    from med_train.fast.calibrate import forced

    return forced() is not False


@dataclass
class Prepared:
    """What `prepare` did to a model, to say (`med bench`)."""

    device: str
    uses: set[str] = field(default_factory=set)
    pieces: list[str] = field(default_factory=list)
    routes: dict[str, bool] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.pieces:
            return "fast paths: off"
        chosen = ", ".join(f"{name} {'on' if on else 'off'}" for name, on in self.routes.items())
        return f"fast paths on {self.device}: {', '.join(self.pieces)}" + (f"; CPU routes: {chosen}" if chosen else "")


def prepare(model: nn.Module, device: torch.device | str | None = None, use: str = "decode", *,
            enabled_here: bool | None = None) -> Prepared:
    """Give `model` (a Captioner or a MED decoder) the fast paths for `device` (default: where its parameters are)
    and `use` ("decode" or "train"; a training run's validation decodes with what "train" prepared). Call it
    before the first forward, and before wrapping the model (DDP, accelerate). `enabled_here=False` (or
    MED_FAST=0) leaves the model as it is."""
    if use not in ("decode", "train"):
        raise ValueError(f"use must be 'decode' or 'train', not {use!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    done = model.__dict__.get("fast_paths")
    if done is not None and done.device == device.type and use in done.uses:
        return done  # decided once per model and device
    if not (enabled() if enabled_here is None else enabled_here) or _quantized(model):
        report = model.__dict__["fast_paths"] = Prepared(device.type, uses={"decode", "train"})
        return report
    report = model.__dict__["fast_paths"] = Prepared(device.type, uses={use} | (done.uses if done else set()))
    vit = getattr(model, "visual_encoder", None)
    if vit is not None:
        from med_train.fast.vit import lean_blocks

        lean_blocks(vit)
        report.pieces.append("lean ViT blocks")
    _swap_classes(model, device)
    report.pieces.append("fused decoder feed-forward")
    if device.type == "cpu":
        report.pieces += ["prepacked products", "padding skipped and sparse embedding gradient in training"]
        few_rows.build()  # compiled once per machine, loaded after; never inside a forward call
        report.routes = choose_routes(model, use)
    report.pieces.append("CUDA-graph decoding steps" if device.type == "cuda" else "fast decoding caches")
    return report


def _quantized(model: nn.Module) -> bool:
    """An int8 model (`med_train.int8`): its projections have no float weights for the fast paths to read."""
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


def _swap_classes(model: nn.Module, device: torch.device) -> None:
    from med_train.fast.decoder import LeanLayer, LeanSelfOutput, PackedHead, SparseTiedDecoder
    from med_train.fast.decoding import FastDecoding

    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = ops.FastLinear
        elif PackedHead.fits(module):
            module.__class__ = PackedHead
        elif LeanLayer.fits(module):
            module.__class__ = LeanLayer
        elif type(module) is med.BertSelfOutput:
            module.__class__ = LeanSelfOutput
        elif isinstance(module, med.BertLMHeadModel):
            if device.type == "cpu" and type(module) is med.BertLMHeadModel:
                module.__class__ = SparseTiedDecoder
            module.decoding = FastDecoding()


def choose_routes(model: nn.Module, use: str) -> dict[str, bool]:
    """The CPU routes this process takes (`ops.ROUTES`), each on where it is measured faster than the plain path on
    this machine, with this model's shapes (`calibrate.faster`: a fraction of a second the first time, cached on
    disk for the next processes). The routes that do less work (the padding skipped, folded projections, a cache
    whose rows are never copied) need no measuring."""
    from med_train.fast import calibrate

    routes = ops.ROUTES
    decoder = next((m for m in model.modules() if isinstance(m, med.BertLMHeadModel)), None)
    vit_linear = _first_linear(getattr(model, "visual_encoder", None))
    # the measurements' inputs come from a generator of their own: preparing must leave a seeded run's draws alone
    rows = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if use == "decode" and decoder is not None:
            wide = decoder.bert.encoder.layer[0].intermediate.dense  # (4H, H): a step's typical product
            step = torch.randn(8, wide.in_features, generator=rows)  # a greedy step's rows at batch 8
            routes.packed_few = calibrate.faster(_product_key("oneDNN prepacked", wide, step),
                                                 *_plain_and_packed(wide, step))
            routes.few_rows = few_rows.available() and calibrate.faster(
                _product_key("few-row kernel", wide, step), _best_plain(wide, step), _kernel(wide, step))
        if use == "decode" and vit_linear is not None:
            # a ViT batch's tokens
            batch = torch.randn(2 * ops.ONEDNN_MIN_ROWS, vit_linear.in_features, generator=rows)
            routes.packed_many = calibrate.faster(_product_key("oneDNN prepacked", vit_linear, batch),
                                                  *_plain_and_packed(vit_linear, batch))
        if use == "train" and vit_linear is not None:
            batch = torch.randn(2 * ops.ONEDNN_MIN_ROWS, vit_linear.in_features, generator=rows)
            weight, bias = vit_linear.weight.detach(), vit_linear.bias
            routes.onednn_training = calibrate.faster(
                _product_key("oneDNN training product", vit_linear, batch),
                lambda: F.linear(batch, weight, bias), lambda: ops._onednn_linear(batch, weight, bias))
    return {"oneDNN prepacked (decoding)": routes.packed_few, "oneDNN prepacked (images)": routes.packed_many,
            "few-row kernel": routes.few_rows, "oneDNN training products": routes.onednn_training}


def _first_linear(module: nn.Module | None) -> nn.Linear | None:
    """The first MLP's widening linear of a ViT (the bulk of its products), or None."""
    blocks = getattr(module, "blocks", None)
    mlp = getattr(blocks[0], "mlp", None) if isinstance(blocks, nn.Sequential) and len(blocks) else None
    return getattr(mlp, "fc1", None)


def _product_key(route: str, linear: nn.Linear, x: torch.Tensor) -> str:
    return f"{route}: {x.shape[0]} rows x {tuple(linear.weight.shape)}, {x.dtype}"


def _plain_and_packed(linear: nn.Linear, x: torch.Tensor):
    weight, bias = linear.weight.detach(), linear.bias
    blocked = torch.ops.mkldnn._reorder_linear_weight(weight)
    return (lambda: F.linear(x, weight, bias)), (lambda: ops._onednn_linear(x, blocked, bias))


def _best_plain(linear: nn.Linear, x: torch.Tensor):
    """What a step's product runs through without the kernel: oneDNN's prepacked product where that was chosen."""
    plain, packed = _plain_and_packed(linear, x)
    return packed if ops.ROUTES.packed_few else plain


def _kernel(linear: nn.Linear, x: torch.Tensor):
    panels = few_rows.pack(linear.weight.detach().t())
    return lambda: few_rows.linear(x, panels, linear.out_features, linear.bias)


def release(model: nn.Module) -> None:
    """Free what the fast paths keep for `model`: its linears' packed weights and its captured CUDA graphs."""
    from med_train.fast.graphs import release_captured_steps

    for module in model.modules():
        if isinstance(module, ops.FastLinear):
            module.release()
        if isinstance(module, med.BertLMHeadModel):
            release_captured_steps(module)
