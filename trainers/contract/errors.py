"""The one error a user can act on, shared by the API's creation checks and training.

A ``JobError`` names what is wrong in the user's own terms: a ``code`` (OpenAI's
error code style), a ``message`` that says how to fix it, and the ``param`` (the
request field or file) it is about. The API answers it with a 400 when a method's
creation-time hook raises it (``trainers/contract/methods``); a training process
reports it as the job's error and exits without a retry (``trainers/run.py``).
"""

from __future__ import annotations


class JobError(Exception):
    """A failure the user can act on (bad model name, unusable data): no retry."""

    def __init__(self, code: str, message: str, param: str | None = None):
        self.code, self.message, self.param = code, message, param
        super().__init__(message)
