"""`load(name_or_path)`: a Pipeline for the embedded model, a tiny test model, or a checkpoint.

Names: "shapes" (the embedded model trained in this repo, the default), "shapes-detail" (the
embedded model of the detailed world, docs/shapes-world.md), "tiny-llava",
"tiny-llava-next", "tiny-llava-onevision", "tiny-qwen2-vl" and "tiny-qwen2.5-vl" (random weights,
for tests), "random-llava-1.5-7b" (random weights at LLaVA-1.5-7B's shapes, for GPU benchmarks). Anything else is a Hugging Face hub id or a local
directory; its family is detected from the config through the adapter table. Images are
processed by the PIL image processors (no torchvision needed).

Big checkpoints: `device_map` ("auto", "balanced", "sequential" or {module: device}), `max_memory`
({0: "20GiB", "cpu": "64GiB"}) and `offload_folder` go to transformers' `from_pretrained`, which
places the modules through accelerate (several GPUs, CPU offload, disk offload). The engine then
runs each decoder layer on its own device (lvlm/devices.py). Before loading, `lvlm.memory` checks
that the weights fit the chosen devices and refuses with a clear message when they cannot.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoProcessor

from lvlm_hallu.kernels.dispatch import register
from lvlm_hallu.lvlm.adapters import adapter_for
from lvlm_hallu.lvlm.errors import ModelUnavailableError
from lvlm_hallu.lvlm.pipeline import Pipeline
from lvlm_hallu.lvlm.processors import images_only
from lvlm_hallu.lvlm import memory, tiny


def _first_device(device_map: str | dict, max_memory: dict | None) -> str:
    """The device that decides the default dtype: the first GPU the map (or max_memory) names."""
    if isinstance(device_map, dict):
        named = list(device_map.values())
    elif max_memory:
        named = list(max_memory)
    else:
        named = [0] if torch.cuda.is_available() else ["cpu"]
    for d in named:
        if isinstance(d, int) or (isinstance(d, str) and (d.isdigit() or d.startswith("cuda"))):
            return f"cuda:{d}" if isinstance(d, int) or d.isdigit() else d
    return "cpu"


def _dispatch(model, device_map: str | dict, max_memory: dict | None, offload_folder: str | None):
    """Place an in-memory model (the built tiny models) with accelerate, as from_pretrained would."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=model._no_split_modules)
    if "disk" in device_map.values() and offload_folder is None:
        raise ValueError("the device map offloads to 'disk': give an offload_folder")
    return dispatch_model(model, device_map=device_map, offload_dir=offload_folder).eval()


def default_model() -> str:
    """"shapes" once its weights are present, else the random-weight tiny model."""
    from lvlm_hallu.lvlm.shapes import MODEL_DIR

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
         revision: str | None = None, text_layers: int | None = None,
         device_map: str | dict | None = None, max_memory: dict | None = None,
         offload_folder: str | None = None) -> Pipeline:
    """Load a model and its processor as a `Pipeline` (attention routed through kernels.dispatch).

    `text_layers` truncates the random-weight benchmark model's language model (same width and
    heads as LLaVA-1.5-7B, fewer layers) so that 7B-shaped layers fit a CPU benchmark.
    `device_map` / `max_memory` / `offload_folder`: see the module docstring (`device` is then
    ignored: the map decides; the dtype default follows the map's first GPU, if any).
    """
    name = name_or_path or default_model()
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError("max_memory and offload_folder need a device_map (e.g. device_map='auto')")
    if max_memory is not None:  # '0' (from JSON, e.g. a stored eval job) means GPU 0, as 0 does
        max_memory = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in max_memory.items()}
    if device_map is not None:
        device = _first_device(device_map, max_memory)
    attn = register()
    torch_dtype = _dtype(dtype, device)
    if name == tiny.RANDOM_7B:  # 13 GiB at fp16: refuse a device it cannot fit before building it
        config = tiny.llava_15_7b_config(tiny.char_tokenizer(), text_layers or 32)
        memory.check_load(memory.estimate(config, dtype=torch_dtype), device=device, device_map=device_map,
                          max_memory=max_memory, offload_folder=offload_folder)
    if name in tiny.ALL:
        model, processor = tiny.build(name, device=None if device_map is not None else device, text_layers=text_layers)
        model.set_attn_implementation({"text_config": attn, "vision_config": "sdpa"})
        if device_map is None:
            model = model.to(device=device, dtype=torch_dtype)
        else:
            model = _dispatch(model.to(dtype=torch_dtype), device_map, max_memory, offload_folder)
        return Pipeline(model, processor, adapter_for(model.config), name)
    from lvlm_hallu.lvlm.shapes import embedded_dir, missing_message

    embedded = embedded_dir(name)
    if embedded is not None:
        if not (embedded / "config.json").exists():
            raise FileNotFoundError(missing_message(name))
        path = str(embedded)
    else:
        path = name
    config = load_config(path, revision)
    adapter = adapter_for(config)
    memory.check_load(memory.estimate(config, dtype=torch_dtype), device=device, device_map=device_map,
                      max_memory=max_memory, offload_folder=offload_folder)
    model_cls = getattr(transformers, adapter.model_class)
    placement = {} if device_map is None else {
        "device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    processor_cls = images_only(adapter.processor_class) if adapter.images_only_processor else AutoProcessor
    try:
        model = model_cls.from_pretrained(
            path, revision=revision, dtype=torch_dtype,
            attn_implementation={"text_config": attn, "vision_config": "sdpa"}, **placement,
        )
        processor = processor_cls.from_pretrained(path, revision=revision, backend="pil")
    except OSError as err:  # weights or processor files that cannot be fetched (the config could)
        raise unavailable(name, err, revision) from err
    model = (model if device_map is not None else model.to(device)).eval()
    pipe = Pipeline(model, processor, adapter, name)
    if embedded is None and not Path(path).is_dir():  # a hub id: the snapshot it resolved to
        pipe.snapshot = hub_snapshot(name, revision)
    return pipe


def unavailable(name: str, err: BaseException, revision: str | None = None) -> ModelUnavailableError:
    """Why a hub id or path could not be read, in one line: the cause found in the exception chain
    (huggingface_hub's typed errors behind transformers' OSError)."""
    import os

    from huggingface_hub import errors as hub

    chain, link = [], err
    while link is not None and len(chain) < 10:
        chain.append(link)
        link = link.__cause__ or link.__context__
    kinds = {type(e) for e in chain}

    def has(*types):
        return any(issubclass(k, types) for k in kinds)

    at = f" at revision {revision!r}" if revision else ""
    offline = [f"{v}={os.environ[v]}" for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
               if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
    if has(hub.HFValidationError):
        why = "no such folder here, and not a hub id (owner/name)"
    elif has(hub.GatedRepoError):
        why = "the hub repository is gated: accept its terms on huggingface.co and log in (`hf auth login` or HF_TOKEN)"
    elif has(hub.RepositoryNotFoundError):
        why = "the hub has no such repository (or it is private: log in with `hf auth login` or HF_TOKEN)"
    elif has(hub.RevisionNotFoundError):
        why = f"the hub repository has no revision {revision!r}"
    elif has(hub.EntryNotFoundError) and not has(hub.LocalEntryNotFoundError):
        why = f"the hub repository{at} lacks a file a transformers checkpoint needs"
    elif offline:
        why = f"not in the local Hugging Face cache{at}, and {' and '.join(offline)} forbids downloading it (unset it)"
    elif has(hub.LocalEntryNotFoundError, ConnectionError, TimeoutError) or any(
            "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower() for e in chain):
        why = f"not in the local Hugging Face cache{at}, and the hub cannot be reached (no network?)"
    else:
        why = " ".join(str(err).split())
    return ModelUnavailableError(f"cannot load model {name!r}: {why}")


def load_config(path: str, revision: str | None = None):
    """AutoConfig of a folder or hub id; a name that cannot be fetched is one-line ModelUnavailableError."""
    if not Path(path).is_dir() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise ModelUnavailableError(f"cannot load model {path!r}: no such folder")
    try:
        return AutoConfig.from_pretrained(path, revision=revision)
    except OSError as err:
        raise unavailable(path, err, revision) from err


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot folder (named by its commit) that a hub id and revision resolve to in
    the Hugging Face cache, or None when it is not cached (or not a hub id)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # malformed repo ids and the like: the model is simply not in the cache
        return None
    return Path(found).parent if isinstance(found, str) else None
