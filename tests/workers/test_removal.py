"""Removing a job's or an upload's files from the data volume (``remove_tree``): a failed
removal is retried, each failure is logged, and one that still fails names what stayed
(the API then answers 500 ``deletion_failed``, never ``deleted: true``)."""

from __future__ import annotations

import logging

import pytest

from workers.filestore import RemovalFailed, remove_tree

LOGGER = "posttrain.files"


def _job_dir(root):
    job = root / "jobs" / "ftjob-x"
    (job / "output" / "checkpoint-1").mkdir(parents=True)
    (job / "train.log").write_text("log")
    weights = job / "output" / "checkpoint-1" / "model.safetensors"
    weights.write_bytes(b"weights")
    return job, weights


def test_a_removal_that_keeps_failing_is_logged_and_names_what_stayed(tmp_path, frozen, caplog):
    job, weights = _job_dir(tmp_path)
    frozen(weights)
    with caplog.at_level(logging.INFO, logger=LOGGER), pytest.raises(RemovalFailed) as err:
        remove_tree(job, tmp_path, "the files of job ftjob-x", attempts=3)
    stayed = "jobs/ftjob-x/output/checkpoint-1/model.safetensors"
    assert [path for path, _reason in err.value.failures] == [stayed]
    assert stayed in str(err.value) and "the files of job ftjob-x" in str(err.value)
    # what could go, went; what could not is still there
    assert weights.exists() and not (job / "train.log").exists()
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert [r.levelno for r in retries] == [logging.INFO, logging.INFO]
    final = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(final) == 1 and "after 3 attempts" in final[0].getMessage()
    assert stayed in final[0].getMessage()


class _ThawOnRetry(logging.Handler):
    """Releases the frozen path when the first failed attempt is logged: the failure was
    real, and only the retry can succeed."""

    def __init__(self, thaw):
        super().__init__(logging.INFO)
        self.thaw, self.retries = thaw, 0

    def emit(self, record):
        if "retrying" in record.getMessage():
            self.retries += 1
            self.thaw()


def test_a_removal_that_fails_once_succeeds_on_its_retry(tmp_path, frozen, caplog):
    job, weights = _job_dir(tmp_path)
    handler = _ThawOnRetry(frozen(weights))
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            remove_tree(job, tmp_path, "the files of job ftjob-x", attempts=3)
    finally:
        logger.removeHandler(handler)
    assert handler.retries == 1 and not job.exists()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
