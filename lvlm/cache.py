"""KV cache in which every layer keeps its own length and rows can leave between steps.

Layout per layer l: keys/values (B, Hkv, T_l, D), left-padded, plus `start[l]` (B,) int32, the
first valid key of each row. Layers may differ in T_l (visual-token exit stores no visual keys
after the exit layer). `select_rows` keeps a subset of the batch (finished requests, VHR's
image-removed twin rows after prefill) and trims key columns that became padding for every
remaining row. transformers' attention modules only call `update`.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.start: list[torch.Tensor | None] = [None] * num_layers
        # Per-layer scratch owned by the intervention plan (e.g. key classes), indexed like keys.
        self.extras: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]

    def __len__(self) -> int:
        return len(self.keys)

    def length(self, layer: int) -> int:
        k = self.keys[layer]
        return 0 if k is None else k.shape[2]

    def begin_layer(self, layer: int, start: torch.Tensor) -> None:
        """Declare where each row's keys will start before a layer's first (prefill) update."""
        if self.keys[layer] is None:
            self.start[layer] = start.to(torch.int32)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append (B, Hkv, T_new, D) keys/values to a layer; return the layer's full keys/values."""
        if self.keys[layer_idx] is None:
            if self.start[layer_idx] is None:
                self.start[layer_idx] = torch.zeros(key.shape[0], dtype=torch.int32, device=key.device)
            self.keys[layer_idx], self.values[layer_idx] = key, value
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep the rows in `index` (1-D long) in every layer, dropping all-padding key columns."""
        for layer in range(len(self)):
            if self.keys[layer] is None:
                continue
            start = self.start[layer].index_select(0, index)
            trim = int(start.min()) if start.numel() else 0
            self.keys[layer] = self.keys[layer].index_select(0, index)[:, :, trim:]
            self.values[layer] = self.values[layer].index_select(0, index)[:, :, trim:]
            self.start[layer] = start - trim
            self.extras[layer] = {
                name: t.index_select(0, index)[:, trim:] if t.dim() == 2 else t.index_select(0, index)
                for name, t in self.extras[layer].items()
            }

    def replace_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor) -> None:
        """Overwrite one layer's cache (used when rows are repacked after a token exit)."""
        self.keys[layer], self.values[layer], self.start[layer] = keys, values, start.to(torch.int32)
