"""Offline tokenizers for the built-in tiny models.

No tokenizer files can be downloaded here, so the tiny pipelines use a character-level
tokenizer built with the `tokenizers` library: every printable ASCII character is one token,
so distinct prompts give distinct token sequences and subject words can be located through the
offsets mapping exactly as with a real tokenizer. Special tokens: <pad>=0, <unk>=1, <bos>=2,
and <eos> is the largest id (CLIP's pooled output takes the argmax id as end of text).
"""
from __future__ import annotations

import string


def char_tokenizer(model_max_length: int = 77, add_bos: bool = True, pad_token: str = "<pad>"):
    """A `transformers.PreTrainedTokenizerFast` over printable ASCII, vocab size 100."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]  # 95 chars, ' ' included
    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2}
    for c in chars:
        vocab[c] = len(vocab)
    vocab["<eos>"] = len(vocab)  # 98
    vocab["<mask>"] = len(vocab)  # 99: keeps the vocab at 100
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
            special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="$A <eos>", pair="$A <eos> $B <eos>", special_tokens=[("<eos>", vocab["<eos>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, pad_token=pad_token,
        unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", mask_token="<mask>",
    )
    return fast


VOCAB_SIZE = 100
EOS_ID = 98
PAD_ID = 0
