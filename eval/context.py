"""Generation budget: fit `max_new_tokens` into the model's context before the model loads.

The papers' CHAIR protocol asks for 512 new tokens; a model whose context is shorter (the embedded
shapes model has 256 positions) would fail on its first batch after loading. Here the model's
config (no weights) gives the context C, its processor the longest prompt P of the task (chat
template + image tokens + the longest distinct prompt text, measured on the first image), and

    max_new_tokens = min(requested, C - P)     (a warning says when it was lowered)

A prompt that leaves no room (C - P < 1) is refused. Models without a readable config (a remote
service, a hub id that is not cached, the random-weight test models) are not checked here; the
model itself then refuses an over-long request with a clear error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
    if name == "shapes":
        from lvlm_hallu.lvlm.shapes import MODEL_DIR

        return Path(MODEL_DIR) if (Path(MODEL_DIR) / "config.json").is_file() else None
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
