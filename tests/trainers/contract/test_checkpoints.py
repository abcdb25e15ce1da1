"""A retry resumes from the newest checkpoint whose save finished, never a torn one."""

from __future__ import annotations

from trainers.contract.checkpoints import is_complete, mark_complete, resumable_checkpoint


def _ckpt(root, step, complete):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x" * 16)
    if complete:
        mark_complete(d)
    return d


def test_torn_checkpoint_is_skipped_and_removed(tmp_path):
    ok10 = _ckpt(tmp_path, 10, True)
    ok20 = _ckpt(tmp_path, 20, True)
    torn = _ckpt(tmp_path, 30, False)  # the process died inside this save
    (tmp_path / "runs").mkdir()  # unrelated folders are left alone
    assert resumable_checkpoint(tmp_path) == ok20
    assert not torn.exists() and ok10.exists() and (tmp_path / "runs").exists()


def test_numeric_not_lexical_order(tmp_path):
    _ckpt(tmp_path, 9, True)
    newest = _ckpt(tmp_path, 100, True)
    assert resumable_checkpoint(tmp_path) == newest and is_complete(newest)


def test_nothing_to_resume(tmp_path):
    assert resumable_checkpoint(tmp_path / "missing") is None
    _ckpt(tmp_path, 5, False)
    assert resumable_checkpoint(tmp_path) is None
    assert not (tmp_path / "checkpoint-5").exists()
