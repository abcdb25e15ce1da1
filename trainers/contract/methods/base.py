"""What a method is to the API and the workers: one member of the job spec's method union.

A method's contract module (``trainers/contract/methods/<name>.py``) defines its
hyperparameters, its request block (``method.<type>``: the hyperparameters, plus
graders, a variant or a judge where the method has them) and a ``MethodModel``
subclass, the member of ``JobSpec.method`` that names the block. The model class
carries everything else the torch-free layers need to know about the method:

- ``accepted_formats``: the row formats it trains on (``trainers.contract.rows``);
- ``algorithm``: the module of its torch side (``trainers/algorithms/<name>/``),
  imported only by the training process (``trainers.registry``); ``job_algorithm()``
  names another for a job whose settings need one;
- ``aliases``: other spellings of its ``type`` a request may use;
- ``records_samples``: whether its trainer reports samples of its scored completions;
- hooks the API calls at job creation without knowing which method it holds:
  ``check_job`` (pure checks against the job's resources, run while the spec
  validates),
  ``check_request`` (checks that read the file system, such as a judge's model
  directory), ``item_fields`` (dataset fields its graders or judge read) and
  ``check_rows`` (a scan of the training file's rows, when ``scans_rows()``).

Each hook raises with a message that says how to fix the request; ``check_job``
raises ``ValueError`` (pydantic reports it), the others ``JobError`` naming the field.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any, ClassVar

from trainers.contract.hparams import CommonHyperparameters, Strict
from trainers.contract.resources import Resources
from trainers.contract.rows import RowFormat


class MethodModel(Strict):
    """A member of ``JobSpec.method``: ``type`` plus a block field named like the type."""

    accepted_formats: ClassVar[tuple[RowFormat, ...]]
    algorithm: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    # Whether its trainer samples completions and scores them while it trains, and reports
    # a sample of them (the job's ``samples`` endpoint; ``trainers.samples``).
    records_samples: ClassVar[bool] = False

    type: str

    @classmethod
    def type_name(cls) -> str:
        """The ``type`` this member is selected by (its ``Literal``)."""
        return cls.model_fields["type"].annotation.__args__[0]

    def job_algorithm(self) -> str:
        """The module of the torch side that trains this job: ``algorithm``, unless the
        job's settings pick another (GRPO's ``rollout_mode: "async"``)."""
        return self.algorithm

    @property
    def block(self) -> Any:
        """The request block under ``method.<type>``."""
        return getattr(self, self.type)

    @property
    def hyperparameters(self) -> CommonHyperparameters:
        return self.block.hyperparameters

    @property
    def param(self) -> str:
        """The request path of the hyperparameters, as error messages name fields."""
        return f"method.{self.type}.hyperparameters"

    # ---- creation-time hooks (defaults: nothing to check)
    def check_job(self, resources: Resources) -> None:
        """Pure checks against the job's resources (how it is placed and launched)."""

    def check_request(self, *, validation_file: str | None, judges: Collection[str] = ()) -> None:
        """Checks that read the outside world, run by the API before anything is stored
        (the job's validation file, and the models the server's judge endpoints serve)."""

    # ---- run-time hooks
    def divergence_hint(self) -> tuple[str, str]:
        """(advice, field) for a run that stopped at a non-finite loss: what most likely
        made it diverge under these settings. Default: the learning rate."""
        return (
            "Lower the learning rate (or raise warmup), or look for extreme values in the "
            "training data",
            f"{self.param}.learning_rate",
        )

    def item_fields(self) -> set[str]:
        """Dataset fields (``{{item.x}}``) this method's graders or judge read."""
        return set()

    def scans_rows(self) -> bool:
        """Whether the API must read the training file's rows through ``check_rows``."""
        return False

    def check_rows(self, rows: Iterable[tuple[int, Any]], param: str) -> None:
        """When ``scans_rows()``: the (line, row) pairs of a file that fits the method."""
