"""Memory estimate before loading: weights, KV cache per 1k tokens, the largest batch that fits.

From the config alone (the model is built on the "meta" device, no weights are read):

    weights      = sum over unique parameters and persistent buffers of numel x bytes(dtype)
    kv per token = L x 2 x Hkv x D x bytes(dtype)      (keys and values of every decoder layer)
    key classes  = L x 1 byte per token                (uint8 class bits, with interventions)
    activations  ~ T x (2E + 2I) x bytes(dtype) + V x 4 bytes, per row of a prefill of T tokens

(L decoder layers, Hkv key/value heads of size D, hidden size E, MLP size I, vocabulary V.) The
KV cache is allocated in chunks of 256 columns (lvlm/cache.py), so the cache of a row is
`kv_per_token x ceil(T / 256) x 256`. A batch of B rows of T tokens fits a budget M when

    weights + B x (cache(T) + activations(T)) <= M x (1 - HEADROOM).

`check_load` refuses a placement whose weights cannot fit (no device map, or a map without
offload whose `max_memory` is too small) before anything is loaded, with the numbers and the
options that would fit; `check_batch` refuses a batch whose cache would not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from lvlm_hallu.lvlm.cache import DEFAULT_CHUNK
from lvlm_hallu.lvlm.errors import LVLMError

HEADROOM = 0.10  # kept free: CUDA context, allocator fragmentation, kernel workspaces


def human(n: float) -> str:
    """Bytes as B/KiB/MiB/GiB with two decimals."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} GiB"


class MemoryFitError(LVLMError, ValueError):
    """A model or batch cannot fit the memory it was given."""


@dataclass(frozen=True)
class Estimate:
    dtype: str
    parameters: int  # count of unique parameters
    weight_bytes: int  # parameters and persistent buffers at `dtype`
    kv_bytes_per_token: int  # keys + values of every decoder layer, one row
    key_class_bytes_per_token: int  # uint8 class bits of every layer, one row (interventions)
    activation_bytes_per_token: int  # prefill working set per token, one row (approximate)
    logits_bytes_per_row: int
    num_layers: int
    max_context: int

    def kv_bytes(self, tokens: int, rows: int = 1, *, key_classes: bool = True, chunk: int = DEFAULT_CHUNK) -> int:
        """Bytes of a KV cache holding `tokens` columns for `rows` rows (capacity rounded up to chunks)."""
        cap = max(chunk, -(-tokens // chunk) * chunk)
        per_token = self.kv_bytes_per_token + (self.key_class_bytes_per_token if key_classes else 0)
        return rows * cap * per_token

    def row_bytes(self, tokens: int) -> int:
        """Memory one row of `tokens` tokens adds: its cache plus the prefill working set."""
        return self.kv_bytes(tokens) + tokens * self.activation_bytes_per_token + self.logits_bytes_per_row

    def largest_batch(self, budget_bytes: int, tokens: int) -> int:
        """Most rows of `tokens` tokens that fit `budget_bytes` with the weights resident (0 if none)."""
        free = int(budget_bytes * (1 - HEADROOM)) - self.weight_bytes
        return max(0, free // self.row_bytes(tokens))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kv_bytes_per_1k_tokens"] = 1000 * (self.kv_bytes_per_token + self.key_class_bytes_per_token)
        return out


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate(config: Any, dtype: torch.dtype = torch.float32) -> Estimate:
    """Estimate the memory of a LLaVA-class model from its config (see the module docstring)."""
    import transformers

    from lvlm_hallu.lvlm.adapters import ModelFacts, adapter_for

    facts = ModelFacts.from_config(config)
    model_cls = getattr(transformers, adapter_for(config).model_class)
    with torch.device("meta"):
        model = model_cls._from_config(config, dtype=dtype)
    params = {id(p): p for p in model.parameters()}  # tied weights count once
    persistent = [b for name, b in model.named_buffers()
                  if name.rsplit(".", 1)[-1] not in _non_persistent(model, name)]
    size = _dtype_bytes(dtype)
    weight_bytes = sum(p.numel() * size for p in params.values()) + sum(b.numel() * b.element_size() for b in persistent)
    text = config.text_config
    return Estimate(
        dtype=str(dtype).removeprefix("torch."),
        parameters=sum(p.numel() for p in params.values()),
        weight_bytes=weight_bytes,
        kv_bytes_per_token=facts.num_layers * 2 * facts.num_kv_heads * facts.head_dim * size,
        key_class_bytes_per_token=facts.num_layers,
        activation_bytes_per_token=(2 * facts.hidden_size + 2 * text.intermediate_size) * size,
        logits_bytes_per_row=facts.vocab_size * 4,
        num_layers=facts.num_layers,
        max_context=facts.max_context,
    )


def _non_persistent(model: torch.nn.Module, buffer_name: str) -> set[str]:
    owner = model.get_submodule(buffer_name.rsplit(".", 1)[0]) if "." in buffer_name else model
    return set(getattr(owner, "_non_persistent_buffers_set", ()))


def measured_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a loaded model's unique parameters and persistent buffers (for comparison)."""
    params = {id(p): p for p in model.parameters()}
    buffers = [b for name, b in model.named_buffers() if name.rsplit(".", 1)[-1] not in _non_persistent(model, name)]
    return sum(t.numel() * t.element_size() for t in (*params.values(), *buffers))


def config_for(name: str | None, revision: str | None = None) -> Any:
    """A model's config without its weights: the embedded, tiny and random-7B models by name,
    anything else through AutoConfig (hub id or local directory)."""
    from lvlm_hallu.lvlm import tiny
    from lvlm_hallu.lvlm.loader import default_model

    name = name or default_model()
    if name == tiny.RANDOM_7B:
        return tiny.llava_15_7b_config(tiny.char_tokenizer())
    if name in tiny.ALL:
        return tiny.build(name)[0].config  # a few hundred thousand parameters
    from lvlm_hallu.lvlm.shapes import embedded_dir

    if embedded_dir(name) is not None:
        name = str(embedded_dir(name))
    from lvlm_hallu.lvlm.loader import load_config

    return load_config(name, revision)  # a hub id that cannot be fetched: one line saying why


# -- budgets ---------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """'20GiB' / '20GB' / 123 -> bytes."""
    from accelerate.utils import convert_file_size_to_int

    return size if isinstance(size, int) else convert_file_size_to_int(size)


def device_free_bytes(device: str | torch.device) -> int:
    """Free memory of a device now: cudaMemGetInfo on a GPU, available RAM on the host."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is optional: read the kernel's figure
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024


def budget(device: str = "cpu", max_memory: dict | None = None, *, spread: bool = False) -> dict[str, int]:
    """{device: bytes} the weights and caches may use: `max_memory` without 'disk', else the free
    memory of `device`, or of every GPU and the host when a device map spreads the model (`spread`)."""
    if max_memory:
        return {str(k): parse_size(v) for k, v in max_memory.items() if str(k) != "disk"}
    if spread:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] + ["cpu"]
        return {d: device_free_bytes(d) for d in devices}
    return {str(device): device_free_bytes(device)}


def check_load(est: Estimate, *, device: str = "cpu", device_map: str | dict | None = None,
               max_memory: dict | None = None, offload_folder: str | None = None) -> None:
    """Refuse a placement whose weights cannot fit, before loading anything (MemoryFitError)."""
    if device_map is not None and (offload_folder is not None or isinstance(device_map, dict)):
        return  # offload to disk (or an explicit map) holds any size; accelerate checks the map itself
    places = budget(device, max_memory, spread=device_map is not None)
    total = sum(places.values())
    needed = est.weight_bytes
    if needed <= total * (1 - HEADROOM):
        return
    where = ", ".join(f"{k}: {human(v)}" for k, v in places.items())
    raise MemoryFitError(
        f"the weights need {human(needed)} at {est.dtype} but only {where} "
        f"({1 - HEADROOM:.0%} usable) is available; split or offload the model: "
        "--device-map auto [--max-memory '0=20GiB,1=20GiB,cpu=64GiB'] --offload-folder DIR, "
        "or a smaller --dtype")


def check_batch(est: Estimate, *, rows: int, tokens: int, budget_bytes: int) -> None:
    """Refuse `rows` rows of `tokens` tokens that would not fit next to the weights."""
    if tokens > est.max_context:
        raise MemoryFitError(f"{tokens} tokens exceed the model context of {est.max_context}")
    fits = est.largest_batch(budget_bytes, tokens)
    if rows > fits:
        raise MemoryFitError(
            f"a batch of {rows} rows x {tokens} tokens needs {human(est.weight_bytes + rows * est.row_bytes(tokens))} "
            f"but {human(budget_bytes)} ({1 - HEADROOM:.0%} usable) holds at most {fits} such rows; "
            "lower the batch size or the context, or add devices with --device-map/--max-memory")
