"""Our engine as an lmms-eval model: `python -m lmms_eval --model lvlm_hallu --model_args ...`.

Registered through lmms-eval's entry-point group `lmms_eval.models` (lvlm_hallu/lmms_eval/__init__.py,
pyproject.toml). The model arguments:

    pretrained     model for `lvlm.load`: "shapes" (default), "tiny-llava", a hub id or a path
    interventions  a spec as the CLI and the service's `interventions` field write it
                   ("none", "vhr", "vhr+pai", "vhr:tuned"), resolved by the intervention registry
                   and checked against the loaded model before any request runs
    batch_size     requests per engine batch: lmms-eval passes its --batch_size (default 1) here
    device, dtype  passed to `lvlm.load`

Generation (`generate_until`) runs our engine in batches of `batch_size`: one `lvlm.types.Request`
per lmms-eval request with the task's image, prompt text, `max_new_tokens`, temperature (0 when
`do_sample` is false), top_p and `until` as stop strings, every row with the run's interventions.
Log-likelihood requests (multiple-choice tasks scored by continuation likelihood) and multi-round
generation are refused with an error that says so: the engine decodes; it has no teacher-forced
scoring path.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

GENERATED_BY_DEFAULT = 64  # max_new_tokens when a task names none (lmms-eval's own default is 1024)


class LVLMHallu(lmms):
    """lmms-eval's `lmms` interface over `lvlm.load(pretrained)` with fixed interventions."""

    is_simple = True  # lmms-eval hands `generate_until` (context, gen_kwargs, doc_to_visual, doc_id, task, split)

    def __init__(self, pretrained: str = "shapes", interventions: str = "none", batch_size: int | str = 8,
                 device: str | None = None, dtype: str | None = None, max_batch_size: Any = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"lvlm_hallu: unknown model_args {', '.join(sorted(unknown))}; valid: pretrained, "
                             "interventions, batch_size, device, dtype")
        from lvlm_hallu import lvlm
        from lvlm_hallu.interventions import resolve
        from lvlm_hallu.interventions.validate import validate

        self.spec = "none" if interventions in (None, "") else str(interventions)
        self.configs = resolve(self.spec)  # an unknown name or parameter fails before the model loads
        if not str(batch_size).isdigit() or int(batch_size) < 1:  # lmms-eval's "auto" sizes GPU batches by trial
            raise ValueError(f"lvlm_hallu: batch_size must be a positive whole number, got {batch_size!r}")
        self.batch_size_per_call = int(batch_size)
        self.pipeline = lvlm.load(str(pretrained), device=device or "cpu", dtype=dtype)
        validate(self.configs, self.pipeline.facts)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_call

    def request(self, instance: Instance) -> Any:
        """The engine request for one lmms-eval `generate_until` instance."""
        from lvlm_hallu.lvlm.types import Request

        context, gen_kwargs, doc_to_visual, doc_id, task, split = instance.args
        visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) or [] if v is not None]
        until = gen_kwargs.get("until") or ()
        stop = (until,) if isinstance(until, str) else tuple(s for s in until if s)
        temperature = float(gen_kwargs.get("temperature") or 0.0)  # do_sample: false decodes greedily whatever it says
        return Request(prompt=context, image=visuals[0] if len(visuals) == 1 else (visuals or None),
                       max_new_tokens=int(gen_kwargs.get("max_new_tokens", GENERATED_BY_DEFAULT)),
                       temperature=temperature if gen_kwargs.get("do_sample", temperature > 0) else 0.0,
                       top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0), stop=stop, interventions=self.configs)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        answers: list[str] = []
        with tqdm(total=len(requests), disable=self.rank != 0, desc=f"lvlm_hallu ({self.spec})") as bar:
            for start in range(0, len(requests), self.batch_size):
                chunk = requests[start:start + self.batch_size]
                results = self.pipeline.generate([self.request(r) for r in chunk])
                # without the leading space SentencePiece puts before the first word, as the service answers
                answers.extend(r.text[1:] if r.text.startswith(" ") else r.text for r in results)
                bar.update(len(chunk))
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("lvlm_hallu answers generation tasks only (output_type generate_until): "
                                  "log-likelihood scoring of given continuations is not implemented by the engine")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("lvlm_hallu answers single-turn generation tasks only (one user turn, one image)")
