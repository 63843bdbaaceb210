"""Incremental detokenization: amortized O(1) work per generated token, same text as a full decode.

Decoding the whole sequence after every token is O(n²) over a generation. Instead each step
decodes two short windows that start at `prefix` (a token boundary at which text was last
emitted): ids[prefix:read] (text already emitted from that window) and ids[prefix:] (with the
new tokens). The difference is the new text. Starting both windows at the same token keeps
decoders that treat the first token specially (SentencePiece's leading-space strip) consistent.
New text is held back while it ends in U+FFFD, i.e. while the last tokens are an incomplete
multi-byte UTF-8 sequence (byte-level BPE). SentencePiece byte-fallback tokens (<0xNN>) are held
back until a non-byte token closes their run, because the decoder validates a run of byte
tokens as a whole (an invalid run becomes one U+FFFD per byte, so a later byte can change the
text of earlier ones); skipped special tokens are held too, since they vanish before the
decoder and join the byte runs on both sides. `finish` decodes the whole sequence once and returns what was
not emitted yet, so the final text is exactly `tokenizer.decode(ids)` even for byte sequences
that never become valid UTF-8.
"""

from __future__ import annotations

import functools
import re
from typing import Any

REPLACEMENT = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@functools.lru_cache(maxsize=16)
def byte_fallback_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokenizer's byte-fallback tokens (<0x00> .. <0xFF>), computed once per tokenizer."""
    vocab = tokenizer.get_vocab()
    return frozenset(i for token, i in vocab.items() if len(token) == 6 and _BYTE_TOKEN.fullmatch(token))


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # text emitted so far (a prefix of the full decode)
        self.prefix = 0  # window start: a token boundary where emitted text ended
        self.read = 0  # tokens whose text is in `self.text`
        # Tokens after which nothing is emitted: byte-fallback tokens, and skipped special tokens
        # (they vanish before the decoder, so the byte runs on both sides of one join up).
        self.hold_ids = byte_fallback_ids(tokenizer) | (frozenset(tokenizer.all_special_ids) if self.skip else frozenset())

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ('' while held back)."""
        self.ids.append(token)
        if token in self.hold_ids:  # a run of bytes may still be invalidated by the next byte
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT) or not after.startswith(before):
            return ""
        delta = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The full decode's text not emitted yet; afterwards `self.text` is the full decode."""
        full = self._decode(self.ids)
        delta = full[len(self.text) :] if full.startswith(self.text) else full
        self.text, self.prefix, self.read = full, len(self.ids), len(self.ids)
        return delta
