"""How a worker places and launches a run: devices, accelerate's config, report pipe, stop.

The launches here are real (``accelerate launch`` and torch's launcher, on CPU)
of a stand-in trainer that records each rank's environment and reports one
line (``tests/workers/fixtures/record_env.py``), so they take seconds, not a
training run. The full trainer under accelerate runs in
``tests/e2e/test_multiprocess.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.errors import APIError
from service.jobchecks import check_workers
from tests.launched import REPO, read_lines
from trainers.contract.resources import Resources
from trainers.contract.spec import JobSpec
from workers import launch, placement
from workers.fleet import Advertiser, advertise, job_queue, live_workers
from workers.processes import alive
from workers.store import JobStatus

ALL = ["ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"]
FIXTURE = "tests.workers.fixtures.record_env"


# --------------------------------------------------------------------------- placement
def test_default_gpus_follow_the_worker():
    cpu = placement.place(Resources(), [], ALL)
    assert (cpu.gpus, cpu.processes, cpu.launched) == (0, 1, False)
    gpu = placement.place(Resources(), ["0"], ALL)
    assert (gpu.gpus, gpu.processes, gpu.launched) == (1, 1, False)


def test_cpu_processes_and_gpu_jobs_on_several_devices_are_launched():
    two = placement.place(Resources(gpus=0, processes=2), ["3", "5"], ALL)
    assert (two.gpus, two.processes, two.launched) == (0, 2, True)
    assert two.visible_devices == "3,5"  # a CPU job on a GPU worker still sees its devices
    # one GPU of a 2-GPU worker: launched, so the process is pinned to one device (LOCAL_RANK)
    one = placement.place(Resources(gpus=1), ["0", "1"], ALL)
    assert (one.processes, one.launched) == (1, True)
    assert placement.place(Resources(gpus=2), ["0", "1"], ALL).processes == 2


def test_too_many_gpus_or_a_missing_strategy_is_refused_naming_the_field():
    with pytest.raises(placement.PlacementError, match=r"needs 2 GPU\(s\).*CPU-only") as exc:
        placement.place(Resources(gpus=2), [], ALL)
    assert exc.value.field == "gpus"
    with pytest.raises(placement.PlacementError, match="deepspeed_zero3' is not available") as exc:
        placement.place(Resources(gpus=1, strategy="deepspeed_zero3"), ["0"], ["ddp", "fsdp2"])
    assert exc.value.field == "strategy"
    # accelerate has no FSDP or ZeRO on CPU: it would quietly run DDP instead
    with pytest.raises(placement.PlacementError, match="'fsdp2' needs GPUs") as exc:
        placement.place(Resources(strategy="fsdp2"), [], ALL)
    assert exc.value.field == "strategy"


def test_deepspeed_is_offered_only_where_it_is_installed():
    import importlib.util

    have = importlib.util.find_spec("deepspeed") is not None
    assert ("deepspeed_zero2" in placement.available_strategies()) == have
    assert {"ddp", "fsdp2"} <= set(placement.available_strategies())


def test_worker_devices_parse_the_setting():
    assert placement.worker_devices("3,5") == ["3", "5"]
    assert placement.worker_devices("") == []  # CPU-only even on a GPU host
    assert placement.parse_devices(None) is None


# --------------------------------------------------------------------------- accelerate
def _accelerate_args(config: Path):
    """What ``accelerate launch --config_file config -m x`` derives from our file."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "x"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("ddp", {"multi_gpu": True, "use_fsdp": False, "use_deepspeed": False}),
        ("fsdp2", {"use_fsdp": True, "fsdp_version": 2, "fsdp_state_dict_type": "FULL_STATE_DICT"}),
        ("deepspeed_zero2", {"use_deepspeed": True, "zero_stage": 2, "zero3_init_flag": False}),
        ("deepspeed_zero3", {"use_deepspeed": True, "zero_stage": 3, "zero3_init_flag": True}),
    ],
)
def test_each_strategy_is_accelerates_own_configuration(tmp_path, strategy, expected):
    p = placement.Placement(gpus=2, processes=2, strategy=strategy, devices=("0", "1"))
    config = launch.write_accelerate_config(p, tmp_path / "acc.json")
    args, defaults = _accelerate_args(config)  # accelerate's parser and validation
    for key, value in expected.items():
        assert getattr(args, key) == value, key
    assert args.num_processes == 2 and args.num_machines == 1
    assert args.main_process_port == 0  # accelerate picks a free port at launch
    assert args.cpu is False  # the single-process launcher would ignore num_processes
    assert defaults.distributed_type.value == launch.accelerate_config(p)["distributed_type"]


def test_one_gpu_of_several_is_a_one_rank_torchrun_launch(tmp_path):
    """accelerate accepts a 1-process MULTI_GPU config (its --multi_gpu flag would not):
    torchrun sets LOCAL_RANK, so the process takes one device instead of DataParallel."""
    p = placement.Placement(gpus=1, processes=1, strategy="ddp", devices=("0", "1"))
    args, _ = _accelerate_args(launch.write_accelerate_config(p, tmp_path / "acc.json"))
    assert args.multi_gpu is True and args.num_processes == 1


def test_command_and_environment(tmp_path):
    plan = tmp_path / "plan.json"
    one = placement.Placement(gpus=0, processes=1, strategy="ddp", devices=())
    argv = launch.training_command(one, plan, ["--report-fd", "9"], None)
    assert argv[1:] == ["-m", "trainers.run", "--plan", str(plan), "--report-fd", "9"]
    two = placement.Placement(gpus=0, processes=2, strategy="ddp", devices=("3", "5"))
    argv = launch.training_command(two, plan, ["--report-path", "p"], tmp_path / "a.json")
    config = str(tmp_path / "a.json")
    assert argv[1:5] == ["-m", "accelerate.commands.launch", "--config_file", config]
    assert argv[5:] == ["-m", "trainers.run", "--plan", str(plan), "--report-path", "p"]
    env = launch.training_env({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "X": "1"}, two, threads=1)
    assert env["CUDA_VISIBLE_DEVICES"] == "3,5" and env["OMP_NUM_THREADS"] == "1"
    assert launch.training_env({"CUDA_VISIBLE_DEVICES": "0"}, one, 2)["CUDA_VISIBLE_DEVICES"] == ""


# --------------------------------------------------------------------------- real launches
def _start(tmp_path: Path, placement: placement.Placement, sleep: float):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"out": str(tmp_path), "sleep": sleep}))
    config = None
    if placement.launched:
        config = launch.write_accelerate_config(placement, tmp_path / "acc.json")
    channel = launch.ReportChannel(placement.launched)
    env = launch.training_env(
        {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, placement, threads=1
    )
    proc = subprocess.Popen(
        launch.training_command(placement, plan, channel.args, config, module=FIXTURE),
        pass_fds=channel.pass_fds,
        cwd=REPO,
        env=env,
        stdout=open(tmp_path / "log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    channel.started()
    return proc, channel


@pytest.mark.parametrize("processes", [1, 2])
def test_every_process_sees_exactly_the_workers_devices_and_only_rank0_reports(tmp_path, processes):
    p = placement.Placement(gpus=0, processes=processes, strategy="ddp", devices=("3", "5"))
    proc, channel = _start(tmp_path, p, sleep=0)
    try:
        lines = read_lines(proc, channel, until=lambda lines: False)
        assert proc.wait(timeout=60) == 0, (tmp_path / "log").read_text()[-2000:]
    finally:
        os.close(channel.read_fd)
        channel.close()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(processes)]
    assert [r["env"]["CUDA_VISIBLE_DEVICES"] for r in ranks] == ["3,5"] * processes
    assert [m["message"] for m in lines] == ["hello from rank 0"]  # rank 1 kept its line


def test_stop_run_ends_every_rank_of_a_launched_run(tmp_path):
    p = placement.Placement(gpus=0, processes=2, strategy="ddp", devices=())
    proc, channel = _start(tmp_path, p, sleep=600)
    try:
        read_lines(proc, channel, until=lambda lines: len(lines) >= 1)
        deadline = time.monotonic() + 60
        while not (tmp_path / "rank1.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [json.loads((tmp_path / f"rank{r}.json").read_text())["pid"] for r in (0, 1)]
        assert set(pids) <= set(launch.descendants(proc.pid))
        # each rank leads a session of its own: a signal to the launcher's group misses it
        assert all(os.getsid(pid) == pid for pid in pids)
        launch.stop_run(proc, grace=5)
        assert proc.poll() is not None
        assert not any(alive(pid) for pid in pids)
    finally:
        os.close(channel.read_fd)
        channel.close()
        if proc.poll() is None:
            os.killpg(proc.pid, 9)


# --------------------------------------------------------------------------- fleet
def test_workers_advertise_per_queue_and_expire_in_redis_time(redis_client):
    advertise(redis_client, "t:", "gpu.a100", "w1@h", ["0", "1"], ["ddp"], ttl=30)
    advertise(redis_client, "t:", "gpu.a100.x", "w2@h", [], ["ddp"], ttl=30)
    advertise(redis_client, "t:", "gpu.a100", "w3@h", ["2"], ["ddp"], ttl=0.2)
    assert {w["name"] for w in live_workers(redis_client, "t:", "gpu.a100")} == {"w1@h", "w3@h"}
    time.sleep(0.4)
    (w,) = live_workers(redis_client, "t:", "gpu.a100")
    assert (w["name"], w["gpus"]) == ("w1@h", ["0", "1"])
    assert redis_client.hkeys("t:workers:gpu.a100") == ["w1@h"]  # the expired one is pruned
    adv = Advertiser(redis_client, "t:", "cpu", "w4@h", [], ["ddp"], interval=0.1, ttl=5)
    adv.start()
    deadline = time.monotonic() + 5
    while not live_workers(redis_client, "t:", "cpu") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_workers(redis_client, "t:", "cpu")[0]["name"] == "w4@h"
    adv.stop()
    adv.join(5)
    assert live_workers(redis_client, "t:", "cpu") == []  # withdrawn on shutdown


def _spec(**resources) -> JobSpec:
    return JobSpec.model_validate(
        {"model": "m", "training_file": "file-1", "method": {"type": "sft"}, "resources": resources}
    )


def test_job_creation_waits_for_a_worker_or_refuses_one_that_cannot_fit(store):
    note = check_workers(_spec(gpus=2), store, "gpu.h100", 3600)
    assert note == (
        "No worker is live on queue 'gpu.h100' yet; the job waits for a worker "
        "(2 GPU(s), strategy ddp) to join the queue, and fails if none serves it within "
        "3600 s. It does not count towards the tenant's active jobs while it waits"
    )
    advertise(store.r, store.p, "gpu.h100", "w1@h", ["0"], ["ddp", "fsdp2"], ttl=30)
    with pytest.raises(APIError) as exc:
        check_workers(_spec(gpus=2), store, "gpu.h100", 3600)
    assert exc.value.status == 400 and exc.value.param == "resources.gpus"
    assert "w1@h: the job needs 2 GPU(s), but this worker's devices are 1 (0)" in str(
        exc.value.message
    )
    with pytest.raises(APIError) as exc:
        check_workers(_spec(gpus=1, strategy="deepspeed_zero2"), store, "gpu.h100", 3600)
    assert exc.value.param == "resources.strategy"
    advertise(store.r, store.p, "gpu.h100", "w2@h", ["0", "1"], ["ddp"], ttl=30)
    assert check_workers(_spec(gpus=2), store, "gpu.h100", 3600) is None  # w2 fits
    assert check_workers(_spec(), store, "gpu.h100", 3600) is None


def test_a_job_is_requeued_on_its_own_queue(store):
    store.create("ftjob-a", _spec(queue="gpu.a").model_dump_json(), JobStatus.queued)
    store.create("ftjob-b", _spec().model_dump_json(), JobStatus.queued)
    assert job_queue(store, "ftjob-a", "default") == "gpu.a"
    assert job_queue(store, "ftjob-b", "default") == "default"
    assert job_queue(store, "ftjob-missing", "default") == "default"


def test_a_gpu_worker_refuses_to_run_jobs_concurrently_on_its_devices():
    env = {**os.environ, "POSTTRAIN_WORKER_GPUS": "3,5", "POSTTRAIN_CONCURRENCY": "2"}
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "POSTTRAIN_CONCURRENCY=2 on a worker with GPUs" in out.stderr
