"""A transformer with one scalar per token on top: the critic's value head, or a reward model's.

The backbone is the causal LM's decoder without its LM head (``AutoModel`` on the same
checkpoint); the head is a linear map of the final hidden state. Saved as the backbone's
``save_pretrained`` directory plus ``scalar_head.safetensors``; loading a directory that holds
that file restores the head, so a trained reward model reloads as it was.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

HEAD_FILE = "scalar_head.safetensors"


class ScalarHeadModel(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        # Small outputs at the start: a value or reward of order 1 / sqrt(H) before training.
        nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.backbone.config

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> ScalarHeadModel:
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(path, **kwargs)
        model = cls(backbone, backbone.config.hidden_size)
        model.head.to(dtype=next(backbone.parameters()).dtype)
        head_file = Path(path) / HEAD_FILE
        if head_file.exists():
            from safetensors.torch import load_file

            model.head.load_state_dict(load_file(str(head_file)))
        return model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return self.head(out.last_hidden_state).squeeze(-1)

    def save_head(self, directory: str, state: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save_file

        state = state if state is not None else self.head.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(Path(directory) / HEAD_FILE))
