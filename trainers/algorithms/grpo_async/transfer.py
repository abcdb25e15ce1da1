"""Weight sync to a rollout server through a shared file, for servers without NCCL.

TRL's ``AsyncGRPOTrainer`` streams the policy into its vLLM server over NCCL
(``WeightTransferClient``), which needs vLLM importable in the training process and a
CUDA device on both ends. ``FileWeightTransfer`` implements the same
``WeightTransferProtocol`` and drives the same server routes in the same order
(``/pause``, ``/start_weight_update``, ``/update_weights``, ``/finish_weight_update``,
``/resume``), but the tensors travel as one safetensors file the server reads, named by
``update_info["path"]`` next to the names, dtypes and shapes TRL sends. It is what the
trainer uses when vLLM cannot be imported (CPU hosts, where only the stand-in server
of the tests runs); a real vLLM server has no file backend and answers it with an
error, so nothing is half-synced silently.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import requests
import torch
from safetensors.torch import save_file


class FileWeightTransfer:
    """``WeightTransferProtocol`` over a file in ``directory`` (which the server must be
    able to read) and the server's HTTP weight-update routes."""

    def __init__(self, server_url: str, directory: str | Path, timeout: float = 300.0):
        self.url = server_url.rstrip("/")
        self.directory = Path(directory)
        self.timeout = timeout
        self.version = 0

    def _post(self, route: str, **kwargs) -> None:
        response = requests.post(f"{self.url}{route}", timeout=self.timeout, **kwargs)
        if response.status_code != 200:
            raise RuntimeError(
                f"weight sync to {self.url}: POST {route} answered {response.status_code}: "
                f"{response.text[:500]}"
            )

    def init_weight_transfer(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def pause(self) -> None:
        self._post("/pause", params={"mode": "keep"})

    def send_weights(self, iterator: Iterator[tuple[str, torch.Tensor]]) -> None:
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in iterator}
        self.version += 1
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        path = self.directory / f"policy-v{self.version}.safetensors"
        save_file(tensors, tmp)
        os.replace(tmp, path)  # the server never sees a half-written file
        info = {
            "names": list(tensors),
            "dtype_names": [str(t.dtype).removeprefix("torch.") for t in tensors.values()],
            "shapes": [list(t.shape) for t in tensors.values()],
            "path": str(path.resolve()),
        }
        try:
            self._post("/start_weight_update", json={"is_checkpoint_format": True})
            self._post("/update_weights", json={"update_info": info})
            self._post("/finish_weight_update")
        finally:
            path.unlink(missing_ok=True)

    def resume(self) -> None:
        self._post("/resume")

    def destroy(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
