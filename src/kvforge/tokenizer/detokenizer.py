"""Incremental detokenization: UTF-8 safe deltas and stop strings across token boundaries."""

from __future__ import annotations

from kvforge.tokenizer.tokenizer import Tokenizer

# Prompt tokens kept as left context so the first output token decodes with its real spacing.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one sequence's new tokens into text, never emitting half a character.

    Holds back text that could be the start of a stop string until it is decided; when a stop
    string appears the text is cut before it (or after it with ``include_stop_str_in_output``).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop or []
        self.include_stop = include_stop_str_in_output
        self._ids = prompt_token_ids[-_CONTEXT_TOKENS:]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""  # all decoded output text
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        self.stop_reason: str | None = None

    @property
    def output_text(self) -> str:
        """Text safe to show now (excludes a suffix that may still become a stop string)."""
        if self.stop_reason is not None or self._max_stop_len == 0:
            return self._text
        return self._text[: max(0, len(self._text) - self._max_stop_len + 1)]

    @property
    def final_text(self) -> str:
        """All decoded text (for a finished sequence)."""
        return self._text

    def add_token(self, token_id: int) -> bool:
        """Decode one more token; return True when a stop string was matched."""
        self._ids.append(token_id)
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset], skip)
        new_text = decode(self._ids[self._prefix_offset :], skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return False  # an incomplete UTF-8 sequence: wait for the next token
        start = len(self._text)
        self._text += new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._check_stop(start)

    def _check_stop(self, new_start: int) -> bool:
        if not self.stop:
            return False
        search_from = max(0, new_start - self._max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self._text.find(stop, search_from)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return False
        index, stop = best
        self._text = self._text[: index + len(stop) if self.include_stop else index]
        self.stop_reason = stop
        return True
