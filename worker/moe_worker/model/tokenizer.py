"""A byte-level tokenizer (the ``tokenizers`` library) for synthetic models and tests.

256 byte tokens (GPT-2's byte-to-unicode alphabet, no merges) plus ``<|bos|>`` and ``<|eos|>``:
any text round-trips, and a prefix of a multibyte character decodes to U+FFFD until completed.
"""

from __future__ import annotations

from typing import Any

BOS, EOS = "<|bos|>", "<|eos|>"


def byte_level_tokenizer() -> Any:
    """A transformers ``PreTrainedTokenizerFast`` over a byte-level BPE without merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BOS, EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS)
