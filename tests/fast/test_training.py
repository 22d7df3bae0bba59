"""The decoder's training with the fast paths (`fast.prepare(..., "train")`): the padding skipped, the tied table's
sparse gradient, fused feed-forward, oneDNN products: the plain decoder's and transformers' losses and gradients."""

import pytest
import torch
from test_med import LAYERS, W_IMG, B, H, T, V, _inputs, _pair, assert_gradients_match_transformers

from med_train import fast
from med_train.fast.decoder import TiedTable


def _prepared():
    ours, _ = _pair()
    fast.prepare(ours, "cpu", "train", enabled_here=True)
    return ours


@pytest.mark.parametrize("output_logits", [True, False])
def test_gradients_match_transformers_and_stay_dense(output_logits):
    """As test_med's, prepared: every weight's gradient equals transformers', over two accumulated backward passes;
    every .grad is a dense tensor, as fused AdamW and DDP need."""
    ours, ref = _pair()
    fast.prepare(ours, "cpu", "train", enabled_here=True)
    assert_gradients_match_transformers(ours, ref, output_logits)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_target_only_loss_skips_padding_with_the_same_gradients(checkpointing):
    """`output_logits=False` runs the layers on the real tokens only (med.Packing): the same loss and gradients
    (weights and image tokens) as the padded batch, with the feed-forward seeing mask.sum() rows, not B * T."""
    ours = _prepared()
    ids, mask, labels, images = _inputs()
    images = images.requires_grad_()
    ours.train()
    ours.set_gradient_checkpointing(checkpointing)
    rows = []
    ours.bert.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[:-1].numel()))

    def loss_and_grads(output_logits):
        ours.zero_grad()
        images.grad = None
        loss = ours(ids, mask, encoder_hidden_states=images, labels=labels, output_logits=output_logits).loss
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in ours.parameters()] + [images.grad.clone()]

    padded = loss_and_grads(True)
    assert rows[0] == B * T
    packed = loss_and_grads(False)
    assert rows[-1] == int(mask.sum()) < B * T
    for a, b in zip(padded, packed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)



def test_padding_skip_and_sparse_embedding_gradient_are_for_the_cpu_only():
    """On a GPU the decoder runs the padded batch with a dense embedding lookup (cheaper there, README: Speed):
    prepared for a GPU, the feed-forward sees B * T rows and the lookup is dense; the loss is the same."""
    losses = {}
    for device in ("cpu", "cuda"):
        ours, _ = _pair()
        fast.prepare(ours, device, "train", enabled_here=True)
        ids, mask, labels, images = _inputs()
        ours.train()
        rows, sparse = [], []
        ours.bert.encoder.layer[0].intermediate.dense.register_forward_hook(
            lambda module, args, out, rows=rows: rows.append(args[0].shape[:-1].numel()))
        ours.bert.embeddings.word_embeddings.register_forward_hook(
            lambda module, args, out, sparse=sparse: sparse.append(module.sparse))
        losses[device] = ours(ids, mask, encoder_hidden_states=images, labels=labels, output_logits=False).loss
        on_cpu = device == "cpu"
        assert rows[-1] == (int(mask.sum()) if on_cpu else B * T) and sparse[-1] is on_cpu
    assert int(mask.sum()) < B * T
    torch.testing.assert_close(losses["cpu"], losses["cuda"], atol=1e-6, rtol=1e-5)



def test_image_token_projections_train_through_onednn_with_transformers_gradients(monkeypatch):
    """In training, the cross-attention's key and value projections of the image tokens (a ViT's batch x tokens
    rows, from ops.ONEDNN_MIN_ROWS) run their forward and input-gradient products through oneDNN, as the ViT's
    do; the text's few rows stay with F.linear. The gradients equal transformers'."""
    from torch.profiler import profile

    from med_train.fast import ops

    ours, ref = _pair()
    fast.prepare(ours, "cpu", "train", enabled_here=True)
    ids, mask, labels, _ = _inputs()
    images = torch.randn(B, 40, W_IMG, generator=torch.Generator().manual_seed(8)).requires_grad_()
    monkeypatch.setattr(ops, "ONEDNN_MIN_ROWS", B * 40)  # the image tokens' rows; the text has B * T = 27
    ours.train()
    ref.train()
    ref_images = images.detach().clone().requires_grad_()
    ref(input_ids=ids, attention_mask=mask, encoder_hidden_states=ref_images, labels=labels).loss.backward()
    with profile() as prof:
        ours(ids, mask, encoder_hidden_states=images, labels=labels).loss.backward()
    onednn_calls = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
    assert onednn_calls == 2 * 2 * LAYERS  # key and value, forward and input gradient, in every layer
    torch.testing.assert_close(images.grad, ref_images.grad, atol=1e-5, rtol=1e-4)
    ref_grads = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)



def test_tied_table_gradient_takes_the_lookup_rows_in_place(monkeypatch):
    """The sparse lookup gradient is added into the LM head's dense one in place (`TiedTable`), where
    autograd's own dense + sparse accumulation copies the vocabulary-sized gradient (profiled: an in-place add,
    no copy); the gradient stays what the dense lookup gives."""
    from torch.profiler import profile

    ours = _prepared()
    ids, mask, labels, images = _inputs()
    ours.train()
    table = ours.bert.embeddings.word_embeddings.weight

    def grad(**kw):
        ours.zero_grad(set_to_none=True)
        with profile(record_shapes=True) as prof:
            ours(ids, mask, encoder_hidden_states=images, labels=labels, **kw).loss.backward()
        table_sized = [e.name for e in prof.events() if e.input_shapes and e.input_shapes[0] == [V, H]]
        return table.grad.clone(), table_sized

    sparse_grad, sparse_ops = grad(output_logits=False)
    assert "aten::add_" in sparse_ops and "aten::copy_" not in sparse_ops and table.grad.is_contiguous()
    # the check sees autograd's accumulation when the lookup's gradient is not routed through TiedTable
    with monkeypatch.context() as patch:
        patch.setattr(TiedTable, "apply", lambda weight: (weight, weight))
        _, untied_ops = grad(output_logits=False)
    assert "aten::copy_" in untied_ops
    plain, _ = _pair()  # a dense lookup
    plain.train()
    plain(ids, mask, encoder_hidden_states=images, labels=labels, output_logits=False).loss.backward()
    torch.testing.assert_close(sparse_grad, plain.bert.embeddings.word_embeddings.weight.grad, atol=1e-6, rtol=1e-5)
