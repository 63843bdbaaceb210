"""Submit-time validation of an evaluation job's kind-specific `options` (POST /v1/eval/jobs).

The rules are the CLI's (`lvlm eval chair|pope`): the POPE answer parser must be one of
`eval.pope.PARSERS`, splits come from `eval.pope.SPLITS`, `max_new_tokens` is a positive integer
(and here also at most the server's `max_tokens`), the CHAIR prompt is non-empty text and
`short_caption` a boolean. Types are strict ("10" is not a number, "yes" not a boolean) and any
other option is refused by name: a job cannot name a file or a path on the server (images,
questions, routers), it only ever runs on data the job generates itself.

`check_options(kind, options, max_tokens=...)` returns the options normalised, or raises
`JobSpecError` whose `param` is the offending field ("options.parser"), for a 400.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_SEED = 2**31 - 1


class JobSpecError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: Optional[int] = Field(default=None, ge=1)


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
