"""The multimodal BERT ("MED") of BLIP: every layer has self-attention, then cross-attention from the text to the
image tokens, then the feed-forward block. `BertLMHeadModel` is the caption decoder.

This follows the seed (a walk-through of BLIP's `models/med.py`): same class names, forward signatures and
state-dict names, so BLIP's released weights and transformers' `BlipTextLMHeadModel` weights load unchanged. What
differs from BLIP's code, on purpose:
- attention runs through `F.scaled_dot_product_attention` (fused), equal in value to matmul/softmax/mask;
- a cache (`cache.py`) keeps self-attention K/V (grown one step at a time) and cross-attention K/V (computed once
  per image for the whole decode; a query batch that is a multiple of the image batch, e.g. beams, shares them
  without copies). Attention hands its K/V to the cache through one interface (`cache.DecoderCache`), so faster
  caches (`fast.caches`) replace the plain one without a change here;
- gradient checkpointing works;
- with labels, the LM head runs only where there is a target (`output_logits=False` skips the full logits), and
  then the layers run on the real tokens only (`Packing`: padding is neither computed nor kept for backward);
- with labels, the tied word embeddings' lookup has a sparse gradient, which the LM head's dense one absorbs in
  place (`TiedTable`: no zero-filled vocabulary-sized gradient is made per step, nor a copy of the head's).

    config = med_config(vocab_size=30524, encoder_width=768)  # a transformers.BertConfig
    decoder = BertLMHeadModel(config)
    out = decoder(input_ids, attention_mask, encoder_hidden_states=image_embeds, labels=labels)
    out.loss, out.logits
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig

from med_train.cache import DecoderCache, attend_per_image
from med_train.ops import Linear, ReleasesPackedOnTrain, gelu_linear, linear


def med_config(**kwargs) -> BertConfig:
    """A BertConfig carrying BLIP's extra keys: `encoder_width` (image-token width), `add_cross_attention`."""
    kwargs.setdefault("encoder_width", 768)
    kwargs.setdefault("add_cross_attention", True)
    kwargs.setdefault("hidden_act", "gelu")
    return BertConfig(**kwargs)


@dataclass
class BertModelOutput:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    cache: DecoderCache | None = None


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: DecoderCache | None = None


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm, dropout (no token types, as in BLIP)."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=False)

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, past_key_values_length: int = 0,
                sparse_grad: bool = False, word_weight: torch.Tensor | None = None):
        """`sparse_grad=True`: the word embeddings' gradient is the looked-up rows only, not a dense (vocab, H)
        tensor. For a table tied to an LM head that is in the same loss, look up in `word_weight`, the lookup's
        alias of the table from `TiedTable`: the head's dense gradient takes those rows in place, so neither the
        zero-filled table-sized gradient nor the sum of the two is ever made."""
        seq_length = (input_ids if input_ids is not None else inputs_embeds[..., 0]).shape[1]
        if position_ids is None:  # positions continue after the cached tokens
            position_ids = self.position_ids[:, past_key_values_length : past_key_values_length + seq_length]
        if inputs_embeds is None:
            table = self.word_embeddings
            weight = table.weight if word_weight is None else word_weight
            inputs_embeds = F.embedding(input_ids, weight, table.padding_idx, sparse=sparse_grad)
        embeddings = inputs_embeds + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    """Multi-head attention. Self-attention when `encoder_hidden_states` is None, else cross-attention whose queries
    are text and whose keys/values are image tokens (projected from `encoder_width` to `hidden_size`)."""

    def __init__(self, config, is_cross_attention: bool, layer_idx: int = 0):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = config.hidden_size
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = Linear(config.hidden_size, self.all_head_size)
        self.key = Linear(kv_width, self.all_head_size)
        self.value = Linear(kv_width, self.all_head_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.is_cross_attention = is_cross_attention
        self.layer_idx = layer_idx  # where a cache keeps this layer's K/V

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                past_key_value: DecoderCache | None = None, is_causal: bool = False, packing: Packing | None = None):
        """Returns (context (B, T, H), the cache); with a `packing`, hidden states and context are the real tokens
        only, (N, H).

        `attention_mask` is an additive bias broadcastable to (B, nh, T, S), or None. `past_key_value` is the
        decoder's cache (see `cache.py`), which keeps this layer's K/V and attends: for self-attention the new K/V
        join the cached ones; for cross-attention the image's are made once and reused. `is_causal` lets SDPA build
        the causal mask itself (no padding, no cache).
        """
        def heads(projected):  # (B, T, H) or packed (N, H) -> (B, nh, T, hs)
            return self.transpose_for_scores(projected if packing is None else packing.pad(projected))

        query = heads(self.query(hidden_states))  # (B, nh, T, hs)
        if self.is_cross_attention:
            if past_key_value is None:
                context = self.attend(query, *self.image_key_value(encoder_hidden_states), encoder_attention_mask)
            else:
                context = past_key_value.cross_attention(self, query, encoder_hidden_states, encoder_attention_mask)
        else:
            key, value = heads(self.key(hidden_states)), heads(self.value(hidden_states))
            if past_key_value is None:
                context = self.attend(query, key, value, attention_mask, is_causal)
            else:
                context = past_key_value.self_attention(self, query, key, value, attention_mask, is_causal)
        b, _, t, _ = query.shape
        context = context.transpose(1, 2).reshape(b, t, self.all_head_size)  # (B, T, H)
        return (context if packing is None else packing.unpad(context)), past_key_value

    def image_key_value(self, encoder_hidden_states) -> tuple[torch.Tensor, torch.Tensor]:
        """The image tokens (B_img, N, E) projected to keys and values, (B_img, nh, N, hs) each."""
        return (self.transpose_for_scores(self.key(encoder_hidden_states)),
                self.transpose_for_scores(self.value(encoder_hidden_states)))

    def attend(self, query, key, value, attention_mask=None, is_causal: bool = False) -> torch.Tensor:
        """softmax(q k^T / sqrt(hs) + mask) v, with attention dropout in training: (B, nh, T, hs). The query batch
        may be k times the key batch (k text rows per image share its K/V: `attend_per_image`)."""
        dropout_p = self.dropout_p if self.training else 0.0
        return attend_per_image(F.scaled_dot_product_attention, query, key, value, attn_mask=attention_mask,
                                dropout_p=dropout_p, is_causal=is_causal and attention_mask is None)


class BertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    """Attention followed by its output projection, residual and LayerNorm."""

    def __init__(self, config, is_cross_attention: bool = False, layer_idx: int = 0):
        super().__init__()
        self.self = BertSelfAttention(config, is_cross_attention, layer_idx)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                past_key_value: DecoderCache | None = None, is_causal: bool = False, packing: Packing | None = None):
        context, past_key_value = self.self(hidden_states, attention_mask, encoder_hidden_states,
                                            encoder_attention_mask, past_key_value, is_causal, packing)
        return self.output(context, hidden_states), past_key_value


class BertIntermediate(nn.Module):
    """The feed-forward block's first half: dense, then BERT's exact (erf) GELU (applied in BertLayer.feed_forward)."""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)


class BertOutput(nn.Module):
    """The second half: dense, dropout, residual, LayerNorm (BertLayer.feed_forward)."""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)


class BertLayer(nn.Module):
    """Self-attention, then (mode 'multimodal') cross-attention to the image tokens, then the feed-forward block."""

    def __init__(self, config, layer_num: int):
        super().__init__()
        self.layer_num = layer_num
        self.attention = BertAttention(config, layer_idx=layer_num)
        if config.add_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True, layer_idx=layer_num)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                past_key_value: DecoderCache | None = None, mode: str = "multimodal", is_causal: bool = False,
                packing: Packing | None = None):
        """Returns the hidden states; with a `packing`, (N, H)."""
        hidden_states, _ = self.attention(hidden_states, attention_mask, past_key_value=past_key_value,
                                          is_causal=is_causal, packing=packing)
        if mode == "multimodal":
            if not hasattr(self, "crossattention"):
                raise ValueError("mode='multimodal' needs a decoder built with add_cross_attention=True")
            if encoder_hidden_states is None and past_key_value is None:
                raise ValueError("mode='multimodal' needs encoder_hidden_states (the image tokens)")
            hidden_states, _ = self.crossattention(hidden_states, None, encoder_hidden_states, encoder_attention_mask,
                                                   past_key_value=past_key_value, packing=packing)
        return self.feed_forward(hidden_states)

    def feed_forward(self, hidden_states):
        """intermediate (dense, GELU), then output (dense, dropout, residual, LayerNorm), with the GELU folded into
        the output's dense (`gelu_linear`: the wide hidden activation is kept once for backward, not twice)."""
        out = self.output
        hidden = self.intermediate.dense(hidden_states)
        if isinstance(out.dense, nn.Linear):
            wide = gelu_linear(hidden, out.dense.weight, out.dense.bias, packed=not self.training)
        else:  # a projection without a float weight to fold GELU into (int8: `int8.quantize`)
            wide = out.dense(F.gelu(hidden))
        return out.LayerNorm(out.dropout(wide) + hidden_states)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BertLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                cache: DecoderCache | None = None, use_cache: bool = False, mode: str = "multimodal",
                is_causal: bool = False, packing: Packing | None = None):
        """Returns (hidden states, the cache: the one given, a new `DecoderCache` for `use_cache`, or None)."""
        # Checkpointing recomputes a layer in backward: a cache (for decoding) would take its K/V twice.
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        if cache is None and use_cache and not checkpointing:
            cache = DecoderCache()
        for layer_module in self.layer:
            args = (hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, cache, mode,
                    is_causal, packing)
            if checkpointing:
                # Non-reentrant checkpointing recomputes the layer in backward; BLIP's reentrant version was broken.
                hidden_states = checkpoint(layer_module, *args, use_reentrant=False)
            else:
                hidden_states = layer_module(*args)
        if cache is not None:
            cache.advance(hidden_states.shape[1])
        return hidden_states, cache


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))  # the first ([CLS]/[DEC]) token


class BertModel(nn.Module):
    def __init__(self, config, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def get_extended_attention_mask(self, attention_mask, input_shape, past_length: int, is_decoder: bool, dtype):
        """An additive bias (B, 1, T, past+T) from a 0/1 padding mask (B, past+T): causal `j <= i` times padding
        when decoding, padding alone otherwise. None when nothing is masked and SDPA can do causality itself."""
        batch, seq_length = input_shape
        if is_decoder:
            seq_ids = torch.arange(seq_length, device=attention_mask.device)
            causal = seq_ids[None, :] <= seq_ids[:, None]  # (T, T): query i sees key j <= i
            # Cached keys come before the new queries: all visible.
            causal = torch.cat([causal.new_ones(seq_length, past_length), causal], dim=1)
            mask = causal[None, None] & attention_mask[:, None, None, :].bool()
        else:
            mask = attention_mask[:, None, None, :].bool()
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, cache: DecoderCache | None = None,
                use_cache: bool | None = None, is_decoder: bool = False, mode: str = "multimodal",
                pack_padding: bool = False, sparse_grad: bool = False, word_weight: torch.Tensor | None = None):
        """`pack_padding=True` (with an `attention_mask`, no cache): the layers run on the real tokens only (see
        `Packing`); the last hidden state is zero at the padding instead of a value nobody should use.
        `sparse_grad`, `word_weight`: see `BertEmbeddings`."""
        tokens = input_ids if input_ids is not None else inputs_embeds[..., 0]  # (B, T)
        seq_length = tokens.shape[1]
        if cache is not None and position_ids is None:  # positions continue after the cached tokens
            position_ids = cache.position_ids(seq_length, tokens.device)
        embedding_output = self.embeddings(input_ids=input_ids, position_ids=position_ids,
                                           inputs_embeds=inputs_embeds, sparse_grad=sparse_grad,
                                           word_weight=word_weight)
        batch = embedding_output.shape[0]
        dtype = embedding_output.dtype

        is_causal = False
        own_mask = None if cache is None else cache.self_attention_mask(attention_mask, dtype)
        past_length = 0 if cache is None or own_mask is not None else len(cache)
        if own_mask is not None:
            extended_attention_mask = own_mask  # a cache whose keys are its own (a static cache's slots)
        elif attention_mask is None and past_length == 0 and is_decoder:
            extended_attention_mask, is_causal = None, True  # SDPA's own causal mask: the fast path
        elif attention_mask is None and (past_length == 0 or seq_length == 1):
            extended_attention_mask = None  # nothing to mask: one new token sees every cached one
        else:
            if attention_mask is None:
                attention_mask = torch.ones(batch, past_length + seq_length, device=embedding_output.device)
            extended_attention_mask = self.get_extended_attention_mask(
                attention_mask, (batch, seq_length), past_length, is_decoder, dtype)

        if encoder_attention_mask is not None and mode == "multimodal":
            # (B_img, N) 0/1 -> additive (B_img, 1, 1, N); cross K/V are per image, so is this mask
            encoder_attention_mask = torch.zeros(encoder_attention_mask.shape, dtype=dtype,
                                                 device=encoder_attention_mask.device).masked_fill(
                encoder_attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]
        elif encoder_hidden_states is None and cache is not None and mode == "multimodal":
            encoder_attention_mask = cache.cross_mask  # a step over cached image K/V: the mask they came with

        packing = None
        if pack_padding and attention_mask is not None and cache is None and not use_cache:
            packing = Packing.from_mask(attention_mask)
            if packing.index.numel() == batch * seq_length:
                packing = None  # no padding in this batch: nothing to skip
            else:
                embedding_output = packing.unpad(embedding_output)
        sequence_output, cache = self.encoder(
            embedding_output, attention_mask=extended_attention_mask,
            encoder_hidden_states=encoder_hidden_states if mode == "multimodal" else None,
            encoder_attention_mask=encoder_attention_mask, cache=cache, use_cache=bool(use_cache), mode=mode,
            is_causal=is_causal, packing=packing)
        if cache is not None and encoder_hidden_states is not None and mode == "multimodal":
            cache.cross_mask = encoder_attention_mask
        if packing is not None:
            sequence_output = packing.pad(sequence_output)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        return BertModelOutput(last_hidden_state=sequence_output, pooler_output=pooled_output, cache=cache)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = nn.GELU()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    """Transform, then project onto the vocabulary with the (tied) word embeddings plus a per-token bias."""

    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states, weight: torch.Tensor | None = None):
        """`weight`: the projection to use instead of `decoder.weight` (its alias from `TiedTable`)."""
        if weight is None and not isinstance(self.decoder, nn.Linear):  # no float weight (int8: `int8.quantize`)
            return self.decoder(self.transform(hidden_states)) + self.bias
        weight = self.decoder.weight if weight is None else weight
        return linear(self.transform(hidden_states), weight, self.bias, packed=not self.training)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output, weight: torch.Tensor | None = None):
        return self.predictions(sequence_output, weight)


class BertLMHeadModel(ReleasesPackedOnTrain, nn.Module):
    """The caption decoder: `BertModel` without pooler + LM head tied to the word embeddings, next-token loss."""

    def __init__(self, config, label_smoothing: float = 0.1):
        super().__init__()
        self.config = config
        self.label_smoothing = label_smoothing
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module):
        """BERT's initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorm."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def tie_weights(self):
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def set_gradient_checkpointing(self, enable: bool = True):
        self.bert.encoder.gradient_checkpointing = enable

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, encoder_hidden_states=None,
                encoder_attention_mask=None, labels=None, cache: DecoderCache | None = None,
                use_cache: bool | None = None, return_logits: bool = False, is_decoder: bool = True,
                reduction: str = "mean", mode: str = "multimodal", output_logits: bool = True,
                logits_to_keep: int = 0):
        """Next-token loss on `logits[:, :-1]` vs `labels[:, 1:]` (-100 ignored, label smoothing).

        `reduction='mean'` averages over target tokens, `'none'` gives one summed loss per sequence.
        `return_logits=True` returns the shifted logits tensor (B, T-1, V) itself, as BLIP does.
        `output_logits=False` (with labels) skips the full (B, T, V) logits and runs the LM head only on the
        positions that have a target, and the layers only on the tokens that `attention_mask` keeps: the same loss
        for less work, as long as padding has no target (-100, as the collate makes it).
        `logits_to_keep=n` (no labels): logits for the last n positions only, (B, n, V), as transformers' models
        take it (decoding's prompt needs its last position's); 0 keeps them all.
        """
        if logits_to_keep and (labels is not None or return_logits):
            raise ValueError("logits_to_keep is for inference: it cannot be combined with labels or return_logits")
        # Only the targets' hidden states are read when the full logits are not wanted: padding can be skipped.
        target_only = labels is not None and not output_logits and not return_logits
        on_cpu = input_ids is not None and cpu_savings_pay(input_ids.device)
        # Where the targets are, found before the layers run: on a GPU, finding them (and the packing's real
        # tokens, next) waits for the queued work once, here, rather than again after the whole forward.
        target_rows = (labels[:, 1:] != -100).nonzero(as_tuple=True) if target_only else None
        # With a loss, the (tied) LM head's dense gradient takes the embedding rows' sparse one in place
        # (`TiedTable`; torch.compile keeps the dense lookup: it does not trace sparse gradients).
        tied = self.cls.predictions.decoder.weight is self.bert.embeddings.word_embeddings.weight
        sparse_grad = (on_cpu and labels is not None and tied and torch.is_grad_enabled()
                       and not torch.compiler.is_compiling())
        word_weight = head_weight = None
        if sparse_grad:
            word_weight, head_weight = TiedTable.apply(self.cls.predictions.decoder.weight)
        outputs = self.bert(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            encoder_hidden_states=encoder_hidden_states,
                            encoder_attention_mask=encoder_attention_mask, cache=cache, use_cache=use_cache,
                            is_decoder=is_decoder, mode=mode, pack_padding=target_only and on_cpu,
                            sparse_grad=sparse_grad, word_weight=word_weight)
        sequence_output = outputs.last_hidden_state  # (B, T, H)
        if return_logits:
            return self.cls(sequence_output, head_weight)[:, :-1, :].contiguous()

        kept = sequence_output[:, -logits_to_keep:] if logits_to_keep else sequence_output
        logits = self.cls(kept, head_weight) if (output_logits or labels is None) else None
        loss = None
        if labels is not None:
            targets = labels[:, 1:]  # (B, T-1)
            if logits is not None:
                token_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             reduction="none", label_smoothing=self.label_smoothing)
                token_loss = token_loss.view(targets.shape)
                valid = targets != -100
                if reduction == "none":
                    loss = token_loss.sum(1)
                else:
                    loss = token_loss.sum() / valid.sum()
            else:
                loss = self._target_only_loss(sequence_output[:, :-1], targets, target_rows, reduction, head_weight)
        return CausalLMOutput(loss=loss, logits=logits, cache=outputs.cache)

    def _target_only_loss(self, hidden, targets, rows, reduction, head_weight=None):
        """The loss with the LM head (the largest matmul) applied only at positions with a target, `rows`."""
        valid = targets != -100  # (B, T-1)
        token_loss = F.cross_entropy(self.cls(hidden[rows], head_weight), targets[rows], reduction="none",
                                     label_smoothing=self.label_smoothing)
        if reduction == "none":  # per-sequence sums
            return torch.zeros(targets.shape[0], dtype=token_loss.dtype,
                               device=token_loss.device).index_add(0, rows[0], token_loss)
        return token_loss.sum() / valid.sum()


# Training-time savings on the CPU: the padding skip and the tied table's sparse gradient.


def cpu_savings_pay(device: torch.device) -> bool:
    """Whether the training forward skips the decoder's padding (`Packing`) and makes the word embeddings'
    gradient sparse. Both save work on the CPU; on a GPU, where a BERT-base decoder at BLIP's batch sizes is bound
    by kernel launches rather than by arithmetic, they cost more than they save (an H100, batch 32 at 384 px, bf16:
    83 ms a step without either, 90 ms with both; see the README's Speed section)."""
    return torch.device(device).type == "cpu"


@dataclass
class Packing:
    """Where the real tokens of a right- or left-padded (B, T) batch are. With a packing, the decoder layers run their
    per-token work (projections, feed-forward, LayerNorms) on the N real tokens only, as (N, H); attention scatters
    them back to (B, T) with zeros at the padding, which the attention mask hides. Exact for every real token:
    padding is never a key, and its own outputs are dropped. In BLIP-length batches a third of the slots are
    padding."""

    index: torch.Tensor  # (N,) flat positions b * T + t of the real tokens
    batch: int
    length: int

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> Packing:
        return cls(attention_mask.flatten().nonzero().squeeze(1), *attention_mask.shape)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)"""
        return x.flatten(0, 1).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at the padding."""
        rest = x.shape[1:]
        return x.new_zeros(self.batch * self.length, *rest).index_copy(0, self.index, x).view(
            self.batch, self.length, *rest)


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
