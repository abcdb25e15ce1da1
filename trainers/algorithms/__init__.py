"""The torch side of each method: one folder per method, each with ``method.py`` defining
``METHOD`` (a ``trainers.runner.MethodDef``), which ``trainers.registry`` resolves from the
method's contract model (``trainers/contract/methods/<name>.py``). Shared here:
``reference_trainer.py`` (posttrain's own trainers against a frozen reference) and
``tokens.py`` (a prompt's ids, truncation, padding)."""
