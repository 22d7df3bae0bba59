"""The MED decoder's speed-only variants, which `fast.prepare` gives a decoder's modules in place (their classes
change; parameters, state-dict keys and values do not): the same results for less memory or time.

- `LeanLayer`: in training the feed-forward's GELU is folded into the output's dense (`ops.gelu_linear`): the wide
  hidden activation is kept once for backward, not twice. In a CPU decoding step the GELU is applied as the
  widening product stores its outputs, and the residual add and LayerNorm are one pass (`ops.add_norm`).
- `LeanSelfOutput`: an attention's output projection with its residual add and LayerNorm in one pass, as above.
- `PackedHead`: the LM head's product with its weight prepacked in eval mode on the CPU (`FastLinear.packed`), its
  transform's GELU and LayerNorm fused as above.
- `SparseTiedDecoder`: on the CPU, with labels, the tied word embeddings' lookup has a sparse gradient that the LM
  head's dense one absorbs in place (`TiedTable`): no zero-filled vocabulary-sized gradient is made per step, nor a
  copy of the head's.

Why the fusions in decoding: a decoding step's rows are few (8 for greedy at batch 8, 24 for beam 3), so each element-wise pass
over them costs about what its call does; the bench's greedy decode (BERT-base, one thread) spent about 10% of its
time in GELU, residual adds and LayerNorms as passes of their own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import GELUActivation

from med_train import med
from med_train.fast.ops import FastLinear, add_norm, gelu_linear


class LeanLayer(med.BertLayer):
    @staticmethod
    def fits(layer) -> bool:
        if type(layer) is not med.BertLayer:
            return False
        return _exact_gelu(layer.intermediate.intermediate_act_fn)

    def feed_forward_chunk(self, attention_output):
        out, widen = self.output, self.intermediate.dense
        if not self.training:
            wide = (widen.packed(attention_output, gelu=True) if isinstance(widen, FastLinear)
                    else self.intermediate(attention_output))
            return add_norm(out.LayerNorm, out.dense(wide), attention_output)
        wide = gelu_linear(widen(attention_output), out.dense.weight, out.dense.bias)
        return out.LayerNorm(out.dropout(wide) + attention_output)


class LeanSelfOutput(med.BertSelfOutput):
    def forward(self, hidden_states, input_tensor):
        if self.training:
            return super().forward(hidden_states, input_tensor)
        return add_norm(self.LayerNorm, self.dense(hidden_states), input_tensor)


class PackedHead(med.BertLMPredictionHead):
    @staticmethod
    def fits(head) -> bool:
        return type(head) is med.BertLMPredictionHead and _exact_gelu(head.transform.transform_act_fn)

    def forward(self, hidden_states):
        transform, dense = self.transform, self.transform.dense
        if self.training or not (isinstance(self.decoder, FastLinear) and isinstance(dense, FastLinear)):
            return super().forward(hidden_states)
        hidden_states = add_norm(transform.LayerNorm, dense.packed(hidden_states, gelu=True))
        return self.decoder.packed(hidden_states, bias=self.bias)


def _exact_gelu(act) -> bool:
    """BERT's erf GELU, which the kernel applies (nn.GELU without approximation, or transformers' GELUActivation)."""
    if isinstance(act, torch.nn.GELU):
        return act.approximate == "none"
    return isinstance(act, GELUActivation) and act.act is F.gelu


class TiedTable(torch.autograd.Function):
    """The word embeddings' table, tied to the LM head, handed out as two aliases, (lookup's, head's), so that the
    two gradients meet here and not in autograd's own accumulation, which adds a sparse gradient to a dense one by
    copying the dense one: a vocabulary-sized copy every step (30524 x 768: about 40 ms of a CPU training step,
    profiled). Here the lookup's sparse rows are added into the head's dense gradient in place."""

    @staticmethod
    def forward(ctx, weight):
        ctx.set_materialize_grads(False)
        return weight.view_as(weight), weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_lookup, grad_head):
        if grad_head is None or grad_lookup is None:
            return grad_lookup if grad_head is None else grad_head
        if not grad_head.is_contiguous():  # not a product's fresh output: leave it be
            return grad_head + grad_lookup
        return grad_head.add_(grad_lookup)  # the head's gradient is this node's alone: it came from its product


class SparseTiedDecoder(med.BertLMHeadModel):
    """A decoder whose loss, in training on the CPU, looks its words up with a sparse gradient that the tied LM
    head's dense one takes in place (`TiedTable`), and skips the padding (`skip_padding`)."""

    skip_padding = True

    def forward(self, input_ids=None, *args, labels=None, **kwargs):
        table, head = self.bert.embeddings.word_embeddings, self.cls.predictions.decoder
        weight = table.weight
        if not (labels is not None and torch.is_grad_enabled() and weight.requires_grad and head.weight is weight
                and not torch.compiler.is_compiling()):  # torch.compile does not trace sparse gradients
            return super().forward(input_ids, *args, labels=labels, **kwargs)
        lookup, projection = TiedTable.apply(weight)
        # for this forward, the two modules read the two aliases (as torch.func.functional_call would put them)
        table._parameters["weight"], head._parameters["weight"], table.sparse = lookup, projection, True
        try:
            return super().forward(input_ids, *args, labels=labels, **kwargs)
        finally:
            table._parameters["weight"] = head._parameters["weight"] = weight
            table.sparse = False
