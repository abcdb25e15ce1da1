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


def test_every_trainers_resume_state_stays_out_of_downloads(tmp_path):
    """A download (service.tarstream) holds weights and configs only: the optimizer,
    scheduler, RNG, trainer state, GRPO's and EGPO's extra state and OREO's critic
    optimizer are resume-only (the README's promise); BCO's delta ships with the model."""
    import io
    import tarfile

    from service.tarstream import tar_stream
    from trainers.algorithms.bco.trainer import STATE_FILE as BCO
    from trainers.algorithms.egpo.trainer import STATE_FILE as EGPO
    from trainers.algorithms.grpo.trainer import STATE_FILE as GRPO
    from trainers.algorithms.oreo.value import CRITIC_STATE, HEAD_FILE, VALUE_DIR
    from trainers.contract.checkpoints import MARKER, resume_only

    kept = ["model.safetensors", "config.json", "tokenizer.json", f"{VALUE_DIR}/{HEAD_FILE}", BCO]
    dropped = [
        "optimizer.pt", "scheduler.pt", "rng_state_0.pth", "training_args.bin", MARKER,
        EGPO, GRPO, f"{VALUE_DIR}/{CRITIC_STATE}",
    ]  # fmt: skip
    for name in kept + dropped:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert not any(resume_only(name.split("/")[-1]) for name in kept)
    blob = b"".join(tar_stream(tmp_path, "ckpt"))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        names = sorted(m.name.removeprefix("ckpt/") for m in tar.getmembers())
    assert names == sorted(kept)
