"""Submit-time validation of an evaluation job's kind-specific `options` (POST /v1/eval/jobs).

The rules are the CLI's (`lvlm eval chair|pope`): the POPE answer parser must be one of
`eval.pope.PARSERS`, splits come from `eval.pope.SPLITS`, `max_new_tokens` is a positive integer
(and here also at most the server's `max_tokens`), the CHAIR prompt is non-empty text and
`short_caption` a boolean. Types are strict ("10" is not a number, "yes" not a boolean) and any
other option is refused by name: a job cannot name a file or a path on the server (images,
questions, routers), it only ever runs on data the job generates itself.

`check_options(kind, options, max_tokens=...)` returns the options normalised, or raises
`JobSpecError` whose `param` is the offending field ("options.parser"), for a 400.

Every kind also takes the CLI's placement (`lvlm eval --device --dtype --device-map`):
`options.device` (cpu, cuda, cuda:N, auto), `options.dtype` (float32, float16, bfloat16; fp32, fp16
and bf16 are read as those) and `options.device_map` (auto, balanced, balanced_low_0, sequential,
or a JSON object {module: GPU index | "cpu" | "cuda:N"}; never a file, and never "disk", which
would need a folder on the server). Where the job's replicas then load and which GPUs they
reserve is decided by `serve.jobs.place_job`.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_SEED = 2**31 - 1
DEVICE = re.compile(r"cpu|cuda(:\d+)?|auto")
# lvlm.loader's names, spelled one way so that fp16 and float16 jobs fingerprint alike
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
MAP_DEVICE = re.compile(r"cpu|cuda:\d+")


class JobSpecError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: Optional[int] = Field(default=None, ge=1)
    # placement of the job's replicas, as `lvlm eval --device/--dtype/--device-map` (module docstring)
    device: Optional[str] = None
    dtype: Optional[str] = None
    device_map: Any = None  # checked below: one message for every wrong shape

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: Optional[str]) -> Optional[str]:
        if device is not None and not DEVICE.fullmatch(device):
            raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
        return device

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, dtype: Optional[str]) -> Optional[str]:
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
        return None if dtype is None else DTYPES[dtype]

    @field_validator("device_map")
    @classmethod
    def _known_device_map(cls, device_map: Any) -> Any:
        if device_map is None:
            return None
        if isinstance(device_map, str):
            if device_map not in DEVICE_MAP_STRATEGIES:
                raise ValueError(f"device_map {device_map[:80]!r} is none of {', '.join(DEVICE_MAP_STRATEGIES)}; "
                                 "a job gives an explicit map as a JSON object {module: device}, never a file")
            return device_map
        if not isinstance(device_map, dict) or not device_map:
            raise ValueError(f"device_map must be {', '.join(DEVICE_MAP_STRATEGIES)} or a non-empty JSON object "
                             f"{{module: device}}, got {str(device_map)[:80]!r}")
        for module, device in device_map.items():
            gpu = isinstance(device, int) and not isinstance(device, bool) and device >= 0
            if not (gpu or isinstance(device, str) and MAP_DEVICE.fullmatch(device)):
                raise ValueError(f"device_map[{module!r}] = {device!r}: a module goes to a GPU index (0, 1, ...), "
                                 "'cuda:N' or 'cpu' ('disk' needs an offload folder on the server)")
        return device_map


class ChairOptions(_Options):
    prompt: Optional[str] = Field(default=None, min_length=1, max_length=2000)
    short_caption: bool = False


class PopeOptions(_Options):
    parser: str = "pope"
    splits: Optional[list[str]] = Field(default=None, min_length=1, max_length=3)

    @field_validator("parser")
    @classmethod
    def _known_parser(cls, name: str) -> str:
        from lvlm_hallu.eval.pope import PARSERS

        if name not in PARSERS:
            raise ValueError(f"unknown POPE answer parser {name!r}; valid: {', '.join(PARSERS)}")
        return name

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, splits: Optional[list[str]]) -> Optional[list[str]]:
        from lvlm_hallu.eval.pope import SPLITS

        if splits is None:
            return None
        bad = [s for s in splits if s not in SPLITS]
        if bad:
            raise ValueError(f"unknown POPE split {bad[0]!r}; valid: {', '.join(SPLITS)}")
        if len(set(splits)) != len(splits):
            raise ValueError("splits repeat")
        return splits


OPTIONS: dict[str, type[_Options]] = {"chair": ChairOptions, "pope": PopeOptions}


def check_options(kind: str, options: dict[str, Any], *, max_tokens: int) -> dict[str, Any]:
    """The job's options validated for `kind` (unknown kinds take none); raises JobSpecError."""
    schema = OPTIONS.get(kind, _Options)
    try:
        parsed = schema.model_validate(options)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        param = f"options.{field}" if field else "options"
        text = "unknown option (jobs take no paths or files)" if first["type"] == "extra_forbidden" else first["msg"]
        raise JobSpecError(f"{param}: {text}", param) from None
    if parsed.max_new_tokens is not None and parsed.max_new_tokens > max_tokens:
        raise JobSpecError(f"options.max_new_tokens={parsed.max_new_tokens} exceeds this server's limit of "
                           f"{max_tokens}", "options.max_new_tokens")
    return parsed.model_dump(exclude_none=True, exclude_defaults=False)


def check_seed(seed: int) -> None:
    if seed > MAX_SEED:
        raise JobSpecError(f"seed={seed} exceeds {MAX_SEED}", "seed")
