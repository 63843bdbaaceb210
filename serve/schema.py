"""Wire schemas of the HTTP API, shared by the server (serve/app.py) and the SDK (serve/client.py).

The chat shapes follow OpenAI's chat-completions API so the official `openai` client works
unchanged; our additions are top-level fields that OpenAI clients carry as extras:
`interventions` on the request (a preset string such as "vhr+var", or a list of
`{"name": ..., **params}` objects) and `intervention_report` on responses and on the last
stream chunk. Errors use OpenAI's error object `{"error": {"message", "type", "param", "code"}}`.

This module imports only pydantic (the SDK must work in a process without torch), and pydantic
stays at the HTTP boundary: the server turns these models into dataclasses before batching.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError


class _Wire(BaseModel):
    # Unknown request fields are ignored like OpenAI does for fields it does not know of; the
    # few that change semantics (n, stream_options ...) are declared and checked explicitly, and
    # OpenAI fields we do not implement are declared so that a request using them gets a 400
    # naming the field (`ChatCompletionRequest.unsupported`) rather than silently other output.
    # strict: JSON types are not coerced ("stream": "yes", "max_tokens": "10" or true are 400s).
    model_config = ConfigDict(extra="ignore", strict=True)


# OpenAI chat fields this service does not implement; a value other than the field's neutral
# one (null, 0, false, empty, {"type": "text"}, `modalities` ["text"]) is a 400 naming the field.
UNSUPPORTED_FIELDS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format",
                      "logit_bias", "presence_penalty", "frequency_penalty", "audio", "modalities", "prediction",
                      "web_search_options")


MAX_TOP_LOGPROBS = 20  # OpenAI's bound


# -- chat request ---------------------------------------------------------------------------
class ImageURL(_Wire):
    url: str = Field(description="data:image/...;base64,... URL, or http(s) when the operator allows it")
    detail: Optional[str] = None


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class ImagePart(_Wire):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)], None] = None
    name: Optional[str] = None


# Bounds the parser itself enforces, so that a huge list is refused while the JSON is read,
# before millions of Python objects are built (serve/limits.py `check_costs` then applies the
# server's tighter limits: the model's dimensions, the prompt budget, the field lengths).
MAX_PARAM_ITEMS = 8192  # entries of a list parameter (a 7B model's hidden size is 4096)
MAX_INNER_ITEMS = 16  # entries of a list inside a list parameter ([layer, head] pairs ...)
MAX_INTERVENTIONS = 32
MAX_MESSAGES = 256
MAX_CONTENT_PARTS = 64
Scalar = Union[None, bool, int, float, str]
ParamValue = Union[Scalar, Annotated[list[Union[Scalar, Annotated[list[Scalar], Field(max_length=MAX_INNER_ITEMS)]]],
                                    Field(max_length=MAX_PARAM_ITEMS)]]


class InterventionSpec(BaseModel):
    """`{"name": "vhr", **params}`; parameters are validated by the intervention registry.
    A parameter is a JSON scalar or a bounded list (of scalars, or of short lists of them)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, ParamValue] = Field(init=False)  # the parameters' types (pydantic's typed extras)
    name: str


Interventions = Union[str, Annotated[list[Union[str, InterventionSpec]], Field(max_length=MAX_INTERVENTIONS)], None]


class StreamOptions(_Wire):
    include_usage: bool = False


# Neutral values particular to one field: ["text"] is OpenAI's default `modalities` (text out).
FIELD_NEUTRAL: dict[str, tuple[Any, ...]] = {"modalities": (["text"],)}


def _neutral(value: Any, field: str | None = None) -> bool:
    """True for values that ask for nothing: null, false, 0, empty, {"type": "text"}, "none"/"auto",
    and the field's own defaults in FIELD_NEUTRAL."""
    if field is not None and value in FIELD_NEUTRAL.get(field, ()):
        return True
    if value is None or value is False:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    if isinstance(value, str):
        return value in ("none", "auto")
    return value in ([], {}, {"type": "text"})


class ChatCompletionRequest(_Wire):
    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    # Greedy by default (not OpenAI's 1.0): hallucination benchmarks and their papers decode greedily.
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(default=None, ge=0, le=2**63 - 1)
    stop: Union[str, list[str], None] = None
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    interventions: Interventions = None
    user: Optional[str] = None
    # Token log-probabilities (lvlm/logprobs.py says of which distribution); top_logprobs needs logprobs.
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # declared only to be refused by name (see UNSUPPORTED_FIELDS)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None

    @field_validator("temperature", "top_p", "n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        # OpenAI's schema marks these nullable and clients send null for "not set": it means the
        # default, exactly as omitting the field does (the other nullable fields are Optional).
        return cls.model_fields[info.field_name].get_default() if value is None else value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: Union[str, list[str], None]) -> Union[str, list[str], None]:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        if value == "" or (isinstance(value, list) and any(not s for s in value)):
            raise ValueError("stop sequences must be non-empty")
        return value

    def logprobs_top(self) -> Optional[int]:
        """None without logprobs, else how many alternatives each token lists (0..20)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> list[str]:
        """The unimplemented OpenAI fields this request sets to something other than neutral."""
        return [name for name in UNSUPPORTED_FIELDS if not _neutral(getattr(self, name), name)]

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def intervention_spec(self) -> Any:
        """The `interventions` field as plain data for `interventions.resolve`."""
        if isinstance(self.interventions, list):
            return [i.model_dump() if isinstance(i, InterventionSpec) else i for i in self.interventions]
        return self.interventions


# -- chat response ----------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class InterventionReport(BaseModel):
    """What the interventions did for this request: the resolved configs and the engine's report
    (selected heads, sinks found, exit layer, extra passes ...), plus timings."""

    model_config = ConfigDict(extra="allow")
    applied: list[dict[str, Any]] = Field(default_factory=list)
    details: dict[str, Any] = Field(default_factory=dict)
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    decode_tokens_per_s: float = 0.0


class TopLogprob(BaseModel):
    token: str
    bytes: Optional[list[int]] = None  # UTF-8 bytes; join them across tokens that split a character
    logprob: float


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    """`choices[].logprobs`: one entry per answer token (EOS excluded), in order; in a stream, the
    entries of the tokens each chunk's text completes (the rest with the finishing chunk)."""

    content: Optional[list[TokenLogprob]] = None
    refusal: Optional[list[TokenLogprob]] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    intervention_report: InterventionReport = Field(default_factory=InterventionReport)

    @property
    def text(self) -> str:
        return self.choices[0].message.content


class ChunkDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Optional[Literal["stop", "length"]] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None
    intervention_report: Optional[InterventionReport] = None


# -- errors -----------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- catalog endpoints ------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "lvlm-hallu"
    max_context: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class InterventionParam(BaseModel):
    name: str
    type: str
    default: Any = None
    doc: str = ""


class InterventionInfo(BaseModel):
    name: str
    paper: str = ""
    summary: str = ""
    params: list[InterventionParam] = Field(default_factory=list)
    presets: list[str] = Field(default_factory=list)
    # On the served model: what "paper" and "tuned" resolve to ({"paper": {...}, "tuned": {...} | None}).
    preset_values: dict[str, dict[str, Any] | None] | None = None


class InterventionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[InterventionInfo]


# -- evaluation jobs --------------------------------------------------------------------------
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class EvalJobRequest(_Wire):
    """An evaluation run on the service's Ray cluster (CHAIR captioning or POPE questions)."""

    # `benchmark` and `n` are the CLI's words (`lvlm eval compare --benchmark`, `-n`), accepted as aliases;
    # the job stores and the SDK keep the field names.
    kind: str = Field(validation_alias=AliasChoices("kind", "benchmark"),
                      description="job kind: 'chair' or 'pope' (an unknown kind is a 400 listing the valid ones); "
                      "alias 'benchmark'")
    interventions: Interventions = None
    limit: int = Field(default=50, ge=1, le=5000, validation_alias=AliasChoices("limit", "n"),
                       description="images (CHAIR) or questions per split (POPE); alias 'n'")
    max_tokens: Optional[int] = Field(default=None, ge=1)
    seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=8, ge=1, le=64)
    options: dict[str, Any] = Field(default_factory=dict, description="kind-specific options (split, prompt ...)")

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, data: Any) -> Any:
        """Both spellings of a field are fine when they agree; different values are a 400."""
        if isinstance(data, dict):
            for name, alias in (("kind", "benchmark"), ("limit", "n")):
                if name in data and alias in data and data[name] != data[alias]:
                    given, value = repr(data[alias])[:80], repr(data[name])[:80]
                    raise PydanticCustomError("alias_conflict",
                                              f"{alias}={given} and {name}={value} disagree; give one of them")
        return data

    def intervention_spec(self) -> Any:
        if isinstance(self.interventions, list):
            return [i.model_dump() if isinstance(i, InterventionSpec) else i for i in self.interventions]
        return self.interventions


class JobProgress(BaseModel):
    done: int = 0
    total: int = 0


class EvalJob(BaseModel):
    id: str
    object: Literal["eval.job"] = "eval.job"
    kind: str
    state: JobState
    progress: JobProgress = Field(default_factory=JobProgress)
    metrics: Optional[dict[str, Any]] = None  # partial while running, final once succeeded
    error: Optional[ErrorBody] = None
    model: str = ""
    created_at: float = 0.0
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    request: Optional[EvalJobRequest] = None
    attempts: int = 0  # runs started; a resumed or requeued job adds one
    # The job's replica pool in its latest attempt: replicas, items answered per Ray node,
    # batches re-queued after a replica died, replicas replaced (eval/cluster.py RunStats).
    cluster: Optional[dict[str, Any]] = None

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")


class EvalJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvalJob]
