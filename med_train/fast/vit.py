"""timm's ViT blocks computed the same way with less memory in training, and prepacked products in inference.

`LeanBlock` (pre-norm attention, then pre-norm MLP) folds each LayerNorm into the linear after it
(`ops.layer_norm_linear`) and the MLP's GELU into fc2 (`ops.gelu_linear`): backward keeps the block's input and
hidden activations once each, not also their normed and activated copies (the MLP's alone is about a fifth of a
ViT-B's activation memory in training). In eval mode they call their linears, which `fast.prepare` has made
`FastLinear`s (prepacked weights on the CPU). Same submodules as timm's, so the same state-dict keys; gradient
checkpointing and drop-path work as in timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from med_train.fast.ops import gelu_linear, layer_norm_linear


class LeanMlp(nn.Module):
    """timm's ViT MLP (fc1 -> exact GELU -> fc2), with GELU folded into fc2 in training."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.drop1, self.norm, self.fc2, self.drop2 = (
            mlp.fc1, mlp.act, mlp.drop1, mlp.norm, mlp.fc2, mlp.drop2)
        self.training = mlp.training  # a model prepared in eval mode stays there (a new module starts training)

    @staticmethod
    def fits(mlp) -> bool:
        """timm's plain Mlp with exact GELU, no hidden dropout and no hidden norm."""
        from timm.layers import Mlp

        return (type(mlp) is Mlp and isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"
                and isinstance(mlp.norm, nn.Identity) and getattr(mlp.drop1, "p", 0.0) == 0.0
                and isinstance(mlp.fc2, nn.Linear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_hidden(self.fc1(x))

    def from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP after fc1 (LeanBlock gives fc1's output itself)."""
        if self.training:
            return self.drop2(gelu_linear(h, self.fc2.weight, self.fc2.bias))
        return self.drop2(self.fc2(self.act(h)))


class LeanBlock(nn.Module):
    """timm's ViT block with its LayerNorms folded into the linears after them in training."""

    PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        for name in self.PARTS:
            setattr(self, name, getattr(block, name))
        self.training = block.training  # as LeanMlp's

    @staticmethod
    def fits(block) -> bool:
        """timm's plain Block: affine LayerNorms, fused attention without q/k norms, gate or output norm, and an
        MLP that LeanMlp takes."""
        from timm.models.vision_transformer import Attention, Block

        if type(block) is not Block or type(block.attn) is not Attention or not isinstance(block.mlp, LeanMlp):
            return False
        a = block.attn
        norms = all(isinstance(n, nn.LayerNorm) and not getattr(n, "_fast_norm", False) and n.weight is not None
                    and n.bias is not None and len(n.normalized_shape) == 1 for n in (block.norm1, block.norm2))
        return norms and a.fused_attn and getattr(a, "gate", None) is None and all(
            isinstance(m, nn.Identity) for m in (a.q_norm, a.k_norm, a.norm))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        a, (b, n, _) = self.attn, x.shape
        qkv = layer_norm_linear(x, self.norm1, a.qkv) if self.training else a.qkv(self.norm1(x))
        q, k, v = qkv.reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                  dropout_p=a.attn_drop.p if self.training else 0.0)
        attended = a.proj(attended.transpose(1, 2).reshape(b, n, a.attn_dim))
        x = x + self.drop_path1(self.ls1(a.proj_drop(attended)))
        widened = layer_norm_linear(x, self.norm2, self.mlp.fc1) if self.training else self.mlp.fc1(self.norm2(x))
        return x + self.drop_path2(self.ls2(self.mlp.from_hidden(widened)))


def lean_blocks(vit: nn.Module) -> None:
    """Replace `vit.blocks`' timm Blocks (and their MLPs) by the lean ones where they fit, in place."""
    blocks = getattr(vit, "blocks", None)
    for i, block in enumerate(blocks if isinstance(blocks, nn.Sequential) else ()):
        if LeanMlp.fits(getattr(block, "mlp", None)):
            block.mlp = LeanMlp(block.mlp)
        if LeanBlock.fits(block):
            blocks[i] = LeanBlock(block)
