"""Where a module runs: the execution device of a layer under an accelerate device map.

With `device_map`, accelerate attaches an `AlignDevicesHook` to each placed module; the hook moves
the call's inputs to `execution_device` and, for CPU- or disk-offloaded modules, loads the weights
there for the duration of the call (between calls they sit on the "meta" device). So a module's
parameters do not say where it computes: the hook does. `execution_device` resolves it once, and
the engine uses it to place each layer's KV cache, key classes, plan tensors and kernel inputs
next to the layer (lvlm/engine.py, lvlm/cache.py).
"""

from __future__ import annotations

import torch


def _hook_device(hook) -> torch.device | None:
    """The execution device of an accelerate hook (or of the first hook of a SequentialHook)."""
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for inner in getattr(hook, "hooks", ()):  # SequentialHook
        found = _hook_device(inner)
        if found is not None:
            return found
    return None


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device `module`'s forward computes on: its accelerate hook's execution device, else the
    device of its first parameter or buffer that is not on "meta", else cpu."""
    hooked = _hook_device(getattr(module, "_hf_hook", None))
    if hooked is not None:
        return hooked
    for sub in module.modules():  # a submodule may carry the hook (device maps split below the layer)
        hooked = _hook_device(getattr(sub, "_hf_hook", None))
        if hooked is not None:
            return hooked
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """'0=20GiB,1=20GiB,cpu=64GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '64GiB'} (accelerate's form)."""
    if not text:
        return None
    out: dict[int | str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"bad --max-memory entry {part!r}; use DEVICE=SIZE, e.g. '0=20GiB,cpu=64GiB'")
        out[int(key) if key.isdigit() else key] = value
    return out


def parse_device_map(text: str | None) -> str | dict | None:
    """'auto' | 'balanced' | 'balanced_low_0' | 'sequential', a JSON object {module: device}, or a
    path to a JSON file holding one."""
    import json
    from pathlib import Path

    if not text:
        return None
    text = text.strip()
    if text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    if not text.startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"--device-map {text!r} is neither auto/balanced/balanced_low_0/sequential, "
                             "a JSON object, nor a JSON file")
        text = path.read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--device-map is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError("--device-map JSON must be an object {module name: device}")
    return value
