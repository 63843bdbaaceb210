"""The HTTP service: an OpenAI-compatible FastAPI app served by Ray Serve.

`Service` holds one replica's state (pipeline, limits, metrics, engine runner, admission
counter, jobs); `build_app(service)` builds the FastAPI routes around it, so the same app runs
under Ray Serve and, with a fake pipeline, in-process under httpx's ASGI transport for tests.
`LVLMServer` is the Ray Serve deployment: it loads and warms the model in its constructor and
feeds non-streaming chat requests through `@serve.batch`, whose batches run on a worker thread
(`asyncio.to_thread`) so the event loop keeps accepting requests while the model computes.
Streaming requests take their own path (one request, tokens pushed out as they are decoded).
HTTP reaches a replica through the gateway (serve/gateway.py), the application's ingress, which
calls `LVLMServer.forward` and answers in OpenAI's shape when a replica dies.

Every route answers errors with OpenAI's error object, including FastAPI's own (unknown route,
wrong method, validation): no exception leaves a route, so a bad request can never take the
replica down. Every answer and stream event is strict JSON (`allow_nan=False`: no NaN or
Infinity, which strict parsers refuse).

Clients that leave: each generation holds one admission `Slot`, released exactly once on every
exit path (answer, error, stream closed, client gone: a release in a `finally` never awaits,
because an `await` inside a cancelled task raises again). A non-stream request whose caller is
cancelled (the client disconnected) sets its ticket's event, and the engine retires its row at
the next decode step (serve/scheduler.py, serve/batching.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import weakref
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lvlm_hallu.serve import chat
from lvlm_hallu.serve.batching import EngineRunner, Outcome, Ticket, TokenStream
from lvlm_hallu.serve.config import ServeConfig
from lvlm_hallu.serve.errors import BadRequest, MethodNotAllowed, NotFound, ServiceError, Unavailable, error_for
from lvlm_hallu.serve.limits import Admission, Slot, check_api_key, check_costs, check_values, read_body
from lvlm_hallu.serve.metrics import Metrics
from lvlm_hallu.serve.schema import (
    ChatCompletionRequest,
    ChunkDelta,
    EvalJob,
    EvalJobList,
    EvalJobRequest,
    InterventionList,
    ModelCard,
    ModelList,
)

log = logging.getLogger("serve")
EVAL_BODY_LIMIT = 64 * 1024
LARGE_BODY = 256 * 1024  # bodies from this size on are parsed off the event loop
CLIENT_CLOSED = 499  # metrics status of a request whose client left before its answer
Submit = Callable[[Any], Awaitable[Outcome]]
SCHEDULERS = ("continuous", "static")


def make_runner(pipeline: Any, config: ServeConfig, on_batch: Callable[[int, bool], None]) -> Any:
    """The replica's engine runner: the continuous scheduler (default) or static batches."""
    if config.scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {config.scheduler!r}")
    if config.scheduler == "continuous" and hasattr(pipeline, "engine"):  # a fake pipeline has no engine
        from lvlm_hallu.serve.scheduler import ContinuousScheduler

        return ContinuousScheduler(pipeline, max_rows=config.max_batch_size, max_tokens=config.max_tokens_in_flight,
                                   max_prefill_tokens=config.max_prefill_tokens,
                                   admit_after_steps=config.admit_after_steps, on_batch=on_batch)
    real = pipeline if hasattr(pipeline, "engine") else None  # a real one lets the runner drop rows
    return EngineRunner(pipeline.generate, on_batch=on_batch, pipeline=real)


class StrictJSONResponse(JSONResponse):
    """JSONResponse that refuses NaN and Infinity instead of writing invalid JSON."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


class SlotStream(StreamingResponse):
    """A stream that gives its admission slot back when it ends, however it ends (even when the
    client left before the first byte and the body generator never started)."""

    def __init__(self, content: Any, slot: Slot, on_end: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._slot, self._on_end = slot, on_end
        weakref.finalize(self, _end_stream, slot, on_end)  # last resort: never called at all

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _end_stream(self._slot, self._on_end)


def _end_stream(slot: Slot, on_end: Callable[[], None]) -> None:
    if slot.release():
        on_end()


class Service:
    """One replica's state; the routes in `build_app` are thin wrappers over its methods."""

    def __init__(self, pipeline: Any, config: ServeConfig, *, submit: Submit | None = None, jobs: Any = None,
                 fetch_kwargs: dict | None = None, metrics: Metrics | None = None):
        self.pipeline, self.config, self.limits = pipeline, config, config.limits
        self.metrics = metrics or Metrics()  # replicas pass Metrics(ray=True): serve/metrics.py
        self.runner = make_runner(pipeline, config, self.metrics.observe_batch)
        self.admission = Admission(config.max_concurrent)
        self.submit: Submit = submit or self._submit_alone  # takes a batching.Ticket
        self.jobs = jobs
        self.fetch_kwargs = fetch_kwargs or {}  # tests inject a resolver/transport for remote images
        tokenizer = getattr(pipeline, "tokenizer", None)
        self.model = chat.ModelInfo(
            model_id=pipeline.model_id, aliases=frozenset({pipeline.model_id, config.model}),
            max_context=int(pipeline.max_context),
            count_tokens=(lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))
            if tokenizer is not None else None,
            facts=getattr(pipeline, "facts", None), profile=getattr(pipeline, "profile", None))

    async def _submit_alone(self, ticket: Ticket) -> Outcome:
        return await self.runner.generate(ticket.request, ticket.cancelled)

    async def _generate(self, request: Any) -> Outcome:
        """One non-stream generation; a cancelled caller (client gone) cancels its row."""
        ticket = Ticket(request, threading.Event())
        try:
            return await self.submit(ticket)
        except asyncio.CancelledError:
            ticket.cancelled.set()  # retired at the next decode step, or never admitted
            raise

    def owner(self, http: HTTPRequest) -> str | None:
        """The caller's owner id (serve/limits.py key_owner), None without keys; raises 401."""
        return check_api_key(http.headers.get("authorization"), self.config.keys())

    def warm_up(self) -> None:
        """One short generation so the first user request does not pay for lazy initialisation."""
        from PIL import Image

        from lvlm_hallu.lvlm.types import Request

        started = time.perf_counter()
        outcome = self.runner.run_batch([Request("Describe this image.", Image.new("RGB", (64, 64), "gray"),
                                                 max_new_tokens=2)])[0]
        if outcome.error is not None:
            log.warning("warm-up generation failed: %r", outcome.error)
        log.info("warm-up took %.2fs", time.perf_counter() - started)

    # -- chat -----------------------------------------------------------------------------------
    async def chat(self, http: HTTPRequest) -> Response:
        started = time.perf_counter()
        raw = await read_body(http, self.limits.max_body_bytes)
        check_values(raw, self.limits)  # milliseconds, where parsing a list of millions takes seconds
        # a large body is parsed on a worker thread: the loop keeps serving the other requests
        body = parse(ChatCompletionRequest, raw) if len(raw) < LARGE_BODY else \
            await asyncio.to_thread(parse, ChatCompletionRequest, raw)
        check_costs(body, self.limits, self.model.facts)  # before anything else is spent on it
        slot = self.admission.acquire()
        self.metrics.set_inflight(self.admission.active)
        handed_off = False
        label = "invalid"
        try:
            prepared = await chat.prepare(body, self.model, self.limits, **self.fetch_kwargs)
            label = prepared.label
            if prepared.stream:
                response = await self._stream(prepared, started, slot)
                handed_off = True  # the stream releases the admission slot when it ends
                return response
            result = (await self._generate(prepared.request)).unwrap()
            self._observe_success(label, started, result)
            return StrictJSONResponse(chat.completion(prepared, result).model_dump())
        except asyncio.CancelledError:  # the client left: counted as nginx's 499, "client closed request"
            self.metrics.observe_chat(label, CLIENT_CLOSED, time.perf_counter() - started)
            raise
        except Exception as err:
            error = error_for(err, http.headers.get("x-request-id"))  # converted once: logged once
            self.metrics.observe_chat(label, error.status, time.perf_counter() - started)
            raise error from err
        finally:
            if not handed_off and slot.release():  # synchronous: safe in a cancelled task
                self.metrics.set_inflight(self.admission.active)

    async def _stream(self, prepared: chat.PreparedChat, started: float, slot: Slot) -> StreamingResponse:
        stream = TokenStream(self.runner, prepared.request).start()
        try:
            # Wait for the first token before answering, so that errors the engine finds while
            # preparing the batch (prompt too long for the context ...) are still proper 4xx.
            first = await stream.next_delta()
        except BaseException:
            stream.cancel()  # no await here: this task may be the one being cancelled
            raise

        async def events():
            ended = False  # answered in full or with an error event: anything else means the client left
            try:
                yield sse(chat.chunk(prepared, ChunkDelta(role="assistant", content="")))
                text, delta = chat.DeltaText(), first  # DeltaText: no leading space, as chat.completion
                sent = 0  # logprobs entries streamed so far (lvlm.types.TextDelta carries them)
                while delta is not None:
                    content = text(delta)
                    entries = getattr(delta, "logprobs", None) if prepared.request.logprobs is not None else None
                    if content or entries:
                        yield sse(chat.chunk(prepared, ChunkDelta(content=content), entries=entries))
                        sent += len(entries or ())
                    delta = await stream.next_delta()
                result = stream.result
                rest = None if result.logprobs is None else result.logprobs[sent:]  # held-back tokens
                yield sse(chat.chunk(prepared, finish=chat.finish_reason(result), result=result, entries=rest))
                if prepared.include_usage:
                    yield sse(chat.chunk(prepared, result=result, with_usage=True))
                yield "data: [DONE]\n\n"
                ended = True
                self._observe_success(prepared.label, started, result)
            except Exception as err:  # noqa: BLE001 - headers are sent: report in-band, OpenAI style
                ended = True
                error = error_for(err)
                self.metrics.observe_chat(prepared.label, error.status, time.perf_counter() - started)
                yield sse(error.body())
                yield "data: [DONE]\n\n"
            finally:
                if not ended:
                    self.metrics.observe_chat(prepared.label, CLIENT_CLOSED, time.perf_counter() - started)
                # Synchronous only: when the client left, this generator is closed inside a
                # cancelled task and any await here would raise before the slot is released.
                stream.cancel()
                _end_stream(slot, lambda: self.metrics.set_inflight(self.admission.active))

        def on_end() -> None:
            stream.cancel()
            self.metrics.set_inflight(self.admission.active)

        return SlotStream(events(), slot, on_end, media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _observe_success(self, label: str, started: float, result: Any) -> None:
        self.metrics.observe_chat(label, 200, time.perf_counter() - started, result.prompt_tokens,
                                  result.completion_tokens, result.timings.decode_tokens_per_s)

    # -- catalog --------------------------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model.model_id, max_context=self.model.max_context)])

    def interventions(self) -> InterventionList:
        """The catalog, with each method's paper and tuned values on the served model."""
        from lvlm_hallu.interventions import catalog

        facts, profile = getattr(self.pipeline, "facts", None), getattr(self.pipeline, "profile", None)
        listed = catalog(facts, profile()) if facts is not None and callable(profile) else catalog()
        return InterventionList.model_validate({"data": chat.jsonable(listed)})

    def health(self) -> dict:
        return {"status": "ok", "model": self.model.model_id, "inflight": self.admission.active,
                "max_concurrent": self.admission.limit}

    async def ready(self, http: HTTPRequest) -> JSONResponse:
        """Readiness: 200 when the model is loaded and the job store (if jobs are on) answers,
        else 503 with the same body, so a load balancer stops sending traffic here. Without a
        valid key the job store shows only whether it is ok (`jobs_view`)."""
        jobs = await self.jobs_health()
        ok = self.pipeline is not None and (jobs is None or bool(jobs.get("ok")))
        body = {"ready": ok, "model": self.model.model_id, "jobs": self.jobs_view(jobs, http)}
        return StrictJSONResponse(body, status_code=200 if ok else 503)

    def jobs_view(self, jobs: dict | None, http: HTTPRequest) -> dict | None:
        """The job store's health as a caller may see it: details (path, counts, errors, which
        can name hosts, processes and actors) only with a valid key or on a server without keys."""
        if jobs is None:
            return None
        try:
            self.owner(http)
        except ServiceError:
            return {"ok": bool(jobs.get("ok"))}
        return jobs

    def render_metrics(self) -> Response:
        self.metrics.set_inflight(self.admission.active)
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    # -- evaluation jobs ------------------------------------------------------------------------
    def _jobs(self) -> Any:
        if self.jobs is None:
            raise Unavailable("evaluation jobs are not enabled on this server", code="eval_jobs_disabled")
        return self.jobs

    async def submit_job(self, http: HTTPRequest) -> EvalJob:
        jobs = self._jobs()
        body = parse(EvalJobRequest, await read_body(http, EVAL_BODY_LIMIT))
        check_costs(body, self.limits, self.model.facts)
        kinds = jobs.kinds()
        if body.kind not in kinds:
            raise BadRequest(f"unknown job kind {body.kind!r}; valid kinds: {', '.join(sorted(kinds))}",
                             param="kind", code="invalid_value")
        if body.limit > self.limits.max_eval_limit:
            raise BadRequest(f"limit={body.limit} exceeds this server's limit of {self.limits.max_eval_limit}",
                             param="limit", code="invalid_value")
        if body.max_tokens is not None and body.max_tokens > self.limits.max_tokens:
            raise BadRequest(f"max_tokens={body.max_tokens} exceeds this server's limit of {self.limits.max_tokens}",
                             param="max_tokens", code="invalid_value")
        from lvlm_hallu.interventions import resolve
        from lvlm_hallu.interventions.validate import validate

        validate(resolve(body.intervention_spec()), self.model.facts)  # 400 now rather than a failed job later
        from lvlm_hallu.serve.jobspec import JobSpecError, check_options, check_seed

        try:  # the CLI's rules for the kind's options (serve/jobspec.py)
            check_seed(body.seed)
            options = check_options(body.kind, body.options, max_tokens=self.limits.max_tokens)
        except JobSpecError as err:
            raise BadRequest(str(err), param=err.param, code="invalid_value") from None
        request = body.model_dump()
        request["interventions"] = body.intervention_spec()
        request["options"] = options
        return job_model(await registry(jobs.submit(body.kind, self.config.model, request, self.config.load_kwargs(),
                                                    owner=self.owner(http))))

    # Each job belongs to the key that created it (None: a server without keys); another key
    # gets the same 404 as for a job that does not exist.
    async def job(self, http: HTTPRequest, job_id: str) -> EvalJob:
        record = await registry(self._jobs().get(job_id, owner=self.owner(http)))
        if record is None:
            raise NotFound(f"no evaluation job {job_id!r}", param="id")
        return job_model(record)

    async def list_jobs(self, http: HTTPRequest) -> EvalJobList:
        return EvalJobList(data=[job_model(r) for r in await registry(self._jobs().list(owner=self.owner(http)))])

    async def cancel_job(self, http: HTTPRequest, job_id: str) -> EvalJob:
        record = await registry(self._jobs().cancel(job_id, owner=self.owner(http)))
        if record is None:
            raise NotFound(f"no evaluation job {job_id!r}", param="id")
        return job_model(record)

    async def resume_job(self, http: HTTPRequest, job_id: str) -> EvalJob:
        """A failed or cancelled job continues from its results file (docs/cluster.md)."""
        outcome = await registry(self._jobs().resume(job_id, owner=self.owner(http)))
        if outcome is None:
            raise NotFound(f"no evaluation job {job_id!r}", param="id")
        if not outcome["resumed"]:
            err = BadRequest(f"job {job_id} is {outcome['job']['state']}; only failed or cancelled jobs resume",
                             param="id", code="job_not_resumable")
            err.status = 409
            raise err
        return job_model(outcome["job"])

    async def jobs_health(self) -> dict | None:
        """The job store's state ({"ok", "path", "jobs", ...}); None when jobs are disabled."""
        if self.jobs is None:
            return None
        try:
            return await asyncio.wait_for(self.jobs.health(), timeout=5.0)
        except Exception as err:  # noqa: BLE001 - a registry that does not answer is unhealthy, not a 500
            return {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}


async def registry(call: Awaitable[Any]) -> Any:
    """A job registry call; a registry that fails (its store unreadable, its actor dead) is a 503
    `jobs_unavailable` for the client, logged here, rather than a 500 on every job route."""
    try:
        return await call
    except ServiceError:
        raise
    except Exception as err:  # noqa: BLE001 - the registry's own failure, not the request's
        log.error("job registry call failed: %r", err)
        raise Unavailable("the evaluation job store is unavailable; see the server log", code="jobs_unavailable",
                          retry_after_s=5.0) from None


def job_model(record: dict) -> EvalJob:
    public = {k: v for k, v in record.items() if k != "owner"}
    return EvalJob.model_validate({**public, "progress": {"done": record["done"], "total": record["total"]}})


def parse(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body into `model`; every problem is a 400 naming the offending field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        raise validation_error(err.errors()) from None


def validation_error(errors: list[dict]) -> BadRequest:
    # A union reports one error per member: a length bound explains the refusal best; in the
    # interventions (a string, or a list of names and objects) the error that reached deepest
    # into the value names the parameter at fault.
    first = next((e for e in errors if e.get("type") == "too_long"), errors[0])
    if first.get("type") != "too_long" and first.get("loc", ())[:1] == ("interventions",):
        first = max(errors, key=lambda e: len([p for p in e.get("loc", ()) if not _is_type_tag(p)]))
    if first.get("type") == "json_invalid":
        return BadRequest(f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                          code="invalid_json")
    # Union members add their type to the location ("stop.str", "content.list[...]"): not a field.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return BadRequest(f"{param or 'body'}: {first['msg']}{more}", param=param, code="invalid_value")


def _is_type_tag(part: Any) -> bool:
    # field names are lower case; union members are type names ("str", "list[...]", "InterventionSpec")
    return isinstance(part, str) and ("[" in part or part[:1].isupper()
                                      or part in {"str", "int", "float", "bool", "dict", "list", "none"})


def sse(payload: Any) -> str:
    data = payload.model_dump(exclude_none=True) if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data, separators=(',', ':'), allow_nan=False)}\n\n"


def error_response(err: ServiceError) -> JSONResponse:
    return StrictJSONResponse(err.body(), status_code=err.status, headers=err.headers())


def build_app(service: Service) -> FastAPI:
    """The FastAPI app around one `Service`."""
    # FastAPI's own /docs and /openapi.json take no key; ours below go through `route` (auth).
    app = FastAPI(title="lvlm-hallu", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None,
                  description="OpenAI-compatible chat completions with per-request hallucination interventions")
    metrics = service.metrics

    def route(name: str, *, auth: bool = True):
        """Auth, metrics, and the OpenAI error shape for everything a handler raises."""

        def wrap(handler):
            @functools.wraps(handler)
            async def run(http: HTTPRequest, **kwargs):
                started = time.perf_counter()
                try:
                    if auth:
                        service.owner(http)
                    out = await handler(http, **kwargs)
                    response = out if isinstance(out, Response) else StrictJSONResponse(
                        out.model_dump() if isinstance(out, BaseModel) else out)
                except Exception as err:  # noqa: BLE001 - every failure becomes an error object
                    response = error_response(error_for(err, http.headers.get("x-request-id")))
                metrics.observe_request(name, response.status_code, time.perf_counter() - started)
                return response

            return run

        return wrap

    @app.post("/v1/chat/completions")
    @route("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await service.chat(http)

    @app.get("/v1/models")
    @route("/v1/models")
    async def list_models(http: HTTPRequest):
        return service.models()

    @app.get("/v1/interventions")
    @route("/v1/interventions")
    async def list_interventions(http: HTTPRequest):
        return service.interventions()

    @app.get("/health")
    @route("/health", auth=False)
    async def health(http: HTTPRequest):
        return {**service.health(), "jobs": service.jobs_view(await service.jobs_health(), http)}

    @app.get("/ready")
    @route("/ready", auth=False)
    async def ready(http: HTTPRequest):
        return await service.ready(http)

    @app.get("/metrics")
    @route("/metrics")
    async def prometheus(http: HTTPRequest):
        return service.render_metrics()

    @app.post("/v1/eval/jobs")
    @route("/v1/eval/jobs")
    async def submit_job(http: HTTPRequest):
        return await service.submit_job(http)

    @app.get("/v1/eval/jobs")
    @route("/v1/eval/jobs")
    async def list_jobs(http: HTTPRequest):
        return await service.list_jobs(http)

    @app.get("/v1/eval/jobs/{job_id}")
    @route("/v1/eval/jobs/{id}")
    async def get_job(http: HTTPRequest, job_id: str):
        return await service.job(http, job_id)

    @app.delete("/v1/eval/jobs/{job_id}")
    @route("/v1/eval/jobs/{id}")
    async def cancel_job(http: HTTPRequest, job_id: str):
        return await service.cancel_job(http, job_id)

    @app.post("/v1/eval/jobs/{job_id}/resume")
    @route("/v1/eval/jobs/{id}/resume")
    async def resume_job(http: HTTPRequest, job_id: str):
        return await service.resume_job(http, job_id)

    @app.get("/openapi.json", include_in_schema=False)
    @route("/openapi.json")
    async def openapi_schema(http: HTTPRequest):
        return app.openapi()

    @app.get("/docs", include_in_schema=False)
    @route("/docs")
    async def docs(http: HTTPRequest):
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="lvlm-hallu API")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(http: HTTPRequest, exc: StarletteHTTPException):
        if exc.status_code == 404:
            metrics.observe_request("unmatched", 404, 0.0)  # scanners and typos show up in /metrics
            return error_response(NotFound(f"no route {http.method} {http.url.path}"))
        if exc.status_code == 405:
            return error_response(MethodNotAllowed(f"method {http.method} is not allowed on {http.url.path}"))
        err = ServiceError(str(exc.detail))
        err.status, err.type = exc.status_code, "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(http: HTTPRequest, exc: RequestValidationError):
        return error_response(validation_error(list(exc.errors())))

    from lvlm_hallu.serve import playground  # the page at / and its endpoints (serve/playground.py)

    playground.mount(app, service, route)
    return app


# -- Ray Serve --------------------------------------------------------------------------------
def _deployment_class():
    """The deployment class; defined lazily so that importing this module does not import Ray."""
    from ray import serve

    # Not an ingress: the gateway (serve/gateway.py) is, and relays every HTTP request to `forward`.
    @serve.deployment(name="LVLMServer")
    class LVLMServer:
        async def __init__(self, config: ServeConfig):
            from lvlm_hallu import lvlm

            from lvlm_hallu.serve import playground
            from lvlm_hallu.serve.jobs import RayJobs

            parser_warming = playground.start_warm_up()  # CHAIR's parser (NLTK) loads beside the model
            # Loading takes seconds to minutes; a thread keeps the replica's loop responsive.
            pipeline = await asyncio.to_thread(lvlm.load, config.model, **config.load_kwargs())
            jobs = None
            if config.eval_jobs:
                # Each job answers on `eval_replicas` model replicas (eval/cluster.py) with these options.
                replica_options = {"num_cpus": config.eval_num_cpus, "num_gpus": config.eval_num_gpus}
                if config.env_vars():
                    replica_options["runtime_env"] = {"env_vars": config.env_vars()}
                jobs = RayJobs(replica_options=replica_options, replicas=config.eval_replicas,
                               max_running=config.eval_max_running, jobs_dir=config.eval_jobs_dir,
                               retention={"keep_days": config.eval_keep_days, "keep_jobs": config.eval_keep_jobs})
            static = config.scheduler == "static"  # continuous: the scheduler's queue, no @serve.batch
            self.service = Service(pipeline, config, submit=self._generate_batch if static else None, jobs=jobs,
                                   metrics=Metrics(ray=True))  # summed over replicas by Ray's exporter
            self._generate_batch.set_max_batch_size(config.max_batch_size)
            self._generate_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
            self._app = build_app(self.service)
            if config.warmup:
                await asyncio.to_thread(self.service.warm_up)
                # ready once the page's first answers can be marked too (bounded: serve/playground.py)
                await asyncio.to_thread(parser_warming.join, playground.WARM_UP_WAIT_S)

        async def forward(self, method: str, path: str, query: str, headers: list, body: bytes):
            """One HTTP request relayed by the gateway (serve/gateway.py), answered as it streams."""
            from lvlm_hallu.serve.gateway import asgi_stream

            if getattr(self, "_app", None) is None:
                self._app = build_app(self.service)
            async for item in asgi_stream(self._app, method, path, query, headers, body):
                yield item

        async def respond(self, method: str, path: str, query: str, headers: list, body: bytes) -> dict:
            """One relayed request whose answer cannot be a stream, in one reply (a unary handle
            call costs less than a streaming one: serve/gateway.py)."""
            from lvlm_hallu.serve.gateway import asgi_answer

            if getattr(self, "_app", None) is None:
                self._app = build_app(self.service)
            return await asgi_answer(self._app, method, path, query, headers, body)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def _generate_batch(self, tickets: list) -> list[Outcome]:
            # Outcomes, not exceptions: an exception here would fail every caller in the batch.
            # Tickets: a caller whose client left sets its event; its row leaves at the next step.
            return await asyncio.to_thread(self.service.runner.run_batch, tickets)

    return LVLMServer


def build_application(config: ServeConfig):
    """The Ray Serve application for `serve.run` (replicas, GPUs, autoscaling from `config`)."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        # Must be >= max_batch_size x max_concurrent_batches or batches never fill (default 5).
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "health_check_timeout_s": 60,  # a long CPU batch must not look like a dead replica
    }
    if config.env_vars():
        options["ray_actor_options"]["runtime_env"] = {"env_vars": config.env_vars()}
    if config.max_replicas and config.max_replicas > config.replicas:
        options["autoscaling_config"] = {
            "min_replicas": config.replicas, "max_replicas": config.max_replicas,
            "target_ongoing_requests": max(1, config.max_batch_size),
        }
    else:
        options["num_replicas"] = config.replicas
    from lvlm_hallu.serve.gateway import bind_gateway

    # The gateway is the ingress: a replica that dies mid-request gets an OpenAI-shaped 503
    # (and one retry for idempotent requests) instead of the proxy's plain-text 500.
    return bind_gateway(_deployment_class().options(**options).bind(config), config)


def run(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, name: str = "lvlm",
        route_prefix: str = "/") -> Any:
    """Start Serve's HTTP proxy on host:port and deploy the app (Ray must be initialised)."""
    from ray import serve

    # uvicorn (in Serve's proxy) closes idle keep-alive connections after keep_alive_timeout_s
    serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": config.keep_alive_timeout_s})
    return serve.run(build_application(config), name=name, route_prefix=route_prefix)


__all__ = ["Service", "build_app", "build_application", "run"]
