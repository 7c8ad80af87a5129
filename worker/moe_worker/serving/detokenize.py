"""Generated token ids to text, incrementally, with stop strings.

``IncrementalDetokenizer`` turns ids into text deltas as they arrive. Byte-level vocabularies
split one character over several tokens, so decoding just the new token can give U+FFFD
(the replacement character) for a partial UTF-8 sequence: while the decoded text ends with
U+FFFD the delta is held back, and the token that completes the character releases it.
Decoding re-reads a small window of ids that starts at a point already emitted, so
tokenizers whose tokens decode differently at the start of a text (SentencePiece's leading
space) still give the right delta. Ids the tokenizer does not know (the model's vocabulary
padding: ids >= len(tokenizer)) and, by default, special tokens decode to nothing.

``StopStringMatcher`` cuts the text before the first stop string, also one that spans
several deltas; it holds back only the characters that could still begin a stop string.
``OutputText`` chains the two: what one generated token adds to the response.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 4  # prompt ids kept as decoding context for the first generated ones


class TokenDecoder:
    """A tokenizer's ``decode`` restricted to the ids it knows.

    ``tokenizer`` is a transformers tokenizer. Ids outside it (negative, or past its last id
    such as the padding rows of a model's embedding) are dropped, and so are special tokens
    when ``skip_special_tokens``."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.size = max([len(tokenizer), *(int(i) + 1 for i in added)])
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())

    def known(self, token_id: int) -> bool:
        """Whether ``token_id`` contributes text."""
        if not 0 <= token_id < self.size:
            return False
        return not (self.skip_special_tokens and token_id in self.special_ids)

    def keep(self, token_ids: Iterable[int]) -> list[int]:
        """The ids of ``token_ids`` that contribute text."""
        return [t for t in token_ids if self.known(t)]

    def decode(self, token_ids: Iterable[int]) -> str:
        """The text of ``token_ids``; unknown ids decode to nothing."""
        ids = self.keep(token_ids)
        if not ids:
            return ""
        text: str = self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )
        return text


class IncrementalDetokenizer:
    """Text deltas of a growing sequence of generated ids.

    The concatenation of every ``push`` and the final ``flush`` is the text of all the ids
    (for byte-level and SentencePiece tokenizers, exactly ``decoder.decode(ids)``, seen after
    ``context_ids``). ``context_ids`` (the prompt's tail) are decoded for context, never
    emitted; context ending in an incomplete character is dropped back to a whole one."""

    def __init__(self, decoder: TokenDecoder, context_ids: Sequence[int] = ()) -> None:
        self.decoder = decoder
        context = decoder.keep(context_ids)[-PROMPT_CONTEXT_TOKENS:]
        while context and decoder.decode(context).endswith(REPLACEMENT_CHAR):
            context.pop()
        self._ids = context
        # ids[_window:_emitted] are emitted already and give context to ids[_emitted:],
        # which are held (their text ended inside a character).
        self._window = 0
        self._emitted = len(context)

    def _delta(self, final: bool) -> str:
        if self._emitted == len(self._ids):
            return ""
        text = self.decoder.decode(self._ids[self._window :])
        if not final and text.endswith(REPLACEMENT_CHAR):
            return ""  # wait for the rest of the character
        before = self.decoder.decode(self._ids[self._window : self._emitted])
        self._window, self._emitted = self._emitted, len(self._ids)
        if text.startswith(before):
            return text[len(before) :]
        # A decoder that rewrote the context: emit what follows the common prefix.
        common = 0
        for a, b in zip(text, before, strict=False):
            if a != b:
                break
            common += 1
        return text[common:]

    def push(self, token_id: int) -> str:
        """The text ``token_id`` completes (often its own text, "" while held back)."""
        if not self.decoder.known(token_id):
            return ""
        self._ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        """The held-back text at the end of the sequence (U+FFFD for an unfinished char)."""
        return self._delta(final=True)


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop string in ``text`` starts, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that begins some stop string (and could
    become one with more text): the characters to hold back."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class StopStringMatcher:
    """Cuts a stream of text deltas before its first stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(stops)
        self.stopped = False
        self._held = ""

    def push(self, delta: str) -> str:
        """The text that can be released after ``delta``; sets ``stopped`` when a stop string
        is complete (the text is then cut before it, and later pushes give "")."""
        if self.stopped:
            return ""
        if not self.stops:
            return delta
        text = self._held + delta
        at = find_stop(text, self.stops)
        if at >= 0:
            self.stopped = True
            self._held = ""
            return text[:at]
        hold = stop_prefix_length(text, self.stops)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The held-back text when the sequence ends without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


class OutputText:
    """The response text of one generation: detokenized, cut at the first stop string."""

    def __init__(
        self, decoder: TokenDecoder, stops: Sequence[str] = (), context_ids: Sequence[int] = ()
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(decoder, context_ids)
        self._stops = StopStringMatcher(stops)

    @property
    def stopped(self) -> bool:
        """A stop string was found: the generation should end."""
        return self._stops.stopped

    def push(self, token_id: int) -> str:
        """The text ``token_id`` releases."""
        return self._stops.push(self._detokenizer.push(token_id))

    def finish(self) -> str:
        """The text held back when the generation ends."""
        if self._stops.stopped:
            return ""
        return self._stops.push(self._detokenizer.flush()) + self._stops.flush()
