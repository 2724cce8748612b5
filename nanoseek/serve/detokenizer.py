"""Incremental detokenization and stop strings for one request.

What. `Detokenizer.add(token_ids)` decodes the generated tokens so far and returns the new text that is safe to
emit: never half a UTF-8 character (text ending in U+FFFD is held back until the next token completes it) and
never the first characters of a possible stop string (the last len(longest stop) - 1 characters wait). When a
stop string appears anywhere in the decoded text, even split across tokens, the text is cut before it and
`stopped` becomes True. `finish()` releases what was held back (the request ended for another reason).
Why decode the whole output each time: byte-level BPE merges across token boundaries, so decoding tokens one
by one and concatenating is wrong; a window of the last few tokens (vLLM's prefix offset) is faster for long
outputs but outputs here are short and the whole decode is obviously right.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded text, cut at a stop string once one is found
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Append tokens that count as text; return the newly emitted text."""
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        complete = text.rstrip(REPLACEMENT) if text.endswith(REPLACEMENT) else text
        hits = [i for s in self.stop if (i := text.find(s, max(0, self.emitted - len(s) + 1))) != -1]
        if hits:
            self.text, self.stopped = text[: min(hits)], True
            return self._emit(len(self.text))
        self.text = complete
        return self._emit(max(self.emitted, len(complete) - self.hold))

    def finish(self) -> str:
        """The request ended: emit all of the text held back (an incomplete final character stays out)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        new = self.text[self.emitted: upto]
        self.emitted = max(self.emitted, upto)
        return new
