"""A transformer with one scalar per token on top: the critic's value head, or a reward model's.

The backbone is the causal LM's decoder without its LM head (``AutoModel`` on the same
checkpoint); the head is a linear map of the final hidden state. Two ways to save one:

- a reward model (no bias: a Bradley–Terry loss depends only on score differences, so a bias
  would never get a gradient) is saved as Hugging Face's sequence classifier with one label
  (``model.*`` backbone weights plus ``score.weight``), so
  ``AutoModelForSequenceClassification.from_pretrained(path)`` loads it as it was trained;
- a head with a bias (a critic's value head) is saved as the backbone's directory plus
  ``scalar_head.safetensors``.

``ScalarHeadModel.from_pretrained`` reads both, and a plain causal LM (a new head).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

HEAD_FILE = "scalar_head.safetensors"
SCORE_KEY = "score.weight"  # the sequence classifier's head (transformers' *ForSequenceClassification)


class ScalarHeadModel(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_size: int, bias: bool = True):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1, bias=bias)
        # Small outputs at the start: a value or reward of order 1 / sqrt(H) before training.
        nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1))
        if bias:
            nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.backbone.config

    @classmethod
    def from_pretrained(cls, path: str, bias: bool = True, **kwargs) -> ScalarHeadModel:
        """The backbone of ``path`` and its trained head when it has one (a ``HEAD_FILE``, or a
        one-label sequence classifier's ``score.weight``); otherwise a new head, with ``bias``."""
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(path, **kwargs)
        head_file, score = Path(path) / HEAD_FILE, _score_weight(Path(path))
        if head_file.exists():
            from safetensors.torch import load_file

            state = load_file(str(head_file))
            model = cls(backbone, backbone.config.hidden_size, bias="bias" in state)
            model.head.load_state_dict(state)
        elif score is not None:
            # A critic started from a reward model keeps its bias (at 0) if it asks for one.
            model = cls(backbone, backbone.config.hidden_size, bias=bias)
            model.head.weight.data.copy_(score)
        else:
            model = cls(backbone, backbone.config.hidden_size, bias=bias)
        model.head.to(dtype=next(backbone.parameters()).dtype)
        return model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return self.head(out.last_hidden_state).squeeze(-1)

    def save_head(self, directory: str, state: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save_file

        state = state if state is not None else self.head.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(Path(directory) / HEAD_FILE))


def save_sequence_classifier(directory: str, config, backbone_state: dict[str, torch.Tensor], head_weight: torch.Tensor) -> None:
    """A bias-free scalar head model in transformers' one-label sequence-classifier layout:
    ``AutoModelForSequenceClassification.from_pretrained(directory)`` loads it, and
    ``AutoModel`` loads its backbone. Written by a model built on the meta device (no second
    copy of the weights) from the given state."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    config.num_labels, config.architectures = 1, None
    with torch.device("meta"):
        classifier = AutoModelForSequenceClassification.from_config(config)
    prefix = classifier.base_model_prefix
    state = {f"{prefix}.{k}": v for k, v in backbone_state.items()} | {SCORE_KEY: head_weight.reshape(1, -1)}
    classifier.save_pretrained(directory, state_dict=state)


def _score_weight(path: Path) -> torch.Tensor | None:
    """``score.weight`` of a one-label sequence classifier saved at ``path`` (sharded or not)."""
    config = path / "config.json"
    if not config.exists():
        return None
    meta = json.loads(config.read_text())
    if not any(a.endswith("ForSequenceClassification") for a in meta.get("architectures") or []):
        return None
    if len(meta.get("id2label") or {"0": ""}) != 1:
        raise ValueError(f"{path}: a sequence classifier with {len(meta['id2label'])} labels is not a scalar reward model")
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][SCORE_KEY] if index.exists() else "model.safetensors"
    with safe_open(str(path / file), "pt") as f:
        return f.get_tensor(SCORE_KEY)[0]
