"""Per-episode budgets and metrics around TRL's tool-calling loop.

TRL 1.16's ``GRPOTrainer._tool_call_loop`` runs the tools of every rollout of a batch
from one dict per rollout (``_sync_tool_dicts[i]``, name -> callable), built just before
the loop. This mixin swaps each rollout's callables for the same tools bound to an
``Episode`` of that rollout (``trainers.tools``), so ``max_tool_calls`` and
``episode_tool_seconds`` hold per episode, then logs what the batch's tools did:

- ``tools/calls_per_episode``, ``tools/errors`` (calls whose result was an ``error:``
  text), ``tools/error_rate``, ``tools/latency_s`` (mean per call) and
  ``tools/<name>/latency_s``;
- ``tools/turns_per_episode``: the model's turns (assistant messages) per rollout.

TRL itself adds ``tools/call_frequency`` and ``tools/failure_frequency`` (calls it could
not make: an unknown tool name, arguments that are not an object). The tool results'
tokens are masked out of the loss by TRL (``tool_mask``); nothing here changes that.

A sampled rollout's row (``trainers.samples``) carries the episode's calls and their
results (``_episode_calls``), the same view graders read as ``sample.tool_calls``.
"""

from __future__ import annotations

from trainers.contract.graders.templates import episode_messages, tool_calls
from trainers.graders.reward import episode_sample
from trainers.tools import Episode, HttpTool


class ToolEpisodesMixin:
    """Put before ``GRPOTrainer`` in the bases; needs ``pt_pieces['tools']`` (or None)."""

    def _tool_call_loop(self, prompts, prompt_ids, completion_ids, completions, *args):
        tools = self.pt_pieces.get("tools")
        if tools is None:
            return super()._tool_call_loop(prompts, prompt_ids, completion_ids, completions, *args)
        limits, stats = tools["limits"], tools["stats"]
        stats.take()  # counts of this batch only
        episodes = [Episode(limits) for _ in completion_ids]
        self._sync_tool_dicts = [
            {
                name: tool.bound(episode) if isinstance(tool, HttpTool) else tool
                for name, tool in calls.items()
            }
            for calls, episode in zip(self._sync_tool_dicts, episodes, strict=True)
        ]
        out = super()._tool_call_loop(prompts, prompt_ids, completion_ids, completions, *args)
        self._log_tools(stats.take(), out[1], len(episodes))
        return out

    def _log_tools(self, batch, completions: list, rollouts: int) -> None:
        metrics = {
            "tools/calls_per_episode": batch.calls / max(1, rollouts),
            "tools/errors": float(batch.errors),
            "tools/error_rate": batch.errors / batch.calls if batch.calls else 0.0,
            "tools/latency_s": batch.seconds / batch.calls if batch.calls else 0.0,
            "tools/turns_per_episode": sum(
                sum(m.get("role") == "assistant" for m in c) for c in completions
            )
            / max(1, rollouts),
        }
        for name, seconds in batch.by_tool.items():
            metrics[f"tools/{name}/latency_s"] = sum(seconds) / len(seconds)
        self._pt_log(metrics)

    def _episode_calls(self, completion) -> list[dict] | None:
        """A job with tools: the episode's calls and their results, as graders see them."""
        if self.pt_pieces.get("tools") is None:
            return None
        return tool_calls(episode_messages(episode_sample(completion)))
