"""OREO's value model V_φ: a copy of the base model's backbone + a zero-initialised ValueHead.

On disk (``checkpoint-N/value_model/``): the backbone as ``save_pretrained`` writes it
(loadable with ``AutoModel.from_pretrained``), ``value_head.safetensors`` (the head's
``linear.weight`` [1, H]) and, in training checkpoints, ``critic_state.pt`` (the critic's
optimizer and scheduler). ``ValueModel.load`` rebuilds it for the search script.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainers.core.oreo import ValueHead

VALUE_DIR = "value_model"
HEAD_FILE = "value_head.safetensors"
CRITIC_STATE = "critic_state.pt"


class ValueModel(nn.Module):
    """V at every position: ``forward(input_ids, attention_mask) -> [B, L]``."""

    def __init__(self, backbone: nn.Module, head: ValueHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    @classmethod
    def from_causal_lm(cls, lm: nn.Module) -> ValueModel:
        """The LM's backbone (its head is dropped) + a new zero head in the backbone's dtype."""
        backbone = getattr(lm, lm.base_model_prefix)
        hidden = lm.config.get_text_config().hidden_size
        dtype = next(backbone.parameters()).dtype
        return cls(backbone, ValueHead(hidden, dtype=dtype))

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype | None = None) -> ValueModel:
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(str(folder), dtype=dtype)
        hidden = backbone.config.get_text_config().hidden_size
        model = cls(backbone, ValueHead(hidden, dtype=next(backbone.parameters()).dtype))
        model.head.load_state_dict(load_file(str(Path(folder) / HEAD_FILE)))
        return model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self.head(out.last_hidden_state)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(folder), safe_serialization=True)
        weights = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        save_file(weights, str(folder / HEAD_FILE))

    def load_weights(self, folder: str | Path) -> None:
        """Load a saved value model's weights into this one (in place: optimizers stay valid)."""
        loaded = ValueModel.load(folder)
        self.backbone.load_state_dict(loaded.backbone.state_dict())
        self.head.load_state_dict(loaded.head.state_dict())
