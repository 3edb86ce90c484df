"""Train a fast tokenizer on the training text with the ``tokenizers`` library, for models built from a config.

``backbone.train_tokenizer`` asks for one: ``{algorithm: unigram, vocab_size: 8000}``. The result is a
``PreTrainedTokenizerFast`` whose special tokens the fresh model's config is then matched to (``vocab_size``,
``pad``/``eos``/``bos``/``decoder_start`` ids; see ``backbones.match_tokenizer``), and it is saved with the model.
Unigram suits T5, byte-level BPE GPT-2 and BART, WordPiece BERT (with BERT's ``[CLS]``/``[SEP]``/``[MASK]``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning_ft.errors import UserError

ALGORITHMS = ("unigram", "bpe", "wordpiece")
# Ids 0.. in this order: <pad> is 0 as T5 expects; BART-style models get their ids matched to these.
SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "bos_token": "<s>",
                  "mask_token": "<mask>"}
BERT_SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                       "mask_token": "[MASK]"}


def train_tokenizer(
    texts: Iterable[str],
    *,
    algorithm: str = "unigram",
    vocab_size: int = 8000,
    min_frequency: int = 2,
    lowercase: bool = False,
    add_bos: bool = False,
    add_eos: bool = True,
    max_length: int = 512,
    extra_special_tokens: Iterable[str] = (),
) -> Any:
    """A tokenizer trained on ``texts``: ``unigram`` (SentencePiece-style, as T5's), byte-level ``bpe`` or
    ``wordpiece``. ``extra_special_tokens`` (a chat template's markers) are added as special tokens, never split.

    Unigram and BPE sequences end with ``</s>`` unless ``add_eos`` is false (GPT-2 style: a prompt must not end a
    document); ``add_bos`` also starts them with ``<s>`` (BART's layout). WordPiece sequences are ``[CLS] ... [SEP]``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if algorithm not in ALGORITHMS:
        raise UserError(f"backbone.train_tokenizer.algorithm '{algorithm}' is not one of {', '.join(ALGORITHMS)}.")
    named = BERT_SPECIAL_TOKENS if algorithm == "wordpiece" else SPECIAL_TOKENS
    extra = [t for t in extra_special_tokens if t not in named.values()]
    specials = list(named.values()) + extra
    if vocab_size <= len(specials) + 1:
        raise UserError(f"backbone.train_tokenizer.vocab_size={vocab_size} leaves no room for words: give >= 100.")
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    if algorithm == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                          unk_token=SPECIAL_TOKENS["unk_token"], shrinking_factor=0.75)
    elif algorithm == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=BERT_SPECIAL_TOKENS["unk_token"]))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=specials)
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=None))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.normalizer = normalizers.Sequence(steps)
    count = 0

    def counted(source: Iterable[str]):
        nonlocal count
        for text in source:
            if text:
                count += 1
                yield text

    tokenizer.train_from_iterator(counted(texts), trainer=trainer)
    if count == 0:
        raise UserError("the tokenizer has no text to train on: the training split's text columns are empty.")
    if algorithm == "wordpiece":
        cls, sep = BERT_SPECIAL_TOKENS["cls_token"], BERT_SPECIAL_TOKENS["sep_token"]
        single, pair, used = f"{cls} $A {sep}", f"{cls} $A {sep} $B:1 {sep}:1", (cls, sep)
    else:
        bos, eos = SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]
        start, end = (f"{bos} " if add_bos else ""), (f" {eos}" if add_eos else "")
        single, pair, used = f"{start}$A{end}", f"{start}$A{end} $B{end}", (bos, eos)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tokenizer.token_to_id(t)) for t in used]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_length, **named)
    if extra:
        fast.add_tokens(extra, special_tokens=True)  # in the vocabulary already: marks them special
    return fast
