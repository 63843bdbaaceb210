"""Rotary position ids per model family: 1-D (LLaVA) or three-axis M-RoPE (Qwen2-VL, arXiv 2409.12191).

The engine keeps every row's positions batch-first, so that row selection, merging and VTE's
re-packing index them like the hidden states: (B, T) for 1-D rotary, (B, T, 3) for M-RoPE
(temporal, height, width). A rule turns a prompt batch into those ids and into each row's next
position, and converts the engine's layout into what the family's rotary module and decoder
layers take.

- "sequence": position = number of valid tokens before it (`cumsum(mask) - 1`, as `generate`);
  the next token continues at the last position + 1.
- "mrope": the model's own `get_rope_index` (never re-implemented here): text tokens advance all
  three axes together, an image's tokens take (t, row, column) offsets on its patch grid, so a
  row's positions end at `max + 1 < length` and `rope_deltas = max + 1 - length`. Decoding
  continues as transformers' `generate` does: next position = valid length + rope delta on all
  three axes (text positions), unchanged by a visual-token exit (text rows keep their positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SequencePositions:
    """1-D rotary positions (Llama / Mistral / Qwen2 text backbones of LLaVA)."""

    def prefill(self, model: Any, adapter: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) long mask -> positions (B, T) and next positions (B,)."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # as transformers' generate
        return position_ids, position_ids[:, -1] + 1

    def rotary_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        return position_ids  # (B, Tq)

    def layer_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        return position_ids


@dataclass(frozen=True)
class MRoPEPositions:
    """Three-axis M-RoPE positions from the model's `get_rope_index` (Qwen2-VL, Qwen2.5-VL)."""

    def prefill(self, model: Any, adapter: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """-> positions (B, T, 3) and next positions (B, 3)."""
        rope_index = adapter.get(model, "rope_index")
        extra = {k: inputs[k] for k in adapter.position_inputs if inputs.get(k) is not None}
        if "mm_token_type_ids" not in extra:
            raise ValueError("M-RoPE positions need the processor's mm_token_type_ids (which tokens are image "
                             "tokens); pass the processor outputs through Pipeline.vision_inputs")
        position_ids, deltas = rope_index(input_ids, attention_mask=attention_mask, **extra)  # (3, B, T), (B, 1)
        position_ids = position_ids.permute(1, 2, 0)  # (B, T, 3)
        next_position = attention_mask.sum(-1, keepdim=True) + deltas.to(attention_mask.device)  # (B, 1)
        return position_ids, next_position.expand(-1, 3).to(position_ids.dtype).contiguous()

    def rotary_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        return position_ids.permute(2, 0, 1)  # (B, Tq, 3) -> (3, B, Tq), the rotary module's layout

    def layer_ids(self, position_ids: torch.Tensor) -> None:
        # transformers' Qwen2-VL text model hands its layers no 1-D positions (only packed inputs do)
        return None


POSITIONS: dict[str, Any] = {
    "sequence": SequencePositions(),
    "mrope": MRoPEPositions(),
}


def positions_for(adapter: Any):
    try:
        return POSITIONS[adapter.positions]
    except KeyError:
        raise ValueError(f"unknown position rule {adapter.positions!r}; choose from {', '.join(POSITIONS)}") from None
