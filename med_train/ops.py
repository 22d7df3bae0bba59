"""Memory-lean fused operations for training: each keeps one activation for backward where autograd would keep two,
and recomputes the other (one element-wise pass) in backward. Same values and gradients as the unfused ops
(gradcheck in the tests), in fp32 and under autocast.

    y = gelu_linear(h, fc2.weight, fc2.bias)       # = fc2(F.gelu(h)); keeps h, not gelu(h)
    y = layer_norm_linear(x, norm, qkv)            # = qkv(norm(x)); keeps x, not norm(x)

Used by the ViT blocks (model.LeanBlock) and the decoder's feed-forward (med.BertLayer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _GeluLinear(torch.autograd.Function):
    """linear(gelu(h), weight, bias) that keeps h, not gelu(h), for backward, where gelu(h) is recomputed (one
    element-wise pass). Autograd would keep both h (for GELU) and gelu(h) (for the linear): in a ViT MLP those are
    the two widest activations, 4 x the width each. Under autocast the linear runs in the autocast dtype, as
    F.linear would, and so do the gradients (cast back to the parameters' dtype)."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        y = F.linear(F.gelu(h), weight, bias)
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
            grad_g = (grad_y @ weight.to(dtype)).to(h.dtype)
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
        return F.linear(normed, weight, bias)

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
        grad_normed = (grad_y @ weight.to(dtype)).to(normed.dtype)
        grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
            grad_normed, x, shape, mean, rstd, norm_weight, norm_bias, list(ctx.needs_input_grad[:3]))
        return grad_x, grad_norm_weight, grad_norm_bias, None, grad_weight, grad_bias


def layer_norm_linear(x: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> torch.Tensor:
    """`linear(norm(x))`, storing one activation for backward instead of two."""
    return _LayerNormLinear.apply(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)
