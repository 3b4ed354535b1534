"""Token ids → text as they stream, for one choice: no split characters, no stop strings.

Byte-level tokenizers spread one character over several tokens, so a token alone may decode to
a replacement character. Each step decodes the whole output and releases what is new, unless the
text ends in a replacement character (a character still incomplete). Stop strings (OpenAI
semantics: the text ends before the first stop string) are looked for in the whole text, and a
tail that could still grow into a stop string is held back until it cannot.

Decoding the whole output per token costs O(n²) in the output length; the engine does the same
for its own stop-string check, and at this server's `limits.max_tokens` it stays well below a
forward pass. What it buys: the streamed deltas always add up to the non-streamed answer,
`final_text(decode(ids), stop)`, whatever bytes the model emits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


def final_text(text: str, stop: Sequence[str]) -> str:
    """`text` cut before the earliest stop string (the non-streaming answer)."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.sent = ""  # text already released
        self.stopped = False  # a stop string was found: nothing more is released

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that is now safe to send (maybe "")."""
        self.ids.append(token_id)
        return "" if self.stopped else self._release(self.decode(self.ids), final=False)

    def finish(self) -> str:
        """The rest of the text once generation has ended (incomplete characters included)."""
        return "" if self.stopped else self._release(self.decode(self.ids), final=True)

    def _release(self, text: str, final: bool) -> str:
        cut = final_text(text, self.stop)
        if len(cut) < len(text):
            self.stopped, end = True, len(cut)
        elif final:
            end = len(text)
        else:
            end = len(text) - _partial_stop(text, self.stop)
            while end > len(self.sent) and text[end - 1] == REPLACEMENT:
                end -= 1  # maybe the first bytes of a character the next token completes
        if end <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) : end], text[:end]
        return delta


def _partial_stop(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
