"""One rank of a DeepSpeed ZeRO learner group.

A plain class: it runs as a Ray actor (``ray.remote(Learner)`` where it is launched) or
directly in a test. Ranks of one model form one ``torch.distributed`` group: gloo on CPU,
NCCL on GPU; nothing else here depends on the device.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Literal

import torch
from pydantic import Field

from tooltune.config import StrictModel
from tooltune.weights import tensor_checksum


class LoraConfig(StrictModel):
    r: int = Field(8, ge=1)
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class LearnerConfig(StrictModel):
    """What one learner group trains and how."""

    # A path; jobs that build or resolve the model fill it in before the learners start.
    model: str = ""
    zero_stage: Literal[0, 1, 2, 3] = 2
    dtype: Literal["float32", "bfloat16"] = "float32"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    micro_batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    lora: LoraConfig | None = None
    gradient_checkpointing: bool = False
    # None: transformers' default (sdpa where torch has it). Packed rows are masked per document
    # under every choice; "flash_attention_2"/"_3" (needs the flash-attn package) run them as
    # varlen kernels instead of materialising a block-diagonal mask.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] | None = None
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    total_steps: int | None = Field(None, ge=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    seed: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Learner:
    """One rank: a model under a DeepSpeed engine, with the collective set-up done for it."""

    def __init__(self, cfg: LearnerConfig | dict, rank: int, world_size: int):
        self.cfg = cfg if isinstance(cfg, LearnerConfig) else LearnerConfig.model_validate(cfg)
        if not self.cfg.model:
            raise ValueError("LearnerConfig.model is empty: no model path to train")
        self.rank, self.world_size = rank, world_size
        self.engine = None

    # ---- group set-up -------------------------------------------------------------------
    def master_address(self) -> tuple[str, int]:
        """Rank 0 is asked for an address and a free port the others then join."""
        return socket.gethostbyname(socket.gethostname()), free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group, build the model and its DeepSpeed engine."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
            WORLD_SIZE=str(self.world_size),
        )
        accel = get_accelerator()
        if accel.device_name() == "cuda":
            accel.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
        torch.manual_seed(self.cfg.seed)
        model = self._build_model()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, betas=self.cfg.betas, weight_decay=self.cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(self.cfg, step))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.deepspeed_config()
        )

    def deepspeed_config(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "train_micro_batch_size_per_gpu": c.micro_batch_size,
            "gradient_accumulation_steps": c.grad_accum_steps,
            "train_batch_size": c.micro_batch_size * c.grad_accum_steps * self.world_size,
            "gradient_clipping": c.grad_clip,
            "zero_optimization": {"stage": c.zero_stage},
            # A client torch optimizer avoids DeepSpeed's JIT-built Adam kernels (minutes on CPU).
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": c.dtype == "bfloat16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def _build_model(self):
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, self.cfg.dtype)
        if self.cfg.zero_stage == 3:
            # Must exist before from_pretrained so the weights are partitioned as they load.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.deepspeed_config())
        attn = self.cfg.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(self.cfg.model, dtype=dtype, attn_implementation=attn)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if self.cfg.lora is not None:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            lc = self.cfg.lora
            model = get_peft_model(
                model,
                PeftLoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules, task_type="CAUSAL_LM"),
            )
        return model

    # ---- compute ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.engine.device

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x_t | x_<t) for t >= 1, shape [batch, seq-1]."""
        input_ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        logits = self.engine(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)

    @torch.no_grad()
    def eval_logprobs(self, input_ids: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs of unpadded sequences, one forward each (used to check syncs)."""
        self.engine.eval()
        out = [self.token_logprobs(torch.tensor([ids])).squeeze(0).tolist() for ids in input_ids]
        self.engine.train()
        return out

    def step(self, loss: torch.Tensor) -> None:
        """Backward and (at a gradient-accumulation boundary) an optimizer step."""
        self.engine.backward(loss)
        self.engine.step()

    def masked_nll(self, batch: dict[str, list[list[int]]]) -> tuple[torch.Tensor, int]:
        """Summed next-token NLL over the tokens whose ``loss_mask`` is 1, and their count."""
        nll, mask = token_nll(self.engine, batch, self.device, flatten=uses_flash_attention(self.engine.module))
        if mask.numel() == 0:
            # Nothing to learn from, but every rank must still run backward on a graph.
            return self.engine.module.get_input_embeddings().weight.sum() * 0.0, 0
        return (nll * mask).sum(), int(mask.sum().item())

    def train_step(self, micro_batches: list[dict[str, list[list[int]]]], global_tokens: int) -> dict[str, float]:
        """One optimizer step over this rank's ``grad_accum_steps`` micro-batches.

        The objective is the mean NLL over all ``global_tokens`` loss tokens of the step, on all
        ranks: DeepSpeed averages gradients over ranks and divides by the accumulation steps, so
        each micro-batch's sum is scaled by ``world_size * accum / global_tokens``. That makes N
        ranks with batch B follow the same curve as one rank with batch N*B.
        """
        if len(micro_batches) != self.cfg.grad_accum_steps:
            raise ValueError(f"rank {self.rank}: got {len(micro_batches)} micro-batches, expected {self.cfg.grad_accum_steps}")
        scale = self.world_size * self.cfg.grad_accum_steps / max(1, global_tokens)
        nll_total, tokens = 0.0, 0
        for mb in micro_batches:
            nll, n = self.masked_nll(mb)
            self.step(nll * scale)
            nll_total, tokens = nll_total + nll.item(), tokens + n
        return {"nll_sum": nll_total, "tokens": tokens, "lr": self.scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def eval_nll(self, micro_batches: list[dict[str, list[list[int]]]]) -> dict[str, float]:
        self.engine.eval()
        parts = [self.masked_nll(mb) for mb in micro_batches]
        self.engine.train()
        return {"nll_sum": sum(p[0].item() for p in parts), "tokens": sum(p[1] for p in parts)}

    @torch.no_grad()
    def evaluate_tools(self, tasks: list[Any], tokenizer: Any, loop: dict[str, Any], world: dict[str, Any] | None = None) -> dict[str, Any]:
        """Tool-world metrics of this rank's model as it is now: the tool loop over ``generate``.

        For evaluation during training: no checkpoint, no engine start. Under ZeRO 0-2 every
        rank holds the whole model, so one rank runs it while the others wait. The RNG states
        are left as they were (an evaluation must not change the training that follows).
        """
        from rollout.agent_loop import LoopConfig, run_episodes
        from rollout.hf_worker import HFRolloutWorker
        from tooltune.metrics import compute_metrics
        from tooltune.world import WorldConfig, world_registry

        if self.cfg.zero_stage == 3:
            raise ValueError("evaluate_tools needs whole weights on one rank: ZeRO-3 shards them (use the final evaluation)")
        module = self.engine.module
        registry = world_registry(WorldConfig.model_validate(world) if world else None)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            module.eval()
            try:
                worker = HFRolloutWorker.around(module, tokenizer)
                runs = run_episodes(tasks, worker, tokenizer, LoopConfig.model_validate(loop), registry)
            finally:
                module.train()
        return compute_metrics(tasks, [run.episode for run in runs])

    # ---- checkpoints --------------------------------------------------------------------
    def save_state(self, directory: str, client_state: dict[str, Any]) -> None:
        """Trainer state for exact resume: DeepSpeed's model/optimizer/scheduler shards, this
        rank's RNG states, and the caller's ``client_state`` (step, data position). Collective."""
        import random

        import numpy as np

        self.engine.save_checkpoint(directory, tag="deepspeed", client_state=client_state)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        torch.save(rng, os.path.join(directory, f"rng_rank{self.rank}.pt"))

    def load_state(self, directory: str) -> dict[str, Any]:
        import random

        import numpy as np

        _, client_state = self.engine.load_checkpoint(directory, tag="deepspeed")
        rng = torch.load(os.path.join(directory, f"rng_rank{self.rank}.pt"), weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        return client_state or {}

    def save_pretrained(self, directory: str, merged: bool = True) -> None:
        """Hugging Face weights: full (LoRA merged), or the adapter alone. Collective; rank 0 writes."""
        import deepspeed

        module = self.engine.module
        if self.cfg.lora is not None and not merged:
            with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.zero_stage == 3):
                if self.rank == 0:
                    module.save_pretrained(directory)
            return
        state = self.full_state_dict()
        if self.rank == 0:
            base = module.get_base_model() if self.cfg.lora is not None else module
            base.save_pretrained(directory, state_dict=state)

    # ---- weights out --------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model weights in checkpoint names (LoRA merged), gathered on every rank.

        Every rank must call this (under ZeRO-3 gathering is a collective).
        """
        import deepspeed

        module = self.engine.module
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.zero_stage == 3):
            if self.cfg.lora is not None:
                state = _merged_lora_state(module)
            else:
                state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        # vLLM expects checkpoint names: drop tied duplicates it does not load.
        if getattr(module.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return state

    def weights_blob(self) -> tuple[bytes, str]:
        """Serialized full weights and their checksum: what rollout workers load."""
        from safetensors.torch import save

        state = self.full_state_dict()
        return save(state), tensor_checksum(state)


def uses_flash_attention(model) -> bool:
    """Whether ``model`` (a transformers model, or a PEFT wrapper of one) runs flash attention."""
    return "flash" in (getattr(model.config, "_attn_implementation", None) or "")


def model_inputs(batch: dict[str, list[list[int]]], flatten: bool = False) -> tuple[dict[str, Any], torch.Tensor]:
    """The model's keyword arguments for a collated micro-batch, and which targets carry loss.

    Targets are ``input_ids[:, 1:]``; the mask returned is their ``loss_mask``, shape [rows, seq-1].
    Unpacked batches pass the padding mask. Packed batches (with ``position_ids``) pass the
    position ids, no attention mask and no cache: transformers only builds its per-document
    causal mask from position-id restarts when ``attention_mask`` and ``past_key_values`` are
    None (``use_cache`` defaults to True and would create an empty cache), and right pads need no
    mask (no real token attends forward; collate gives them a document of their own).
    ``flatten`` lays the rows end to end in one row: flash attention finds documents from position
    ids only in a batch of one (varlen over the restarts) and otherwise lets them attend to each
    other. A row's last token then precedes the next row's first, and is kept out of the loss.
    """
    ids = torch.tensor(batch["input_ids"])
    targets = torch.tensor(batch["loss_mask"])[:, 1:]
    if "position_ids" not in batch:
        attn = torch.tensor(batch["attention_mask"]) if "attention_mask" in batch else None
        return {"input_ids": ids, "attention_mask": attn}, targets
    positions = torch.tensor(batch["position_ids"])
    if flatten:
        targets = torch.nn.functional.pad(targets, (0, 1)).reshape(1, -1)[:, :-1]
        ids, positions = ids.reshape(1, -1), positions.reshape(1, -1)
    return {"input_ids": ids, "position_ids": positions, "use_cache": False}, targets


def token_nll(
    model, batch: dict[str, list[list[int]]], device: torch.device | str = "cpu", flatten: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL at the target columns some row needs, and the loss mask there ([rows, kept]).

    Logits are computed only at those columns (``logits_to_keep``): with a large vocabulary and
    loss on assistant turns only, the LM head is otherwise most of the cost. ``model`` is anything
    called like a transformers causal LM (a DeepSpeed engine, or the model itself in tests).
    """
    inputs, mask = model_inputs(batch, flatten)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    mask = mask.to(device)
    keep = mask.any(dim=0).nonzero().squeeze(-1)
    if keep.numel() == 0:
        return torch.zeros(mask.shape[0], 0, device=device), mask[:, keep]
    logits = model(**inputs, logits_to_keep=keep).logits.float()
    targets = inputs["input_ids"][:, keep + 1]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return -logp, mask[:, keep].to(logp.dtype)


def lr_factor(cfg: LearnerConfig, step: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step``: linear warm-up, then decay."""
    import math

    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or cfg.total_steps is None:
        return 1.0
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    decay = 1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def _merged_lora_state(peft_model) -> dict[str, torch.Tensor]:
    """Base weights with W + (alpha/r)·BA folded in, under the base model's names, unmerged after."""
    peft_model.merge_adapter()
    try:
        base = peft_model.get_base_model()
        state = {}
        for k, v in base.state_dict().items():
            if "lora_" in k:
                continue
            state[k.replace(".base_layer.", ".")] = v.detach().cpu().clone()
        return state
    finally:
        peft_model.unmerge_adapter()
