"""Preallocated KV cache: per-layer lengths, per-row starts, chunked growth, rows that come and go.

Layout per layer l: buffers K, V of (B, Hkv, C_l, D) with capacity C_l, of which the first
`lengths[l]` = T_l columns are used, and `start[l]` (B,) int32, the first valid key of each row
(left padding: row b's keys are columns start[l][b] .. T_l - 1, right-aligned, so the token fed
at a step lands in column T_l for every row). Layers may differ in T_l (visual-token exit keeps no
visual keys after its exit layer). Beside the keys, `key_class` buffers of (B, C_l) uint8 hold
each key's class bits (kernels/edits.py: visual, sink, ...); unused columns stay 0 ("text").

Growth: when T_l + n > C_l the layer is reallocated to the next multiple of `chunk` columns (one
copy per `chunk` tokens instead of a `torch.cat` per layer per step, as before). Between growths
the buffers keep their shapes and addresses.

Rows: `select_rows` keeps a subset (finished requests, VHR's twins after prefill) and compacts:
it drops the key columns that became padding for every remaining row. When no column is dropped
and the rows keep their order, the kept rows move up inside the buffers (no new allocation). `merge`
appends the rows of another cache (requests joining a running batch, continuous batching); the
shorter side of each layer is left-padded so that both stay right-aligned. Columns past a layer's
length are never read unless `static_shapes` is set, so only then are new buffers zero-filled
beyond it (a fresh zero fill of every layer cost as much as two decode steps per row that left or
joined, on the shapes model on a CPU); the left padding inside the length is always zero.

`static_shapes=True` is the switch for a CUDA-graph capture of the decode step: `update` returns
the whole capacity (Tk = C_l, constant between growths) instead of the used prefix, so the
attention inputs keep one shape and address; the engine then masks the unused tail columns
(`Engine.attention_mask`). docs/kernels.md "CUDA graphs for decode" lists what a capture needs besides.
transformers' attention modules only call `update`.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 256


def _capacity(needed: int, chunk: int) -> int:
    return max(chunk, -(-needed // chunk) * chunk)


class KVCache:
    def __init__(self, num_layers: int, *, chunk: int = DEFAULT_CHUNK, static_shapes: bool = False,
                 devices: list[torch.device] | None = None):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk, self.static_shapes = chunk, static_shapes
        # Each layer's device under a device map (lvlm/devices.py): starts and key classes live
        # there with the keys (which arrive there from the layer). None: follow the inputs.
        self.devices: list[torch.device | None] = list(devices) if devices is not None else [None] * num_layers
        self._k: list[torch.Tensor | None] = [None] * num_layers  # (B, Hkv, C, D)
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self._cls: list[torch.Tensor | None] = [None] * num_layers  # (B, C) uint8
        self.lengths: list[int] = [0] * num_layers
        self.start: list[torch.Tensor | None] = [None] * num_layers  # (B,) int32
        self.growths = 0  # reallocations so far (tests, benchmarks)

    def __len__(self) -> int:
        return len(self._k)

    # -- reading ----------------------------------------------------------------------------
    def length(self, layer: int) -> int:
        return self.lengths[layer]

    def capacity(self, layer: int) -> int:
        k = self._k[layer]
        return 0 if k is None else k.shape[2]

    @property
    def batch_size(self) -> int:
        for s in self.start:
            if s is not None:
                return s.shape[0]
        return 0

    def attended_length(self, layer: int, q_len: int) -> int:
        """Tk of a layer's attention when `q_len` new keys are written: the keys in use, or the
        capacity (after any growth) with static shapes."""
        used = self.lengths[layer] + q_len
        if not self.static_shapes:
            return used
        cap = self.capacity(layer)
        return cap if cap >= used else _capacity(used, self.chunk)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Hkv, T_l, D) keys and values in use (views of the buffers)."""
        n = self.lengths[layer]
        return self._k[layer][:, :, :n], self._v[layer][:, :, :n]

    def has_key_classes(self, layer: int) -> bool:
        return self._cls[layer] is not None

    def key_classes(self, layer: int, k_len: int) -> torch.Tensor:
        """(B, k_len) uint8 view of a layer's key classes (set at prefill by `set_key_classes`);
        columns past the keys written so far are 0 (text): a fed token is a plain text key."""
        if self._cls[layer] is None:
            raise RuntimeError(f"layer {layer} has no key classes; set them at prefill")
        self._reserve_classes(layer, k_len)
        return self._cls[layer][:, :k_len]

    def set_key_classes(self, layer: int, classes: torch.Tensor) -> torch.Tensor:
        """Write the (B, T) classes of a layer's first T keys (prefill); returns the view."""
        rows, n = classes.shape
        cap = max(_capacity(n, self.chunk), self.capacity(layer))
        self._cls[layer] = torch.zeros(rows, cap, dtype=torch.uint8, device=self.devices[layer] or classes.device)
        self._cls[layer][:, :n] = classes
        return self._cls[layer][:, :n]

    # -- writing ----------------------------------------------------------------------------
    def begin_layer(self, layer: int, start: torch.Tensor) -> None:
        """Declare where each row's keys start before a layer's first (prefill) update."""
        if self.lengths[layer] == 0:
            self.start[layer] = start.to(device=self.devices[layer] or start.device, dtype=torch.int32)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write (B, Hkv, T_new, D) keys/values after a layer's keys; return the keys/values to
        attend over: the used prefix (B, Hkv, T_l, D), or the whole capacity with static_shapes."""
        n_old, n_new = self.lengths[layer_idx], key.shape[2]
        if self.start[layer_idx] is None:
            self.start[layer_idx] = torch.zeros(key.shape[0], dtype=torch.int32, device=key.device)
        self._reserve(layer_idx, n_old + n_new, key, value)
        k, v = self._k[layer_idx], self._v[layer_idx]
        k[:, :, n_old : n_old + n_new] = key
        v[:, :, n_old : n_old + n_new] = value
        self.lengths[layer_idx] = n = n_old + n_new
        if self.static_shapes:
            return k, v
        return k[:, :, :n], v[:, :, :n]

    def reserve(self, layer: int, needed: int) -> None:
        """Make room for `needed` columns in an allocated layer (before a step that writes them)."""
        if self._k[layer] is not None:
            self._reserve(layer, needed, self._k[layer], self._v[layer])

    def _reserve(self, layer: int, needed: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        k = self._k[layer]
        if k is not None and k.shape[2] >= needed:
            return
        cap = _capacity(needed, self.chunk)
        B, H, _, D = like_k.shape
        new_k = like_k.new_zeros(B, H, cap, D)
        new_v = like_v.new_zeros(B, like_v.shape[1], cap, like_v.shape[3])
        if k is not None:
            n = self.lengths[layer]
            new_k[:, :, :n] = k[:, :, :n]
            new_v[:, :, :n] = self._v[layer][:, :, :n]
            self.growths += 1
        self._k[layer], self._v[layer] = new_k, new_v
        if self._cls[layer] is not None:
            self._reserve_classes(layer, cap)

    def _reserve_classes(self, layer: int, needed: int) -> None:
        cls = self._cls[layer]
        if cls is not None and cls.shape[1] >= needed:
            return
        cap = max(_capacity(needed, self.chunk), self.capacity(layer))
        new = torch.zeros(cls.shape[0], cap, dtype=torch.uint8, device=cls.device)
        new[:, : cls.shape[1]] = cls
        self._cls[layer] = new

    def replace_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor,
                      key_class: torch.Tensor | None = None) -> None:
        """Overwrite one layer's cache with (B, Hkv, T, D) keys/values (and (B, T) key classes)."""
        n = keys.shape[2]
        self._k[layer] = self._v[layer] = self._cls[layer] = None
        self.lengths[layer], self.start[layer] = 0, start.to(device=keys.device, dtype=torch.int32)
        self._reserve(layer, n, keys, values)
        self._k[layer][:, :, :n], self._v[layer][:, :, :n] = keys, values
        if key_class is not None:
            self._cls[layer][:, :n] = key_class
        self.lengths[layer] = n

    # -- rows -----------------------------------------------------------------------------------
    def select_rows(self, index: torch.Tensor) -> None:
        """Keep the rows in `index` (1-D long) in every layer and drop the key columns that are
        padding for every remaining row (compaction; capacity shrinks to fit in chunks)."""
        # Layers that shared a start tensor keep sharing one, so the engine builds one mask.
        selected: dict[int, tuple[torch.Tensor, int]] = {}
        shifted: dict[tuple[int, int], torch.Tensor] = {}
        in_order: list[int] | None = None  # the kept rows when they keep their order ([] when not)
        for layer in range(len(self)):
            start = self.start[layer]
            if start is None:
                continue
            if id(start) not in selected:
                picked = start.index_select(0, index.to(start.device))
                selected[id(start)] = (picked, int(picked.min()) if picked.numel() else 0)
            picked, low = selected[id(start)]
            n = self.lengths[layer]
            trim = min(low, n)
            if trim == 0 and in_order is None:
                rows = index.tolist()
                in_order = rows if all(a < b for a, b in zip(rows, rows[1:])) else []
            if trim == 0 and in_order:
                self._move_rows_up(layer, in_order)
            else:
                self._compact(layer, index, trim, n)
            if (id(start), trim) not in shifted:
                shifted[(id(start), trim)] = picked - trim if trim else picked
            self.start[layer] = shifted[(id(start), trim)]

    def _move_rows_up(self, layer: int, rows: list[int]) -> None:
        """Keep `rows` (increasing) of every column in place: row j takes row rows[j], and the
        buffers become views of their first len(rows) rows (shapes and capacity otherwise kept)."""
        with torch.inference_mode():  # the buffers were made by an inference-mode prefill
            for buffers in (self._k, self._v, self._cls):
                t = buffers[layer]
                if t is None:
                    continue
                for j, b in enumerate(rows):
                    if b != j:  # b > j: row b has not been overwritten yet
                        t[j].copy_(t[b])
                buffers[layer] = t[: len(rows)]

    def _new(self, like: torch.Tensor, *shape: int) -> torch.Tensor:
        """A buffer whose columns past the length are never read, unless `static_shapes` is set."""
        return like.new_zeros(shape) if self.static_shapes else like.new_empty(shape)

    def _compact(self, layer: int, index: torch.Tensor, trim: int, n: int) -> None:
        keep = n - trim
        if self.start[layer] is not None:
            index = index.to(self.start[layer].device)
        cap = _capacity(max(keep, 1), self.chunk)
        if self._k[layer] is not None:
            k, v = self._k[layer], self._v[layer]
            new_k = self._new(k, index.numel(), k.shape[1], cap, k.shape[3])
            new_v = self._new(v, index.numel(), v.shape[1], cap, v.shape[3])
            new_k[:, :, :keep] = k[:, :, trim:n].index_select(0, index)
            new_v[:, :, :keep] = v[:, :, trim:n].index_select(0, index)
            self._k[layer], self._v[layer] = new_k, new_v
        if self._cls[layer] is not None:
            cls = self._cls[layer]
            new_c = torch.zeros(index.numel(), max(cap, cls.shape[1] - trim), dtype=torch.uint8, device=cls.device)
            new_c[:, : cls.shape[1] - trim] = cls.index_select(0, index)[:, trim:]
            self._cls[layer] = new_c
        self.lengths[layer] = keep

    def merge(self, other: "KVCache") -> None:
        """Append the rows of `other` after this cache's rows, layer by layer. Each layer takes
        the longer of the two lengths; the shorter side's rows get extra left padding."""
        if len(other) != len(self):
            raise ValueError(f"cannot merge a cache of {len(other)} layers into one of {len(self)}")
        merged: dict[tuple, torch.Tensor] = {}  # shared starts stay shared
        for layer in range(len(self)):
            if other.start[layer] is None:
                raise ValueError("cannot merge a cache whose prefill has not run")
            if self.start[layer] is None:  # an empty cache takes the other's layer as is
                self._k[layer], self._v[layer] = other._k[layer], other._v[layer]
                self._cls[layer], self.start[layer] = other._cls[layer], other.start[layer]
                self.lengths[layer] = other.lengths[layer]
                continue
            na, nb = self.lengths[layer], other.lengths[layer]
            n = max(na, nb)
            cap = _capacity(n, self.chunk)
            ka, kb = self._k[layer], other._k[layer]
            new_k = self._new(ka, ka.shape[0] + kb.shape[0], ka.shape[1], cap, ka.shape[3])
            new_v = self._new(self._v[layer], new_k.shape[0], self._v[layer].shape[1], cap, self._v[layer].shape[3])
            has_cls = self._cls[layer] is not None or other._cls[layer] is not None
            new_c = torch.zeros(new_k.shape[0], cap, dtype=torch.uint8, device=ka.device) if has_cls else None
            rows_a = slice(0, ka.shape[0])
            rows_b = slice(ka.shape[0], new_k.shape[0])
            new_k[rows_a, :, n - na : n] = ka[:, :, :na]
            new_v[rows_a, :, n - na : n] = self._v[layer][:, :, :na]
            new_k[rows_b, :, n - nb : n] = kb[:, :, :nb]
            new_v[rows_b, :, n - nb : n] = other._v[layer][:, :, :nb]
            for rows, m in ((rows_a, na), (rows_b, nb)):  # the new left padding is read (masked): zeros
                new_k[rows, :, : n - m] = 0
                new_v[rows, :, : n - m] = 0
            for rows, c, m in ((rows_a, self._cls[layer], na), (rows_b, other._cls[layer], nb)):
                if c is not None:
                    new_c[rows, n - m : n] = c[:, :m]
            self._k[layer], self._v[layer], self._cls[layer] = new_k, new_v, new_c
            key = (id(self.start[layer]), id(other.start[layer]), n - na, n - nb)
            if key not in merged:
                merged[key] = torch.cat([self.start[layer] + (n - na), other.start[layer] + (n - nb)])
            self.start[layer] = merged[key]
            self.lengths[layer] = n

    def permute_rows(self, order: torch.Tensor) -> None:
        """Reorder rows (1-D long permutation) without compaction."""
        same: dict[int, torch.Tensor] = {}
        for layer in range(len(self)):
            if self.start[layer] is None:
                continue
            layer_order = order.to(self.start[layer].device)
            if self._k[layer] is not None:
                self._k[layer] = self._k[layer].index_select(0, layer_order)
                self._v[layer] = self._v[layer].index_select(0, layer_order)
            if self._cls[layer] is not None:
                self._cls[layer] = self._cls[layer].index_select(0, layer_order)
            s = self.start[layer]
            same.setdefault(id(s), s.index_select(0, order.to(s.device)))
            self.start[layer] = same[id(s)]
