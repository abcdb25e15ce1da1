"""Read back what a job's trackers wrote, each with its own library.

- W&B: an offline run's transaction log (``run-{id}.wandb``) is a LevelDB-style log
  (32 KiB blocks, records of a 7-byte header ``crc32, length, kind`` cut across blocks)
  after the 7-byte W&B header; each record is a ``wandb.proto.wandb_internal_pb2.Record``
  (wandb 0.31 ships no Python reader of its own, so the framing is read here and the
  records with wandb's protobuf).
- TensorBoard: ``EventAccumulator`` over the event files.
- MLflow: ``MlflowClient`` on the file store.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

_BLOCK = 32768
_HEADER = 7
_FULL, _LAST = 1, 4


def wandb_records(path: Path):
    """Every record of one ``.wandb`` transaction log, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, part = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        part += data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            yield record


def wandb_runs(root: Path) -> list[Path]:
    """The offline run directories under a W&B tracker directory, oldest first."""
    return sorted(p for p in (Path(root) / "wandb").glob("offline-run-*") if not p.is_symlink())


def wandb_history(run_dir: Path) -> tuple[dict, list[dict]]:
    """(the run record's fields, every history row as {key: value}) of one offline run."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    run, rows = {}, []
    for rec in wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run = {
                "id": r.run_id,
                "project": r.project,
                "entity": r.entity,
                "name": r.display_name,
                "tags": list(r.tags),
            }
        elif kind == "history":
            rows.append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
    return run, rows


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) points as TensorBoard shows them: the events a
    resumed writer purged are gone."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_texts(logdir: Path, tag: str) -> dict[int, str]:
    """A text summary's {step: text}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return {
        e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")
    }


def mlflow_client(store: Path):
    """An ``MlflowClient`` on a job's file store (MLflow 3 needs its opt-in to read one)."""
    from mlflow import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return MlflowClient(tracking_uri=Path(store).resolve().as_uri())


def mlflow_history(client, run_id: str) -> dict[str, dict[int, float]]:
    """Every metric of a run as {key: {step: value}} (the last value of a step logged twice)."""
    run = client.get_run(run_id)
    return {
        key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
        for key in run.data.metrics
    }
