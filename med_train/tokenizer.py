"""BERT WordPiece tokenizers with BLIP's extra tokens: `[DEC]` (the decoder's BOS) and `[ENC]`.

    tok = load_tokenizer("bert-base-uncased")            # hub name or local directory
    tok = train_tokenizer(captions, vocab_size=2000)     # trained on the fly with `tokenizers`
    tok.bos_token_id  # [DEC];  tok.sep_token_id ends a caption;  tok.pad_token_id pads
"""

from __future__ import annotations

from collections.abc import Iterable

from med_train.config import TokenizerConfig

DEC, ENC = "[DEC]", "[ENC]"
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _add_blip_tokens(tok):
    """Add [DEC] as BOS and [ENC] as an extra special token, as BLIP's init_tokenizer does."""
    if tok.bos_token != DEC:
        tok.add_special_tokens({"bos_token": DEC})
    if ENC not in tok.get_vocab():
        tok.add_tokens([ENC], special_tokens=True)
    tok.enc_token_id = tok.convert_tokens_to_ids(ENC)
    return tok


def load_tokenizer(name_or_dir: str):
    """A BERT tokenizer from the hub or a local directory, with [DEC] and [ENC] added if missing."""
    from transformers import BertTokenizerFast

    return _add_blip_tokens(BertTokenizerFast.from_pretrained(name_or_dir))


def train_tokenizer(captions: Iterable[str], vocab_size: int = 2000):
    """A lower-casing BERT WordPiece tokenizer trained on `captions`, with [DEC] and [ENC]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=_BERT_SPECIALS)
    core.train_from_iterator(captions, trainer=trainer)
    cls_id, sep_id = core.token_to_id("[CLS]"), core.token_to_id("[SEP]")
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    core.decoder = decoders.WordPiece(prefix="##")
    tok = BertTokenizerFast(tokenizer_object=core, do_lower_case=True, unk_token="[UNK]", pad_token="[PAD]",
                            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return _add_blip_tokens(tok)


def build_tokenizer(cfg: TokenizerConfig, captions: Iterable[str] | None = None):
    """The tokenizer a config asks for: trained on `captions` when `cfg.name == "train"`, else loaded."""
    if cfg.name == "train":
        if captions is None:
            raise ValueError("tokenizer.name is 'train' but no captions were given to train it on")
        return train_tokenizer(captions, cfg.vocab_size)
    return load_tokenizer(cfg.name)


def prompt_length(tokenizer, prompt: str) -> int:
    """Tokens the prompt takes at the start of a caption, [DEC] included (4 for BLIP's 'a picture of ')."""
    return len(tokenizer(prompt, add_special_tokens=True)["input_ids"]) - 1  # minus the trailing [SEP]


def encode_captions(tokenizer, captions: list[str], prompt: str, max_length: int) -> dict:
    """Tokenise `prompt + caption` for teacher forcing, BLIP's way.

    Returns `input_ids`, `attention_mask` (B, T) and `labels` (B, T): `[DEC]` replaces `[CLS]`, `[SEP]` ends the
    caption and is a target; pads and the prompt positions are -100 so the loss only covers the caption.
    """
    enc = tokenizer([prompt + c for c in captions], padding="longest", truncation=True, max_length=max_length,
                    return_tensors="pt")
    input_ids = enc["input_ids"]
    input_ids[:, 0] = tokenizer.bos_token_id
    labels = input_ids.masked_fill(enc["attention_mask"] == 0, -100)
    labels[:, : prompt_length(tokenizer, prompt)] = -100
    return {"input_ids": input_ids, "attention_mask": enc["attention_mask"], "labels": labels}
