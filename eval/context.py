"""Generation budget: fit `max_new_tokens` into the model's context before the model loads.

The papers' CHAIR protocol asks for 512 new tokens; a model whose context is shorter (the embedded
shapes model has 256 positions) would fail on its first batch after loading. Here the model's
config (no weights) gives the context C, its processor the longest prompt P of the task (chat
template + image tokens + the longest distinct prompt text, measured on the first image), and

    max_new_tokens = min(requested, C - P)     (a warning says when it was lowered)

A prompt that leaves no room (C - P < 1) is refused. Models without a readable config (a remote
service, a hub id that is not cached, the random-weight test models) are not checked here; the
model itself then refuses an over-long request with a clear error.

Placement and batch size, also before the model loads. `Placement` is where a local model runs:
`lvlm.load`'s device, dtype and device map, with the dtype resolved as the loader resolves it
(float16 on CUDA, float32 elsewhere, unless given), so reports and run fingerprints record what
the answers were computed with. `auto_batch_size` is `--batch-size auto`: from the memory
estimate `lvlm info` prints (lvlm/memory.py; config only, no weights), the most rows of
`prompt + max_new_tokens` tokens that fit next to the weights in the budget

    B = floor((M (1 - headroom) - weights) / (cache(T) + activations(T))),  capped at AUTO_CAP,

M the device's free memory (or the replica's, measured there, for Ray actors). A model whose
weights and one row do not fit is refused with the numbers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvlm_hallu.eval.errors import EvalError


class ContextError(EvalError):
    """The prompt alone fills the model's context."""


@dataclass(frozen=True)
class Budget:
    context: int  # positions of the language model
    prompt_tokens: int  # longest prompt of the task, image tokens included

    @property
    def max_new_tokens(self) -> int:
        return self.context - self.prompt_tokens


def model_folder(name: str) -> Path | None:
    """The checkpoint folder of `name` if it can be read without loading (shapes, a folder, a cached hub id)."""
    from lvlm_hallu.lvlm.shapes import embedded_dir

    folder = embedded_dir(name)
    if folder is not None:
        return folder if (folder / "config.json").is_file() else None
    if os.path.isdir(name):
        return Path(name)
    from lvlm_hallu.lvlm.loader import hub_snapshot

    return hub_snapshot(name, None)


def measure(folder: Path, prompts: Sequence[str], image: str | None) -> Budget:
    """Context from the config; longest prompt, in tokens, from the processor on `image`."""
    from transformers import AutoConfig, AutoProcessor

    from lvlm_hallu.eval.runner import load_image

    config = AutoConfig.from_pretrained(str(folder))
    text = getattr(config, "text_config", config)
    context = int(text.max_position_embeddings)
    processor = AutoProcessor.from_pretrained(str(folder), backend="pil")
    picture = load_image(image) if image else None
    longest = 0
    for prompt in sorted(set(prompts)):
        content = ([{"type": "image"}] if picture is not None else []) + [{"type": "text", "text": prompt}]
        rendered = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        batch = processor(text=[rendered], images=[picture] if picture is not None else None, return_tensors="pt")
        longest = max(longest, int(batch["attention_mask"].sum()))
    return Budget(context, longest)


def fit_max_new_tokens(requested: int, model: str, prompts: Sequence[str], image: str | None) -> tuple[int, str | None]:
    """(max_new_tokens to use, warning or None); raises ContextError if no token fits."""
    if requested < 1:
        raise EvalError(f"--max-new-tokens must be at least 1, got {requested}")
    folder = model_folder(model)
    if folder is None:
        return requested, None
    budget = measure(folder, prompts, image)
    if budget.max_new_tokens < 1:
        raise ContextError(
            f"the prompt takes {budget.prompt_tokens} tokens of {model}'s {budget.context}-token context; "
            "no room is left to generate"
        )
    if requested <= budget.max_new_tokens:
        return requested, None
    warning = (
        f"--max-new-tokens {requested} exceeds {model}'s context ({budget.context} tokens, longest prompt "
        f"{budget.prompt_tokens}): clamped to {budget.max_new_tokens}"
    )
    return budget.max_new_tokens, warning


# ---------------------------------------------------------------------------------------------
# Placement and batch size

AUTO_CAP = 64  # --batch-size auto never exceeds this: past it a step's overhead no longer dominates


@dataclass(frozen=True)
class Placement:
    """Where a local model runs: `lvlm.load(name, device=..., dtype=..., device_map=...)`."""

    device: str = "cpu"
    dtype: str | None = None
    device_map: Any = None  # "auto" | "balanced" | "sequential" | {module: device}

    def load_kwargs(self) -> dict[str, Any]:
        """The `lvlm.load` keywords that differ from its defaults (none for the CPU default)."""
        out: dict[str, Any] = {}
        if self.device != "cpu" and self.device_map is None:
            out["device"] = self.device
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.device_map is not None:
            out["device_map"] = self.device_map
        return out

    @property
    def first_device(self) -> str:
        """The device the dtype default follows: `device`, or the first GPU a device map names."""
        if self.device_map is None:
            return self.device
        from lvlm_hallu.lvlm.loader import _first_device

        return _first_device(self.device_map, None)

    @property
    def torch_dtype(self) -> Any:
        from lvlm_hallu.lvlm.loader import _dtype

        try:
            return _dtype(self.dtype, self.first_device)
        except ValueError as err:
            raise EvalError(f"--dtype: {err}") from err

    def fields(self) -> dict[str, Any]:
        """{"device", "dtype", "device_map"} for reports and run fingerprints (dtype resolved)."""
        return {"device": self.device if self.device_map is None else self.first_device,
                "dtype": str(self.torch_dtype).removeprefix("torch."), "device_map": self.device_map}


def auto_batch_size(model: str, placement: Placement, tokens: int | None, *, budget_bytes: int | None = None,
                    cap: int = AUTO_CAP) -> tuple[int, str]:
    """(rows per batch, one line saying how) for `--batch-size auto` (module docstring).

    `tokens`: the longest prompt plus max_new_tokens (None: the model's whole context, for models
    whose processor cannot be read before loading). `budget_bytes`: the memory to fill (default:
    the free memory of the placement's device, or of all of them under a device map).
    """
    from lvlm_hallu.lvlm import memory

    try:
        est = memory.estimate(memory.config_for(model), dtype=placement.torch_dtype)
    except (OSError, ValueError) as err:
        raise EvalError(f"--batch-size auto needs the model's config: {err}") from err
    if budget_bytes is None:
        places = memory.budget(placement.first_device, None, spread=placement.device_map is not None)
        budget_bytes = sum(places.values())
    tokens = min(tokens, est.max_context) if tokens else est.max_context
    rows = est.largest_batch(budget_bytes, tokens)
    if rows < 1:
        raise EvalError(
            f"--batch-size auto: {model} at {est.dtype} ({memory.human(est.weight_bytes)} of weights) leaves no room "
            f"for one row of {tokens} tokens in {memory.human(budget_bytes)}; use another --device, --dtype or "
            "--device-map"
        )
    chosen = min(rows, cap)
    return chosen, (f"--batch-size auto: {chosen} (memory estimate: {rows} rows of {tokens} tokens fit "
                    f"{memory.human(budget_bytes)} next to {memory.human(est.weight_bytes)} of weights at "
                    f"{est.dtype}; cap {cap})")


def auto_tokens(model: str, prompts: Sequence[str], image: str | None, max_new_tokens: int) -> int | None:
    """Longest prompt plus `max_new_tokens`, measured with the model's processor (None when its
    checkpoint cannot be read before loading: `auto_batch_size` then takes the whole context)."""
    folder = model_folder(model)
    return None if folder is None else measure(folder, prompts, image).prompt_tokens + max_new_tokens


def replica_budget(model: Any) -> int:
    """In a Ray replica (`pool.call`): the memory its batches may use, measured where it runs:
    the free memory of the model's device plus what its weights already take."""
    from lvlm_hallu.lvlm import memory

    device = str(getattr(model, "device", "cpu"))
    weights = sum(p.numel() * p.element_size() for p in model.model.parameters()) if hasattr(model, "model") else 0
    return memory.device_free_bytes(device) + (weights if device.startswith("cuda") else 0)
