"""Asynchronous GRPO (``rollout_mode: "async"``) on TRL 1.16's experimental
``AsyncGRPOTrainer``: generation runs on the job's vLLM server while the trainer
trains on samples up to ``max_staleness`` policy versions old, with the PPO clip on
the importance ratio against the server's sampling log-probabilities.

- ``varlen.py``: a plain-torch stand-in for the FlashAttention-3 varlen kernel TRL's
  tree attention fetches from the Hub, installed where that kernel cannot run (CPU);
- ``transfer.py``: a weight transfer through a shared file, for servers without NCCL
  (the CPU stand-in of the tests); on GPU hosts TRL's NCCL transfer stays;
- ``method.py``: the job's settings mapped onto ``AsyncGRPOConfig`` and the run.
"""
