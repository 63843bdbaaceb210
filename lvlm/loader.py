"""`load(name_or_path)`: a Pipeline for the embedded model, a tiny test model, or a checkpoint.

Names: "shapes" (the embedded model trained in this repo, the default), "tiny-llava" and
"tiny-llava-next" (random weights, for tests), "random-llava-1.5-7b" (random weights at
LLaVA-1.5-7B's shapes, for GPU benchmarks). Anything else is a Hugging Face hub id or a local
directory; its family is detected from the config through the adapter table. Images are
processed by the PIL image processors (no torchvision needed).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoProcessor

from kernels.dispatch import register
from lvlm.adapters import adapter_for
from lvlm.pipeline import Pipeline
from lvlm import tiny


def default_model() -> str:
    """"shapes" once its weights are present, else the random-weight tiny model."""
    from lvlm.shapes import MODEL_DIR

    return "shapes" if (Path(MODEL_DIR) / "config.json").exists() else "tiny-llava"


def _dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16") from None


def load(name_or_path: str | None = None, *, device: str = "cpu", dtype: str | torch.dtype | None = None,
         revision: str | None = None, text_layers: int | None = None) -> Pipeline:
    """Load a model and its processor as a `Pipeline` (attention routed through kernels.dispatch).

    `text_layers` truncates the random-weight benchmark model's language model (same width and
    heads as LLaVA-1.5-7B, fewer layers) so that 7B-shaped layers fit a CPU benchmark.
    """
    name = name_or_path or default_model()
    attn = register()
    torch_dtype = _dtype(dtype, device)
    if name in tiny.ALL:
        model, processor = tiny.build(name, device=device, text_layers=text_layers)
        model.set_attn_implementation({"text_config": attn, "vision_config": "sdpa"})
        model = model.to(device=device, dtype=torch_dtype)
        return Pipeline(model, processor, adapter_for(model.config), name)
    if name == "shapes":
        from lvlm.shapes import MODEL_DIR

        if not (Path(MODEL_DIR) / "config.json").exists():
            raise FileNotFoundError(f"the embedded shapes model is missing at {MODEL_DIR}; "
                                    "train it with `python -m lvlm.shapes.train`")
        path = str(MODEL_DIR)
    else:
        path = name
    config = AutoConfig.from_pretrained(path, revision=revision)
    adapter = adapter_for(config)
    model_cls = getattr(transformers, adapter.model_class)
    model = model_cls.from_pretrained(
        path, revision=revision, dtype=torch_dtype,
        attn_implementation={"text_config": attn, "vision_config": "sdpa"},
    ).to(device).eval()
    processor = AutoProcessor.from_pretrained(path, revision=revision, backend="pil")
    return Pipeline(model, processor, adapter, name)
