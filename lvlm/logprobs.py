"""Token log-probabilities of a decode step, as OpenAI's `logprobs` / `top_logprobs` report them.

Which distribution: log_softmax of the logits the token was chosen from, i.e. the model's
next-token logits after every intervention (attention edits change them inside the forward;
plans with helper rows, such as an image-removed twin, combine them in `Plan.adjust_logits`),
before temperature and top-p. Greedy decoding picks this distribution's argmax, and with no
intervention it equals `log_softmax` of transformers' `generate(..., output_scores=True)` scores
(tested), so the numbers mean the same at every temperature. This is vLLM's default
("raw" logprobs) too; sampling warpers only decide which token is drawn.

Only rows that asked pay: one log_softmax, gather and top-k over those rows per step, and one
extra device-to-host copy. Token text and bytes come from `TokenPieces`, cached per token id.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Sequence

import torch

from lvlm_hallu.lvlm.types import TokenLogprob

MAX_TOP = 20  # OpenAI's bound on top_logprobs
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPIECE_SPACE = "\u2581"  # SentencePiece's "▁" word-start marker


def step_logprobs(logits: torch.Tensor, tokens: Sequence[int], wants: Sequence[int | None]
                  ) -> list[tuple[float, list[tuple[int, float]]] | None] | None:
    """For each row b with wants[b] = k (not None): (log p(tokens[b]), the k most likely (id, log p)).

    logits: (B, V) fp32, the distribution rows chose from. None when no row asks (no work)."""
    asking = [b for b, k in enumerate(wants) if k is not None]
    if not asking:
        return None
    index = torch.tensor(asking, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)  # (R, V)
    chosen_ids = torch.tensor([tokens[b] for b in asking], device=logits.device)
    chosen = logp.gather(1, chosen_ids[:, None])[:, 0]  # (R,)
    k = min(max(wants[b] for b in asking), logp.shape[-1])
    if k > 0:
        top_lp, top_ids = logp.topk(k, dim=-1)  # (R, k), most likely first
        chosen, top_lp, top_ids = chosen.tolist(), top_lp.tolist(), top_ids.tolist()
    else:
        chosen, top_lp, top_ids = chosen.tolist(), [[] for _ in asking], [[] for _ in asking]
    out: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(wants)
    for r, b in enumerate(asking):
        kb = wants[b]
        out[b] = (chosen[r], list(zip(top_ids[r][:kb], top_lp[r][:kb])))
    return out


class TokenPieces:
    """Text and UTF-8 bytes of single tokens, cached per id.

    A token's text is how it reads inside a sequence: SentencePiece's "▁" is a space, and a word
    token keeps its leading space even though decoding it alone strips it. A byte-fallback token
    (<0xE2>) or a byte-level BPE token holding part of a multi-byte character has no text of its
    own: its bytes are the raw bytes and its text their escape ("\\xe2"), as OpenAI does; joining
    the bytes of consecutive tokens gives the characters.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, tuple[int, ...]]] = {}
        self._byte_decoder: dict[str, int] | None = None

    def __call__(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        piece = self._cache.get(token_id)
        if piece is None:
            piece = self._cache[token_id] = self._piece(token_id)
        return piece

    def entry(self, token_id: int, logprob: float, top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
        text, raw = self(token_id)
        return TokenLogprob(token_id=token_id, token=text, bytes=raw, logprob=logprob, top=top)

    def _piece(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        tok = self.tokenizer
        name = tok.convert_ids_to_tokens(token_id)
        name = name if isinstance(name, str) else ""
        match = _BYTE_TOKEN.fullmatch(name)
        if match:
            raw = bytes([int(match.group(1), 16)])
            return raw.decode("utf-8", "backslashreplace"), tuple(raw)
        text = tok.decode([token_id], skip_special_tokens=False)
        if "\ufffd" in text:  # part of a multi-byte character: recover the bytes from the piece
            raw = self._byte_level(name)
            if raw is not None:
                return raw.decode("utf-8", "backslashreplace"), tuple(raw)
        if name.startswith(_SPIECE_SPACE) and not text.startswith(" "):
            text = " " + text  # the decoder strips the space of a sequence's first word only
        return text, tuple(text.encode("utf-8"))

    def _byte_level(self, name: str) -> bytes | None:
        """The bytes of a GPT-2 byte-level BPE piece ("Ġ" is the space byte ...), None if not one."""
        if self._byte_decoder is None:
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self._byte_decoder = {ch: b for b, ch in bytes_to_unicode().items()}
        try:
            return bytes(self._byte_decoder[ch] for ch in name)
        except KeyError:
            return None


@functools.lru_cache(maxsize=16)
def pieces_for(tokenizer: Any) -> TokenPieces:
    """One `TokenPieces` per tokenizer, so its cache outlives single requests."""
    return TokenPieces(tokenizer)
