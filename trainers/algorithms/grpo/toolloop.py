"""Per-episode budgets and metrics around TRL's tool-calling loop.

TRL 1.16's ``GRPOTrainer._tool_call_loop`` runs the tools of every rollout of a batch
from one dict per rollout (``_sync_tool_dicts[i]``, name -> callable), built just before
the loop. This mixin swaps each rollout's callables for the same tools bound to an
``Episode`` of that rollout (``trainers.tools``), so ``max_tool_calls`` and
``episode_tool_seconds`` hold per episode, then logs what the batch's tools did:

- ``tools/calls_per_episode``, ``tools/errors`` (calls whose result was an ``error:``
  text), ``tools/error_rate``, ``tools/latency_s`` (mean per call) and
  ``tools/<name>/latency_s``;
- ``tools/turns_per_episode``: the model's turns (assistant messages) per rollout;
- ``tools/episode_tokens``: an episode's length in tokens, the model's turns and the
  tool results together, and ``tools/result_tokens``: the tool results' part (TRL's
  ``completions/mean_length`` counts the model's tokens only).

TRL itself adds ``tools/call_frequency`` and ``tools/failure_frequency`` (calls it could
not make: an unknown tool name, arguments that are not an object). The tool results'
tokens are masked out of the loss by TRL (``tool_mask``); nothing here changes that.

Environments (``trainers.environments``): each rollout's instance started its
``Episode`` at reset, so the job's tools are charged to that episode too; the
environment's actions are counted with the tools (``tools/*``), and failed resets and
rewards of the batch are logged as ``env/reset_errors`` and ``env/reward_errors``. The
rendered definitions of its actions are the job's declared ones
(``_use_environment_schemas``), and its open sessions are closed when training ends.

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
        # a rollout with an environment has its episode already (started by its reset):
        # the job's tools are charged to the same budget as the environment's actions
        envs = self.environments or [None] * len(completion_ids)
        episodes = [env._pt_episode if env is not None else Episode(limits) for env in envs]
        self._sync_tool_dicts = [
            {
                name: tool.bound(episode) if isinstance(tool, HttpTool) else tool
                for name, tool in calls.items()
            }
            for calls, episode in zip(self._sync_tool_dicts, episodes, strict=True)
        ]
        out = super()._tool_call_loop(prompts, prompt_ids, completion_ids, completions, *args)
        self._log_tools(stats.take(), out[1], out[0], len(episodes))
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        env = (self.pt_pieces.get("tools") or {}).get("environment")
        if env is not None:  # this batch's failed resets and rewards
            self._pt_log(env["stats"].take())
        return out

    def _use_environment_schemas(self) -> None:
        """Render the environment's declared definitions (TRL would derive them from the
        generated methods' signatures and docstrings, which know nothing of the schemas)."""
        env = (self.pt_pieces.get("tools") or {}).get("environment")
        if env is not None:
            self._env_tools = {None: list(self._standalone_tools) + env["schemas"]}

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # close the sessions the last batch left open
            for pool in (getattr(self, "_environment_pool", None) or {}).values():
                for instance in pool:
                    instance._pt_close()

    def _log_tools(self, batch, completions: list, tool_masks: list, rollouts: int) -> None:
        """``tool_masks``: per rollout, 1 for each token the model wrote and 0 for each
        token of a tool's result, over the whole episode (TRL's ``tool_mask``)."""
        result_tokens = sum(len(m) - sum(m) for m in tool_masks)
        metrics = {
            "tools/episode_tokens": sum(len(m) for m in tool_masks) / max(1, rollouts),
            "tools/result_tokens": result_tokens / max(1, rollouts),
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
