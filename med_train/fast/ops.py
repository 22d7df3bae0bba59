"""Memory-lean fused operations for training, and prepacked products for CPU inference.

Training: each fused op keeps one activation for backward where autograd would keep two, and recomputes the other
(one element-wise pass) in backward. Same values and gradients as the unfused ops (gradcheck in the tests), in fp32
and under autocast.

    y = gelu_linear(h, fc2.weight, fc2.bias)       # = fc2(F.gelu(h)); keeps h, not gelu(h)
    y = layer_norm_linear(x, norm, qkv)            # = qkv(norm(x)); keeps x, not norm(x)

Inference on the CPU: `FastLinear` (what `fast.prepare` makes of a model's `nn.Linear`s, same parameters) runs its
product through oneDNN with the weight reordered (at its second use) into oneDNN's blocked layout and kept by the
module. MKL's sgemm, which `F.linear` calls, copies the weight into its own layout on every call: for the few rows
of a decoding step that copy costs more than the product (a BERT-base decoder's weights against 8 rows: 76 ms per
step with `F.linear`, 40 ms packed, one thread; at ViT sizes, 1576 rows, about 95 against 107 GFLOP/s). The price
is memory: a second copy of the weights that run packed, which the module frees when it trains again (its weights
will change) and which goes with it. In fp32, a product of at most FEW_ROWS_MAX rows (a decoding step's) runs
through `few_rows` instead where that kernel is built and chosen, with the weight kept in its panel layout.

In training the weights change every step, so nothing is kept: `product` (the fused ops' products, and
`training_linear`'s) hands oneDNN the plain weight, which it reorders for each call, from ONEDNN_MIN_ROWS rows
where that was chosen (`ROUTES.onednn_training`); with fewer rows F.linear's MKL is faster and is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from med_train.fast import few_rows

FEW_ROWS = "few_rows"
# oneDNN's bf16 products (the prepacked path under bf16 autocast) need AVX512BW/VL/DQ or AVX_NE_CONVERT; on other
# CPUs `_reorder_linear_weight` fails in bf16, and F.linear, which autocast runs in bf16 its own way, is used instead.
ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
# Products of at most this many rows go through the few-row kernel where it is built and chosen: on AVX-512 it
# beat oneDNN's prepacked product at every count measured, 1 to 64 rows, one thread.
FEW_ROWS_MAX = 64


@dataclass
class Routes:
    """Which CPU routes this process takes (`fast.prepare` sets them from measurements on this machine)."""

    packed_few: bool = True  # inference products of at most FEW_ROWS_MAX rows with weights prepacked for oneDNN
    packed_many: bool = True  # and of more rows (a ViT's batch)
    few_rows: bool = True  # a decoding step's products (at most FEW_ROWS_MAX rows) through the few-row kernel
    onednn_training: bool = True  # training's large products through oneDNN (`product`)


ROUTES = Routes()


def _packed_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype a prepacked product of `x` and `weight` runs in, or None where none applies. Inference on the CPU
    with fp32 weights: no gradient to record, not inside torch.compile (which prepacks on its own). fp32, or bf16
    under bf16 autocast, where F.linear would cast the inputs (and the weight, on every call) to bf16 too, on CPUs
    where oneDNN has bf16 products (ONEDNN_BF16)."""
    if (x.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            or torch.compiler.is_compiling() or not torch.backends.mkldnn.is_available()):
        return None
    if torch.is_autocast_enabled("cpu"):
        bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
        return torch.bfloat16 if bf16 and ONEDNN_BF16 else None
    return torch.float32 if x.dtype == torch.float32 else None


def few_rows_ready() -> bool:
    """Whether a step's few rows go through the kernel: built, and chosen on this machine."""
    return ROUTES.few_rows and few_rows.available()


def few_rows_fit(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `x` with these parameters is a decoding step's few rows that the kernel takes: fp32 on the CPU, at
    most FEW_ROWS_MAX rows, outside autocast, no gradient recorded, not inside torch.compile, the kernel built and
    chosen. (Called for each of a step's products: the cheap tests come first.)"""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu" or not x.dim():
        return False
    width = x.shape[-1]
    return (width > 0 and 0 < x.numel() // width <= FEW_ROWS_MAX and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling() and few_rows_ready())


def add_norm(norm: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """norm(x + residual) (residual None: norm(x)), in one pass of the few-row kernel for a decoding step's rows
    (`few_rows_fit`), else by torch's ops."""
    weight, bias = norm.weight, norm.bias
    if (weight is not None and bias is not None and few_rows_fit(x, weight, bias)
            and (residual is None or residual.shape == x.shape) and norm.normalized_shape == (x.shape[-1],)):
        width = x.shape[-1]
        rows = x.reshape(-1, width).contiguous()
        kept = None if residual is None else residual.reshape(-1, width).contiguous()
        return few_rows.add_norm(rows, kept, weight, bias, norm.eps).view(x.shape)
    return norm(x if residual is None else x + residual)


class FastLinear(nn.Linear):
    """`nn.Linear` (same parameters, state-dict keys and values: `fast.prepare` turns a model's linears into these
    in place) whose forward in eval mode uses prepacked weights for CPU inference (`packed`); in training
    `training_linear` (a decoder's projections of the image tokens have a ViT's rows: oneDNN pays there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return training_linear(x, self.weight, self.bias)
        return self.packed(x)

    def packed(self, x: torch.Tensor, bias: torch.Tensor | None = None, *, gelu: bool = False) -> torch.Tensor:
        """x W^T + b (`bias` instead of the module's own where given: the LM head's lives beside it), and F.gelu of
        that with `gelu=True`. In inference on the CPU (see `_packed_dtype`) with the weight prepacked from its
        second use: through `few_rows` for at most FEW_ROWS_MAX rows in fp32 where that kernel is chosen (the GELU
        applied as each output is stored), else oneDNN. In fp32 equal to F.linear's to float rounding (about 1e-6;
        the sums run in another order), under bf16 autocast in bf16 as autocast's."""
        weight, bias = self.weight, self.bias if bias is None else bias
        if few_rows_fit(x, weight, bias):
            panels = self.kept(FEW_ROWS, _few_row_pack)
            if panels is not None:
                return few_rows._linear(x, panels, weight.shape[0], bias, gelu)
        y = self._product(x, _packed_dtype(x, weight), bias)
        return F.gelu(y) if gelu else y

    def _product(self, x: torch.Tensor, dtype: torch.dtype | None, bias: torch.Tensor | None) -> torch.Tensor:
        weight = self.weight
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if dtype is None or not (ROUTES.packed_few if rows <= FEW_ROWS_MAX else ROUTES.packed_many):
            return F.linear(x, weight, bias)
        blocked = self.kept(dtype, lambda w: torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype)))
        if blocked is None:
            return F.linear(x, weight, bias)
        return _onednn_linear(x.to(dtype), blocked, None if bias is None else bias.to(dtype))

    def kept(self, layout: object, make, *, now: bool = False) -> torch.Tensor | None:
        """`make(self.weight)`, a copy of the weight in another layout (oneDNN's in a dtype, the few-row kernel's
        panels, or another route's), made at the weight's second use in that layout and kept by this module until
        the weight changes (an optimizer step or a loaded checkpoint writes into it in place, which bumps its
        version) or the module trains again. None at the first use: a weight used once (the ViT's, captioning one
        batch) is not worth the copy, which costs about what one product saves; `now=True` makes it now."""
        weight = self.weight
        stamp = (weight._version, weight.data_ptr())
        if self.__dict__.get("_stamp") != stamp:
            self.__dict__["_stamp"], self.__dict__["_kept"] = stamp, {}
        copies = self.__dict__["_kept"]
        if layout not in copies and not now:
            copies[layout] = None
        elif copies.get(layout) is None:
            copies[layout] = make(weight)
        return copies[layout]

    def few_row_panels(self) -> torch.Tensor:
        """The weight's panels for the few-row kernel, the copy `packed` keeps and uses, made now if not yet."""
        return self.kept(FEW_ROWS, _few_row_pack, now=True)

    def release(self) -> None:
        """Free the kept copies."""
        self.__dict__.pop("_kept", None)
        self.__dict__.pop("_stamp", None)

    def train(self, mode: bool = True):
        if mode:  # its weights will change: the copies would be stale
            self.release()
        return super().train(mode)


def _few_row_pack(weight: torch.Tensor) -> torch.Tensor:
    return few_rows.pack(weight.t())


def _onednn_linear(x: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias with the weight in oneDNN's blocked layout, for any leading dimensions of x."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), blocked, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


# Training's products on the CPU: from this many rows (a ViT's batch x tokens), oneDNN with the weight reordered
# for the call beats MKL's sgemm on the forward and input-gradient products; below it (a decoder's few hundred
# caption tokens) MKL is faster.
ONEDNN_MIN_ROWS = 1024


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for the Functions below (no autograd of its own). In fp32 on the CPU with at
    least ONEDNN_MIN_ROWS rows: through oneDNN, given the weight as it is (the weights change every step, and a
    kept copy would cost memory), which oneDNN reorders for the call itself: that is about 2.5% faster on these
    products than reordering it beforehand with `_reorder_linear_weight` (a training step 12.72 -> 12.48 s, 6
    alternating steps each). `weight` may be a transposed view."""
    if not _onednn_pays(x, weight):
        return F.linear(x, weight, bias)
    return _onednn_linear(x, weight, bias)


def _onednn_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A training product that `product` hands to oneDNN: fp32 on the CPU, from ONEDNN_MIN_ROWS rows, outside
    autocast and torch.compile."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (ROUTES.onednn_training and rows >= ONEDNN_MIN_ROWS and x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and torch.backends.mkldnn.is_available())


class _Linear(torch.autograd.Function):
    """F.linear with its forward and input-gradient products through `product` (fp32; training a ViT)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = product(grad_y, weight.t()) if ctx.needs_input_grad[0] else None
        grad_weight = flat_grad.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_bias = flat_grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def training_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` for training, with the forward and input-gradient products through oneDNN where `product` would
    take it (fp32 on the CPU from ONEDNN_MIN_ROWS rows); F.linear itself, with autograd's own backward, elsewhere."""
    return _Linear.apply(x, weight, bias) if _onednn_pays(x, weight) else F.linear(x, weight, bias)


class _GeluLinear(torch.autograd.Function):
    """linear(gelu(h), weight, bias) that keeps h, not gelu(h), for backward, where gelu(h) is recomputed (one
    element-wise pass). Autograd would keep both h (for GELU) and gelu(h) (for the linear): in a ViT MLP those are
    the two widest activations, 4 x the width each. Under autocast the linear runs in the autocast dtype, as
    F.linear would, and so do the gradients (cast back to the parameters' dtype)."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        y = product(F.gelu(h), weight, bias)
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        h, weight = ctx.saved_tensors
        dtype = grad_y.dtype  # the dtype the forward's linear ran in (autocast's, or the inputs')
        flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
        grad_h = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_g = product(grad_y, weight.to(dtype).t()).to(h.dtype)
            grad_h = torch.ops.aten.gelu_backward(grad_g, h)
        if ctx.needs_input_grad[1]:
            g = F.gelu(h).to(dtype)
            grad_weight = (flat_grad.t() @ g.reshape(-1, g.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0).to(weight.dtype)
        return grad_h, grad_weight, grad_bias


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(F.gelu(h), weight, bias)`, storing one activation for backward instead of two."""
    return _GeluLinear.apply(h, weight, bias)


class _LayerNormLinear(torch.autograd.Function):
    """linear(layer_norm(x), weight, bias) that keeps x (which the norm's backward needs anyway), not the normed
    copy, for the linear's backward: the norm is recomputed there. Autocast as in `_GeluLinear`."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias):
        shape = (x.shape[-1],)
        normed, mean, rstd = torch.native_layer_norm(x, shape, norm_weight, norm_bias, eps)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return product(normed, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        shape, dtype = (x.shape[-1],), grad_y.dtype
        normed = torch.native_layer_norm(x, shape, norm_weight, norm_bias, ctx.eps)[0]  # as in the forward
        flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[4]:
            grad_weight = (flat_grad.t() @ normed.to(dtype).reshape(-1, shape[0])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = flat_grad.sum(0).to(weight.dtype)
        grad_normed = product(grad_y, weight.to(dtype).t()).to(normed.dtype)
        grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
            grad_normed, x, shape, mean, rstd, norm_weight, norm_bias, list(ctx.needs_input_grad[:3]))
        return grad_x, grad_norm_weight, grad_norm_bias, None, grad_weight, grad_bias


def layer_norm_linear(x: torch.Tensor, norm: nn.LayerNorm, dense: nn.Linear) -> torch.Tensor:
    """`dense(norm(x))`, storing one activation for backward instead of two."""
    return _LayerNormLinear.apply(x, norm.weight, norm.bias, norm.eps, dense.weight, dense.bias)
