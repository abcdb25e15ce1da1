"""Which models a job may load, decided at job creation (torch-free).

A model reference (a job's ``model``, and every other model a spec names: grader
and judge models, BCO's UDM embedding model) is one of:

* a path under a configured model root (``POSTTRAIN_MODEL_ROOTS``, colon-separated;
  default ``<data_dir>/models``): an absolute path, or a name relative to a root
  (``Qwen/Qwen2.5-0.5B`` for ``<root>/Qwen/Qwen2.5-0.5B``). Symlinks are resolved
  before the check, so one pointing out of the roots is refused; the directory must
  hold a ``config.json`` with a ``model_type`` (or, for a LoRA fine-tune of one's
  own, an ``adapter_config.json``);
* the caller's own fine-tuned model: its ``ft:...`` name, a checkpoint's
  ``ft:...:ckpt-step-N`` name, or a checkpoint id ``ftckpt-...``, resolved to that
  checkpoint's directory on the data volume;
* a Hugging Face Hub id, only when ``POSTTRAIN_HUB_ACCESS`` is on (the worker
  downloads it; nothing here touches the network).

Everything else is refused with one message, whatever the reason, so the answer
never tells a caller which files exist on the host.

One exception: a ``score_model`` or ``label_model`` grader of a training job (and of
``/graders/validate``) whose ``model`` a judge endpoint of the server serves
(``POSTTRAIN_JUDGE_ENDPOINTS``) is a remote judge: its name is kept as written, since the
training process asks that endpoint for it and loads nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from service.auth import Tenant
from service.errors import APIError
from service.settings import ApiSettings
from trainers.contract.graders.spec import LabelModelGrader, ScoreModelGrader
from trainers.contract.jobdir import JobDir
from workers.store import JobNotFound, JobStore

NOT_ALLOWED = "model not found or not allowed"
# Fields of a job spec (at any depth) that name a model to load. tests/service/
# test_model_access.py fails if a spec field naming a model is missing here.
MODEL_FIELDS = frozenset({"model", "embedding_model", "udm_embedding_model"})
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
_CKPT_NAME = re.compile(r"^ckpt-step-(\d+)$")


class ModelRefused(Exception):
    """The reference is not a model this caller may use (the reason stays private)."""


@dataclass
class ResolvedModel:
    name: str  # as the caller wrote it
    source: Literal["local", "fine_tuned", "hub"]
    path: Path | None = None  # the directory the worker loads; None for a hub id


@dataclass
class SpecModels:
    """What job creation records about a spec's models."""

    model: ResolvedModel
    hub_ids: list[str] = field(default_factory=list)
    # graders' models kept as remote judges: the worker checks its own endpoints serve them
    judge_models: list[str] = field(default_factory=list)

    def record_fields(self) -> dict[str, str]:
        out = {"model_source": self.model.source}
        if self.model.path is not None:
            out["model_path"] = str(self.model.path)
        if self.hub_ids:
            out["hub_models"] = json.dumps(self.hub_ids)
        if self.judge_models:
            out["judge_models"] = json.dumps(sorted(set(self.judge_models)))
        return out


class ModelAccess:
    def __init__(self, settings: ApiSettings, jobs: JobStore):
        self.settings, self.jobs = settings, jobs
        self.data_dir = Path(settings.data_dir).resolve()
        # Job outputs and uploads are reached only through ft: names and checkpoint ids,
        # even if an operator lists the data directory itself as a model root.
        self.private = [self.data_dir / "jobs", self.data_dir / "files"]
        self.judge_models = settings.judges().models()

    def roots(self) -> list[Path]:
        return [r.resolve() for r in self.settings.model_root_dirs() if r.is_dir()]

    # ---- one reference
    def resolve(self, name: str, tenant: Tenant) -> ResolvedModel:
        """Raise ``ModelRefused`` unless ``tenant`` may train from ``name``."""
        if name.startswith("ft:"):
            return ResolvedModel(name, "fine_tuned", self._fine_tuned(name, tenant))
        if name.startswith("ftckpt-"):
            return ResolvedModel(name, "fine_tuned", self._checkpoint_by_id(name, tenant))
        local = self._local(name)
        if local is not None:
            return ResolvedModel(name, "local", local)
        if self.settings.hub_access and _HUB_ID.match(name) and ".." not in name:
            return ResolvedModel(name, "hub")
        raise ModelRefused(name)

    def _local(self, name: str) -> Path | None:
        path = Path(name)
        if path.is_absolute():
            candidates = [path]
        elif name.startswith("~") or any(p in ("..", ".") for p in Path(name).parts):
            return None
        else:
            candidates = [root / path for root in self.roots()]
        roots = self.roots()
        for candidate in candidates:
            try:
                real = candidate.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if not any(real == r or r in real.parents for r in roots):
                continue
            if any(real == p or p in real.parents for p in self.private):
                continue
            if _has_config(real):
                return real
        return None

    def _fine_tuned(self, name: str, tenant: Tenant) -> Path:
        parts = name.split(":")
        step = _CKPT_NAME.match(parts[-1]) if len(parts) >= 4 else None
        job_id = parts[-2] if step else parts[-1]
        rec = self._own_job(job_id, tenant)
        metas = self.jobs.checkpoints(job_id)
        if step:
            meta = next((m for m in metas if m.get("fine_tuned_model_checkpoint") == name), None)
        else:
            if (
                rec.get("status") != "succeeded"
                or rec.get("fine_tuned_model") != name
                or rec.get("model_deleted_at")
            ):
                raise ModelRefused(name)
            finals = [m for m in metas if m.get("final")]
            meta = (finals or metas or [None])[-1]
        if meta is None:
            raise ModelRefused(name)
        return self._checkpoint_dir(job_id, meta)

    def _checkpoint_by_id(self, ckpt_id: str, tenant: Tenant) -> Path:
        owner = None if tenant.admin else tenant.name
        for jid in self.jobs.list_ids(None, 100_000, owner)[0]:
            meta = next((m for m in self.jobs.checkpoints(jid) if m.get("id") == ckpt_id), None)
            if meta is not None:
                return self._checkpoint_dir(jid, meta)
        raise ModelRefused(ckpt_id)

    def _own_job(self, job_id: str, tenant: Tenant) -> dict:
        try:
            rec = self.jobs.get(job_id)
        except (JobNotFound, Exception):
            raise ModelRefused(job_id) from None
        if not tenant.owns(rec):
            raise ModelRefused(job_id)
        return rec

    def _checkpoint_dir(self, job_id: str, meta: dict) -> Path:
        try:
            real = (self.data_dir / str(meta["path"])).resolve(strict=True)
            root = JobDir(self.data_dir, job_id).root
        except (KeyError, OSError, RuntimeError, ValueError):
            raise ModelRefused(job_id) from None
        if root not in real.parents or not (_has_config(real) or _is_adapter(real)):
            raise ModelRefused(job_id)
        return real

    # ---- a whole spec
    def check_spec(self, spec: BaseModel, tenant: Tenant) -> SpecModels:
        """Resolve every model the spec names; 400 with one message if any is refused.

        Nested references (graders, judges, embedding models) are rewritten in place
        to the directory they resolved to, since the training process loads them as
        given; the job's own ``model`` keeps the caller's name (it is shown on the job)
        and its directory is returned for the record."""
        hub: list[str] = []
        judges: list[str] = []
        top = self._one(spec.model, tenant, "model", hub)
        graders = _training_graders(spec)
        for owner, attr, param in _nested_refs(spec):
            if id(owner) in graders and self.is_remote_judge(owner, attr):
                judges.append(getattr(owner, attr))
                continue
            resolved = self._one(getattr(owner, attr), tenant, param, hub)
            if resolved.path is not None:
                setattr(owner, attr, str(resolved.path))
        return SpecModels(top, hub, judges)

    def check_grader(
        self, grader: BaseModel, tenant: Tenant, param: str = "grader", *, training: bool = False
    ) -> BaseModel:
        """A copy of ``grader`` with every model it names resolved as a job's would be (the
        same 400 for a model the caller may not use); ``training``: as a training job's
        grader, whose remote judges keep their names (an eval's criteria have none)."""
        grader = grader.model_copy(deep=True)
        for owner, attr, where in _nested_refs(grader, param):
            if training and self.is_remote_judge(owner, attr):
                continue
            resolved = self._one(getattr(owner, attr), tenant, where, [])
            if resolved.path is not None:
                setattr(owner, attr, str(resolved.path))
        return grader

    def is_remote_judge(self, owner: BaseModel, attr: str) -> bool:
        """True if ``owner.attr`` is a model grader's model a judge endpoint serves."""
        return (
            isinstance(owner, ScoreModelGrader | LabelModelGrader)
            and attr == "model"
            and owner.model in self.judge_models
        )

    def _one(self, name: str, tenant: Tenant, param: str, hub: list[str]) -> ResolvedModel:
        try:
            resolved = self.resolve(name, tenant)
        except ModelRefused:
            message = NOT_ALLOWED if param == "model" else f"{param}: {NOT_ALLOWED}"
            raise APIError(400, message, param=param, code="model_not_found") from None
        if resolved.source == "hub":
            hub.append(name)
        return resolved


def _training_graders(spec: BaseModel) -> set[int]:
    """The ids of the graders (a multi grader's subs included) a GRPO-family job trains
    with: the only ones a judge endpoint may serve (an EGPO grader judge is not one)."""
    block = getattr(getattr(spec, "method", None), "block", None)
    if not hasattr(block, "graders_with_params"):
        return set()
    out: set[int] = set()
    for grader, _ in block.graders_with_params(""):
        subs = getattr(grader, "graders", None)
        out.update(id(g) for g in [grader, *(subs.values() if isinstance(subs, dict) else [])])
    return out


def _nested_refs(spec: BaseModel, prefix: str = "") -> list[tuple[BaseModel, str, str]]:
    """(object, attribute, dotted param) of every model reference below the top level (with
    a ``prefix``, of every reference at all: the object is itself below a top level)."""
    out: list[tuple[BaseModel, str, str]] = []

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                value = getattr(obj, name, None)
                here = f"{where}.{name}" if where else name
                if name in MODEL_FIELDS and isinstance(value, str) and where:
                    out.append((obj, name, here))
                else:
                    walk(value, here)
        elif isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                walk(item, f"{where}[{i}]")
        elif isinstance(obj, dict):
            for key, item in obj.items():
                walk(item, f"{where}.{key}")

    walk(spec, prefix)
    return out


def _has_config(directory: Path) -> bool:
    """A directory transformers can build a model from: config.json naming a model_type."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("model_type"), str)


def _is_adapter(directory: Path) -> bool:
    try:
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict)
