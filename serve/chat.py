"""From an OpenAI chat request to an engine `Request`, and from a `Result` back to OpenAI shapes.

`prepare` does all per-request validation BEFORE the request joins a batch: message structure,
images (decoded and size-checked), interventions (the `interventions` field or a spec in the model
name, serve/model_names.py; resolved against the registry, so unknown
names and out-of-range parameters are 400s, then checked against the loaded model's facts by
`interventions.validate`, so a layer index beyond the model or a non-finite value is a 400 too),
unsupported OpenAI fields (a 400 naming the field), token and prompt limits. A temperature
below `GREEDY_BELOW` decodes greedily: sampling at temperature T → 0 tends to the argmax, and
dividing logits by 1e-300 would overflow to inf and NaN probabilities. So does a `top_p` below
`TOP_P_GREEDY_BELOW`: nucleus sampling keeps at least the most likely token, whose probability is
at least 1 / vocabulary size, so any top_p under it keeps that token alone (and a top_p that
rounds to 0 in float32 would otherwise keep none). A request that passes reaches the engine as a
plain dataclass; a request that fails never touches its neighbours.

Strict JSON: a log-probability that is not finite (a token PAI's contrast gives zero probability)
never reaches an answer: such a token is not a top alternative, and a chosen token's -inf is
reported as OpenAI's floor, `LOGPROB_FLOOR`; engine reports lose non-finite numbers (null).

Conversation shape: the engine answers one user turn with at most one image. System (and
developer) messages are prepended to the user's text; assistant turns and several user turns are
refused rather than silently flattened into a different prompt.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

from lvlm_hallu.interventions.inputs import require_image
from lvlm_hallu.interventions.validate import validate
from lvlm_hallu.lvlm.types import Request, Result
from lvlm_hallu.serve import model_names
from lvlm_hallu.serve.errors import BadRequest
from lvlm_hallu.serve.images import load_image
from lvlm_hallu.serve.limits import Limits
from lvlm_hallu.serve.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    ImagePart,
    InterventionReport,
    TextPart,
    TokenLogprob,
    TopLogprob,
    Usage,
)

ENGINE_MAX_IMAGES = 1  # lvlm.types.Request carries one image; a second would be dropped silently
GREEDY_BELOW = 1e-4  # temperatures under this decode greedily (fp32 logits / T stays finite above it)
TOP_P_GREEDY_BELOW = 1e-6  # under 1 / vocabulary size for every served model: only the argmax is kept
LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a token of (numerically) zero probability


@dataclass
class ModelInfo:
    """What request validation needs to know about the served model."""

    model_id: str
    aliases: frozenset[str]
    max_context: int
    count_tokens: Optional[Callable[[str], int]] = None  # text tokens of a prompt, if the model can tell
    facts: Any = None  # the engine's ModelFacts (num_layers, hidden_size ...) for intervention checks
    # the pipeline's cached profile (calibrated and tuned values), read when reporting resolved values
    profile: Optional[Callable[[], Any]] = None


@dataclass
class PreparedChat:
    request: Request
    model: str
    label: str  # intervention set for metrics, e.g. "none", "vhr+var"
    applied: list[dict[str, Any]]  # as the request gave them; `report` shows the values the model ran
    stream: bool
    include_usage: bool
    info: Optional[ModelInfo] = dataclasses.field(default=None, repr=False)
    id: str = dataclasses.field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def config_dict(config: Any) -> dict[str, Any]:
    """A resolved intervention config as JSON-friendly data for reports."""
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
    return {"name": getattr(config, "name", type(config).__name__), **jsonable(fields)}


def split_messages(body: ChatCompletionRequest) -> tuple[str, list[tuple[str, str]]]:
    """The prompt text and the image URLs (with their JSON path) of a single-turn conversation."""
    system, user_text, images, users = [], [], [], 0
    for i, message in enumerate(body.messages):
        if message.role == "assistant":
            raise BadRequest("multi-turn conversations are not supported: send one user message",
                             param=f"messages.{i}.role", code="unsupported_conversation")
        target = system if message.role in ("system", "developer") else user_text
        users += message.role == "user"
        if users > 1:
            raise BadRequest("only one user message per request is supported", param=f"messages.{i}",
                             code="unsupported_conversation")
        if message.content is None:
            continue
        if isinstance(message.content, str):
            target.append(message.content)
            continue
        for j, part in enumerate(message.content):
            if isinstance(part, TextPart):
                target.append(part.text)
            elif isinstance(part, ImagePart):
                if message.role != "user":
                    raise BadRequest("images are only allowed in the user message",
                                     param=f"messages.{i}.content.{j}")
                images.append((part.image_url.url, f"messages.{i}.content.{j}.image_url.url"))
    if users == 0:
        raise BadRequest("the conversation needs a user message", param="messages", code="unsupported_conversation")
    prompt = "\n".join(t for t in user_text if t)
    if system:
        prompt = "\n".join(t for t in system if t) + "\n\n" + prompt
    return prompt, images


async def prepare(body: ChatCompletionRequest, model: ModelInfo, limits: Limits, **fetch_kwargs: Any) -> PreparedChat:
    """Validate one chat request and build its engine Request (raises ServiceError subclasses)."""
    named = model_names.parse(body.model, model.aliases)  # "shapes:vhr": interventions in the name (404/400)
    unsupported = body.unsupported()
    if unsupported:
        raise BadRequest(f"{unsupported[0]} is not supported by this server", param=unsupported[0],
                         code="unsupported_parameter")
    if body.top_logprobs is not None and not body.logprobs:  # OpenAI refuses it too
        raise BadRequest("top_logprobs requires logprobs to be true", param="top_logprobs", code="invalid_value")
    prompt, image_urls = split_messages(body)
    if not prompt.strip():
        raise BadRequest("the prompt is empty", param="messages", code="invalid_prompt")
    max_images = min(limits.max_images, ENGINE_MAX_IMAGES)
    if len(image_urls) > max_images:
        raise BadRequest(f"{len(image_urls)} images given; at most {max_images} per request",
                         param="messages", code="too_many_images")
    if len(prompt) > limits.max_prompt_chars:
        raise BadRequest(f"prompt of {len(prompt)} characters exceeds the limit of {limits.max_prompt_chars}",
                         param="messages", code="context_length_exceeded")
    # a request that names no limit gets the default, never more than the operator's --max-tokens
    max_tokens = body.max_completion_tokens or body.max_tokens or min(limits.default_max_tokens, limits.max_tokens)
    if max_tokens > limits.max_tokens:
        raise BadRequest(f"max_tokens={max_tokens} exceeds this server's limit of {limits.max_tokens}",
                         param="max_tokens", code="invalid_value")
    if max_tokens >= model.max_context:
        raise BadRequest(f"max_tokens={max_tokens} does not fit the model's context of {model.max_context} tokens",
                         param="max_tokens", code="context_length_exceeded")
    if model.count_tokens is not None:
        n = model.count_tokens(prompt)
        if n + max_tokens > model.max_context:
            raise BadRequest(f"prompt of {n} tokens plus max_tokens={max_tokens} exceeds the model's context of "
                             f"{model.max_context} tokens", param="messages", code="context_length_exceeded")
    configs = model_names.interventions(named, body.intervention_spec())  # InterventionError -> 400 via error_for
    validate(configs, model.facts)
    check_routers(configs)
    require_image(configs, has_image=bool(image_urls))  # every method acts on image tokens
    image = None
    if image_urls:
        url, param = image_urls[0]
        image = await load_image(url, limits, param, **fetch_kwargs)
    greedy = body.temperature < GREEDY_BELOW or body.top_p < TOP_P_GREEDY_BELOW
    temperature = 0.0 if greedy else body.temperature
    request = Request(prompt=prompt, image=image, max_new_tokens=max_tokens, temperature=temperature,
                      top_p=body.top_p, seed=body.seed, stop=body.stop_sequences(), interventions=configs,
                      logprobs=body.logprobs_top())
    applied = [config_dict(c) for c in configs]
    return PreparedChat(
        # a name with interventions is echoed as sent ("shapes:vhr"); a plain one as the served id
        request=request, model=named.requested if named.spec is not None else model.model_id,
        label="+".join(a["name"] for a in applied) or "none",
        applied=applied, stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage), info=model)


def check_routers(configs: Any) -> None:
    """A VTE router named by a request must be a file inside the router directory (a symlink
    pointing elsewhere is not offered) whose weights load: 400 now, never a 500 mid-batch."""
    names = [c.router for c in configs if getattr(c, "policy", None) == "router" and getattr(c, "router", None)]
    if not names:
        return
    from lvlm_hallu.interventions import vte

    root = vte.router_dir()
    for name in names:
        path = None if root is None else root / f"{name}.pt"
        inside = path is not None and path.resolve().is_relative_to(root.resolve())
        try:
            if not inside:
                raise ValueError(f"vte: no router named {name!r} in the router directory")
            vte.load_router_weights(name)
        except Exception as err:  # noqa: BLE001 - unreadable or malformed weights are the request's problem
            raise BadRequest(f"router {name!r} cannot be used: {err}"[:300], param="interventions",
                             code="invalid_intervention") from None


def report(prepared: PreparedChat, result: Result) -> InterventionReport:
    t = result.timings
    return InterventionReport(applied=resolved_applied(prepared), details=jsonable(result.report),
                              prefill_ms=_ms(t.prefill_ms), decode_ms=_ms(t.decode_ms),
                              decode_tokens_per_s=_ms(t.decode_tokens_per_s))


def resolved_applied(prepared: PreparedChat) -> list[dict[str, Any]]:
    """The interventions as the model ran them: what the request left unset (PAI's alpha, VHR's
    layers ...) filled the way the batch plan fills it (interventions/defaults.py), so the report
    shows 0.2 rather than null. The plan has read the profile by now, so it is cached; a model
    without facts or profile (test fakes) reports the request's values."""
    info = prepared.info
    if not prepared.request.interventions or info is None or info.facts is None or info.profile is None:
        return prepared.applied
    from lvlm_hallu.interventions.defaults import resolve_requests

    (request,), _ = resolve_requests(info.facts, [prepared.request], info.profile())
    return [config_dict(c) for c in request.interventions]


def _ms(value: float) -> float:
    return round(float(value), 3) if math.isfinite(value) else 0.0  # a zero-time decode has no rate


def usage(result: Result) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 total_tokens=result.prompt_tokens + result.completion_tokens)


def answer_text(text: str) -> str:
    """The answer without the one leading space that SentencePiece tokenizers (Llama's "▁The")
    put before the first word; the stream drops it from its first non-empty delta the same way."""
    return text[1:] if text.startswith(" ") else text


class DeltaText:
    """Stream deltas with `answer_text`'s rule applied, so the joined stream equals the answer."""

    def __init__(self) -> None:
        self.started = False

    def __call__(self, delta: str) -> str:
        if not self.started and delta:
            self.started = True
            return answer_text(delta)
        return delta


def completion(prepared: PreparedChat, result: Result) -> ChatCompletion:
    return ChatCompletion(
        id=prepared.id, created=prepared.created, model=prepared.model,
        choices=[Choice(message=AssistantMessage(content=answer_text(result.text)),
                        finish_reason=finish_reason(result), logprobs=logprobs(result.logprobs))],
        usage=usage(result), intervention_report=report(prepared, result))


def logprobs(entries: Any) -> ChoiceLogprobs | None:
    """OpenAI's `choices[].logprobs` from the engine's `TokenLogprob`s (None: not asked for)."""
    if entries is None:
        return None
    return ChoiceLogprobs(content=[
        TokenLogprob(token=e.token, bytes=list(e.bytes), logprob=finite_logprob(e.logprob),
                     top_logprobs=[TopLogprob(token=t.token, bytes=list(t.bytes), logprob=t.logprob)
                                   for t in e.top if math.isfinite(t.logprob)])
        for e in entries])


def finite_logprob(value: float) -> float:
    """A log-probability JSON can carry: -inf (and NaN) become `LOGPROB_FLOOR`."""
    return float(value) if math.isfinite(value) else LOGPROB_FLOOR


def chunk(prepared: PreparedChat, delta: ChunkDelta | None = None, *, finish: str | None = None,
          result: Result | None = None, with_usage: bool = False, entries: Any = None) -> ChatCompletionChunk:
    """One stream chunk; the usage-only chunk (OpenAI's include_usage) has no choices. `entries`:
    the engine's TokenLogprobs of the tokens this chunk covers."""
    choices = [] if with_usage else [ChunkChoice(delta=delta or ChunkDelta(), finish_reason=finish,
                                                 logprobs=logprobs(entries))]
    return ChatCompletionChunk(
        id=prepared.id, created=prepared.created, model=prepared.model, choices=choices,
        usage=usage(result) if with_usage and result is not None else None,
        intervention_report=report(prepared, result) if finish and result is not None else None)


def finish_reason(result: Result) -> str:
    return result.finish_reason if result.finish_reason in ("stop", "length") else "stop"


def jsonable(value: Any) -> Any:
    """Engine reports may hold tuples, numpy/torch scalars or tensors: make them JSON data."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN or Infinity
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return jsonable(tolist())
    return jsonable(float(value)) if isinstance(value, numbers.Real) else repr(value)
