"""A grader as a TRL ``GRPOTrainer`` reward function (training process)."""

from __future__ import annotations

import math
from typing import Any

from trainers.contract.errors import JobError
from trainers.contract.graders.judgeendpoints import (
    JudgeEndpointError,
    JudgeEndpoints,
    configure_judges,
    is_remote_judge,
    judge_metrics,
)
from trainers.contract.graders.python import PythonError
from trainers.contract.graders.python import configure as configure_python
from trainers.contract.graders.remote import EndpointError, configure, endpoint_names
from trainers.contract.graders.scoring import SCORERS, multi_scores, spec_of
from trainers.contract.graders.spec import GraderSpec, MultiGrader
from trainers.contract.graders.templates import EpisodeText, GraderError
from trainers.contract.outbound import ToolPolicy
from trainers.contract.sandbox import SandboxPolicy

# Keyword arguments TRL's GRPOTrainer passes that are not dataset columns.
_TRL_KWARGS = frozenset(
    {"trainer_state", "log_extra", "log_metric", "environments", "completion_ids"}
)


def completion_text(completion: Any) -> str:
    """A TRL completion as text: a string, or the text of its assistant messages."""
    if isinstance(completion, str):
        return completion
    messages = [completion] if isinstance(completion, dict) else list(completion)
    out = []
    for m in messages:
        if m.get("role", "assistant") != "assistant":
            continue
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append(content)
    return "".join(out)


def episode_sample(completion: Any) -> str:
    """What a grader reads of a TRL completion: its text, carrying the messages (tool
    calls and results included) when the completion is a conversation."""
    text = completion_text(completion)
    if isinstance(completion, list):
        return EpisodeText(text, completion)
    return text


class RewardFunction:
    """A grader as a TRL reward function: ``f(prompts, completions, **columns) -> list[float]``.

    ``GRPOTrainer`` passes every dataset column except ``prompt`` as a keyword
    holding one value per completion; row ``k`` of those columns is the ``item``
    the templates read. TRL names the reward after ``__name__`` (the grader's
    name). A multi grader also logs each sub-grader's mean through TRL's
    ``log_metric`` hook, and every grader its sample-dependent errors (each
    scored 0) per sample. An endpoint grader logs its calls of the batch (each try),
    the failed ones and their mean latency; one whose ``on_error`` is 'error' and that
    could not score a sample fails the job (``grader_failed``); so does a python grader
    that cannot run (no sandbox here), or that could not score a sample under
    ``on_error: "error"``. A remote judge (a score_model or label_model one of ``judges``
    serves) logs its calls, failed calls, mean latency and parse errors alike
    (``judgeendpoints.judge_metrics``), and fails the job the same way when its endpoint
    cannot answer under ``on_error`` 'error'.
    """

    def __init__(
        self,
        grader: GraderSpec | dict[str, Any],
        policy: ToolPolicy | None = None,
        sandbox: SandboxPolicy | None = None,
        judges: JudgeEndpoints | None = None,
    ):
        self.grader = spec_of(grader)
        self.__name__ = self.grader.name
        self._settings = (policy, sandbox, judges)
        self.stats = configure(policy)
        configure_python(sandbox)
        configure_judges(judges)

    def __reduce__(self):
        # Pickled as what built it (TRL's asynchronous trainer scores in a spawned
        # process): unpickling configures that process's endpoint policy, sandbox and
        # judges the way building it configured this one, with counts of its own.
        return (RewardFunction, (self.grader, *self._settings))

    def __call__(self, prompts: Any = None, completions: Any = (), **kwargs: Any) -> list[float]:
        samples = [episode_sample(c) for c in completions]
        columns = {k: v for k, v in kwargs.items() if k not in _TRL_KWARGS and isinstance(v, list)}
        items = [{k: v[row] for k, v in columns.items()} for row in range(len(samples))]
        notes: list[GraderError] = []
        for name in endpoint_names(self.grader):
            self.stats.take(name)  # counts of this batch only
        for name in self._judge_names():
            judge_metrics(name)
        try:
            if isinstance(self.grader, MultiGrader):
                rewards, subs = multi_scores(self.grader, items, samples, notes)
            else:
                rewards, subs = SCORERS[self.grader.type](self.grader, items, samples, notes), {}
        except (EndpointError, PythonError, JudgeEndpointError) as exc:
            raise JobError("grader_failed", str(exc), "graders") from None
        bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
        if bad:  # never counted as 0: a reward that is not a number is the grader's failure
            raise JobError(
                "grader_failed",
                f"grader '{self.__name__}' ({self.grader.type}) returned {rewards[bad[0]]} for "
                f"{len(bad)} of {len(rewards)} samples; a reward must be a finite number "
                "(check the grader's model or formula)",
                "graders",
            )
        log = kwargs.get("log_metric")
        if callable(log) and samples:
            for key, scores in subs.items():
                log(f"graders/{self.__name__}/{key}", sum(scores) / len(scores))
            log(f"graders/{self.__name__}/sample_errors", len(notes) / len(samples))
            self._log_endpoints(log)
        return rewards

    def _log_endpoints(self, log: Any) -> None:
        for name in endpoint_names(self.grader):
            calls, errors, seconds = self.stats.take(name)
            log(f"graders/{name}/endpoint_calls", float(calls))
            log(f"graders/{name}/endpoint_errors", float(errors))
            log(f"graders/{name}/endpoint_latency_s", seconds / calls if calls else 0.0)
        for name in self._judge_names():
            for key, value in judge_metrics(name).items():
                log(f"graders/{name}/{key}", value)

    def _judge_names(self) -> list[str]:
        subs = self.grader.graders.values() if isinstance(self.grader, MultiGrader) else []
        return [g.name for g in [self.grader, *subs] if is_remote_judge(g)]


def build_reward_function(
    grader: GraderSpec | dict[str, Any],
    policy: ToolPolicy | None = None,
    sandbox: SandboxPolicy | None = None,
    judges: JudgeEndpoints | None = None,
) -> RewardFunction:
    """The TRL reward function for ``grader`` (a parsed spec or its JSON); ``policy`` is
    the server's outbound policy its endpoint graders call under, ``sandbox`` how its
    python graders run, ``judges`` the judge endpoints its score_model and label_model
    graders may ask (all the run plan's)."""
    return RewardFunction(grader, policy, sandbox, judges)
