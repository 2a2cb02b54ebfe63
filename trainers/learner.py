"""One rank of a learner group: a model, its role, and the collective set-up done for it.

One class serves every stage. The loss is a pure function passed in (``trainers.losses``), the
batch a dict of columns (token ids and whatever the loss reads: masks, advantages, old and
reference log-probs, returns, teacher targets), cut into micro-batches and padded here. The
head is a causal LM, or one scalar per token (a critic's values, a reward model's score at the
last token). A frozen role (reference policy, teacher, reward model) runs forward only: no
optimizer, no gradients; under ZeRO-3 its parameters stay partitioned for inference too.

A plain class: it runs as a Ray actor (``ray.remote(Learner)`` where it is launched) or directly
in a test. Ranks of one model form one ``torch.distributed`` group: gloo on CPU, NCCL on GPU;
nothing else here depends on the device.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field

from tooltune.config import StrictModel
from trainers.forward import Columns, Forward, max_over_ranks, num_rows, pad_columns, pad_to_common_shape, split_rows, unpad

Loss = Callable[..., tuple[torch.Tensor, dict[str, float]]]
"""``loss(fwd, batch, **kwargs) -> (summed loss, summed stats)``: see ``trainers.losses``."""


class LoraConfig(StrictModel):
    r: int = Field(8, ge=1)
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class LearnerConfig(StrictModel):
    """What one learner group holds, and (when trainable) how it trains."""

    # A path; jobs that build or resolve the model fill it in before the learners start.
    model: str = ""
    # "lm": a causal LM (policy, reference, teacher); "value"/"reward": one scalar per token.
    head: Literal["lm", "value", "reward"] = "lm"
    # False: forward only (no optimizer, no gradients, inference mode).
    trainable: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 2
    dtype: Literal["float32", "bfloat16"] = "float32"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    micro_batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    # Sequence positions per chunk when log-probs and entropy are computed (bounds the
    # [chunk, vocab] fp32 tensor that is alive at once).
    logprob_chunk_tokens: int = Field(1024, ge=1)
    # ZeRO-3 keeps parameters smaller than this whole on every rank (DeepSpeed's default).
    zero3_persistence_threshold: int = Field(100_000, ge=0)
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


def interface_of(ip: str) -> str | None:
    """The network interface holding address ``ip`` on this machine, if any."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs):
            return name
    return None


class Learner:
    """One rank: a model (under a DeepSpeed engine when it trains or is ZeRO-3 partitioned)."""

    def __init__(self, cfg: LearnerConfig | dict, rank: int, world_size: int):
        self.cfg = cfg if isinstance(cfg, LearnerConfig) else LearnerConfig.model_validate(cfg)
        if not self.cfg.model:
            raise ValueError("LearnerConfig.model is empty: no model path to load")
        self.rank, self.world_size = rank, world_size
        self.engine = None
        self.optimizer = self.scheduler = None
        self._model: torch.nn.Module | None = None

    # ---- group set-up -------------------------------------------------------------------
    def master_address(self) -> tuple[str, int]:
        """Rank 0 is asked for an address and a free port the others then join: its node's address
        as Ray knows it (the hostname may resolve to loopback, 127.0.1.1 on Debian, which other
        nodes cannot reach)."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group, build the model and (trainable, or ZeRO-3) its DeepSpeed engine."""
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
        if accel.communication_backend_name() == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
            # Gloo binds to what the hostname resolves to, else to loopback: on a node whose
            # hostname does not resolve to its own address, the ranks of other nodes could not
            # reach it. Bind to the interface of the address Ray knows the node by.
            import ray

            if iface := interface_of(ray.util.get_node_ip_address()):
                os.environ["GLOO_SOCKET_IFNAME"] = iface
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
        torch.manual_seed(self.cfg.seed)
        model = self._build_model()
        if not self.cfg.trainable:
            model.requires_grad_(False)
            model.eval()
            if self.cfg.zero_stage == 3:
                self.engine, *_ = deepspeed.initialize(model=model, config=self.deepspeed_config())
            else:
                self._model = model.to(accel.current_device_name())
            return
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
            "zero_optimization": {"stage": c.zero_stage}
            | ({"stage3_param_persistence_threshold": c.zero3_persistence_threshold} if c.zero_stage == 3 else {}),
            # A client torch optimizer avoids DeepSpeed's JIT-built Adam kernels (minutes on CPU).
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": c.dtype == "bfloat16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def _build_model(self):
        from transformers import AutoModelForCausalLM

        from trainers.heads import ScalarHeadModel

        dtype = getattr(torch, self.cfg.dtype)
        if self.cfg.zero_stage == 3:
            # Must exist before from_pretrained so the weights are partitioned as they load.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.deepspeed_config())
        attn = self.cfg.attn_implementation
        if self.cfg.head == "lm":
            model = AutoModelForCausalLM.from_pretrained(self.cfg.model, dtype=dtype, attn_implementation=attn)
        else:
            # A reward model's new head has no bias: Bradley–Terry sees only score differences.
            bias = self.cfg.head == "value"
            model = ScalarHeadModel.from_pretrained(self.cfg.model, bias=bias, dtype=dtype, attn_implementation=attn)
        backbone = model if self.cfg.head == "lm" else model.backbone
        if self.cfg.gradient_checkpointing and self.cfg.trainable:
            backbone.gradient_checkpointing_enable()
        if self.cfg.lora is not None:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            lc = self.cfg.lora
            peft_cfg = PeftLoraConfig(
                r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                task_type="CAUSAL_LM" if self.cfg.head == "lm" else "FEATURE_EXTRACTION",
            )
            if self.cfg.head == "lm":
                model = get_peft_model(model, peft_cfg)
            else:
                model.backbone = get_peft_model(model.backbone, peft_cfg)
        return model

    # ---- compute ------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        """The model itself (inside the DeepSpeed engine when there is one)."""
        return self.engine.module if self.engine is not None else self._model

    @property
    def device(self) -> torch.device:
        return self.engine.device if self.engine is not None else next(self._model.parameters()).device

    def _runner(self):
        return self.engine if self.engine is not None else self._model

    @property
    def _lockstep(self) -> bool:
        """ZeRO-3 over several ranks: every call of a partitioned module gathers its weights (a
        collective), so the ranks must make the same calls. The LM head runs once per chunk of
        positions outside the model's forward, so every rank pads to the same shape, and runs
        as many micro-batches, as the largest."""
        return self.cfg.zero_stage == 3 and self.world_size > 1

    def _forward(self, columns: Columns) -> Forward:
        batch = pad_columns(columns, self.device)
        if self._lockstep:
            batch = pad_to_common_shape(batch)
        return Forward(self._runner(), batch, self.cfg.head, self.cfg.logprob_chunk_tokens)

    def _parts(self, input_ids: list[list[int]]) -> list[Columns]:
        """Micro-batches of unpadded sequences; in lockstep, one-token stand-ins fill up to the
        largest count of any rank (their outputs are dropped: they have no rows in ``input_ids``)."""
        parts = split_rows({"input_ids": input_ids}, self.cfg.micro_batch_size)
        if self._lockstep:
            parts += [{"input_ids": [[0]]}] * (max_over_ranks(len(parts), self.device) - len(parts))
        return parts

    def _micro_batches(self, batch: Columns | list[Columns]) -> list[Columns]:
        """A training step's micro-batches: given as such (a list), or cut from this rank's rows."""
        if isinstance(batch, list):
            parts = batch
        else:
            rows, micro = num_rows(batch), self.cfg.micro_batch_size
            if rows != micro * self.cfg.grad_accum_steps:
                raise ValueError(
                    f"rank {self.rank}: a step takes micro_batch_size x grad_accum_steps = "
                    f"{micro} x {self.cfg.grad_accum_steps} rows, got {rows}"
                )
            parts = split_rows(batch, micro)
        if len(parts) != self.cfg.grad_accum_steps:
            raise ValueError(f"rank {self.rank}: got {len(parts)} micro-batches, expected {self.cfg.grad_accum_steps}")
        return parts

    def train_step(self, batch: Columns | list[Columns], loss_fn: Loss, denominator: float, **loss_kwargs: Any) -> dict[str, float]:
        """One optimizer step of ``loss_fn`` over this rank's micro-batches; returns summed stats.

        The objective is the loss summed over the step's ``denominator`` units on all ranks,
        divided by that count: DeepSpeed averages gradients over ranks and divides by the
        accumulation steps, so each micro-batch's sum is scaled by ``world_size * accum /
        denominator``. That makes N ranks with batch B follow the same curve as one rank with N*B.
        """
        if self.optimizer is None:
            raise RuntimeError(f"rank {self.rank}: a frozen learner ({self.cfg.head}) has no optimizer to step")
        parts = self._micro_batches(batch)
        scale = self.world_size * self.cfg.grad_accum_steps / max(1.0, float(denominator))
        totals: dict[str, float] = {}
        for columns in parts:
            fwd = self._forward(columns)
            loss, stats = loss_fn(fwd, fwd.batch, **loss_kwargs)
            if not loss.requires_grad:
                # Nothing to learn from in this micro-batch, but every rank must still run backward.
                loss = loss + sum(p.sum() for p in self.module.parameters() if p.requires_grad) * 0.0
            self.engine.backward(loss * scale)
            self.engine.step()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
        return totals | {"lr": self.scheduler.get_last_lr()[0]}

    @contextlib.contextmanager
    def _evaluating(self):
        """Eval mode without gradients, the module's mode restored after."""
        module = self.module
        was_training = module.training
        module.eval()
        # ZeRO-3 gathers parameters in forward hooks; inference-mode tensors there would become
        # the partitions' storage, so a ZeRO-3 engine runs under no_grad instead.
        grad_off = torch.no_grad() if self.cfg.zero_stage == 3 else torch.inference_mode()
        try:
            with grad_off:
                yield
        finally:
            module.train(was_training)

    def _per_row(self, input_ids: list[list[int]], fn: Callable[[Forward], torch.Tensor], drop: int) -> list[list[float]]:
        """``fn`` over micro-batches of unpadded sequences, cut back to ``len(seq) - drop`` per row."""
        out: list[list[float]] = []
        with self._evaluating():
            for part in self._parts(input_ids):
                out += unpad(fn(self._forward(part)), [len(s) - drop for s in part["input_ids"]])
        return out[: len(input_ids)]

    def eval_loss(self, batch: Columns | list[Columns], loss_fn: Loss, **loss_kwargs: Any) -> dict[str, float]:
        """The loss's summed stats without a step (validation); micro-batches given or cut here."""
        parts = batch if isinstance(batch, list) else split_rows(batch, self.cfg.micro_batch_size)
        totals: dict[str, float] = {}
        with self._evaluating():
            for columns in parts:
                fwd = self._forward(columns)
                _, stats = loss_fn(fwd, fwd.batch, **loss_kwargs)
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
        return totals

    def logprobs(self, input_ids: list[list[int]], temperature: float = 1.0, base: bool = False) -> list[list[float]]:
        """log p(x_t | x_<t) at ``temperature`` for t >= 1 of unpadded sequences, batched in
        micro-batches: one list of len(seq) - 1 per sequence. ``base``: with the LoRA adapter
        disabled, the frozen model under it (PPO's reference at no second model's cost)."""
        if not base:
            return self._per_row(input_ids, lambda fwd: fwd.logprobs(temperature)[0], drop=1)
        if self.cfg.lora is None or self.cfg.head != "lm":
            raise ValueError("logprobs(base=True) disables a LoRA adapter: this learner has none on its LM")
        with self.module.disable_adapter():
            return self._per_row(input_ids, lambda fwd: fwd.logprobs(temperature)[0], drop=1)

    def entropy(self, input_ids: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        """The entropy of the next-token distribution at each position t >= 1 (as ``logprobs``)."""
        return self._per_row(input_ids, lambda fwd: fwd.logprobs(temperature, entropy=True)[1], drop=1)

    def values(self, input_ids: list[list[int]]) -> list[list[float]]:
        """The scalar head's output at every token of each sequence (a critic's values)."""
        return self._per_row(input_ids, lambda fwd: fwd.values(), drop=0)

    def rewards(self, input_ids: list[list[int]]) -> list[float]:
        """A reward model's score of each sequence: the head's output at its last token."""
        out: list[float] = []
        with self._evaluating():
            for part in self._parts(input_ids):
                out += self._forward(part).last_token_values().float().cpu().tolist()[: len(part["input_ids"])]
        return out[: len(input_ids)]

    def with_model(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(model, *args)`` on this rank's model as it is now, in eval mode without
        gradients, with the RNG states restored after (so it cannot change the training that
        follows). Drivers use it to run what trainers must not import (the tool loop on the live
        weights). Under ZeRO 0-2 every rank holds the whole model; ZeRO-3 shards it."""
        if self.cfg.zero_stage == 3:
            raise ValueError("with_model needs whole weights on one rank: ZeRO-3 shards them")
        module = self.module
        was_training = module.training
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            module.eval()
            try:
                with torch.no_grad():
                    return fn(module, *args)
            finally:
                module.train(was_training)

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
        """Hugging Face weights: full (LoRA merged), or the adapter alone; a scalar head goes
        beside the backbone (``trainers.heads``). Collective; rank 0 writes."""
        import deepspeed

        module = self.module
        if self.cfg.head != "lm":
            self._save_scalar_head_model(directory)
            return
        if self.cfg.lora is not None and not merged:
            with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.zero_stage == 3):
                if self.rank == 0:
                    module.save_pretrained(directory)
            return
        state = self.full_state_dict()
        if self.rank == 0:
            base = module.get_base_model() if self.cfg.lora is not None else module
            base.save_pretrained(directory, state_dict=state)

    def _save_scalar_head_model(self, directory: str) -> None:
        import deepspeed

        from trainers.heads import save_sequence_classifier

        module = self.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.zero_stage == 3):
            if self.cfg.lora is not None:
                backbone_state = _merged_lora_state(module.backbone)
                base = module.backbone.get_base_model()
            else:
                backbone_state = {k: v.detach().cpu().clone() for k, v in module.backbone.state_dict().items()}
                base = module.backbone
            head_state = {k: v.detach().cpu().clone() for k, v in module.head.state_dict().items()}
        if self.rank == 0:
            if "bias" in head_state:
                base.save_pretrained(directory, state_dict=backbone_state)
                module.save_head(directory, head_state)
            else:
                save_sequence_classifier(directory, base.config, backbone_state, head_state["weight"])

    # ---- weights out --------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model weights in checkpoint names (LoRA merged), gathered on every rank.

        Every rank must call this (under ZeRO-3 gathering is a collective).
        """
        import deepspeed

        module = self.module
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

    # A weight sync (driven by ray_jobs.weight_sync; the logic is trainers.weight_sender): rank 0
    # joins the sync group and plans, then every rank sends (under ZeRO-3 each bucket is a gather).
    def weight_sync_join(self, addr: str, port: int, rank: int, world: int, timeout_s: float = 600.0) -> None:
        self._weight_sender().join(addr, port, rank, world, timeout_s)

    def weights_plan(self, version: int, bucket_bytes: int, dtype: str | None = None) -> dict[str, Any]:
        """The plan of the sync of ``version`` (no gather): full weights, or the LoRA adapter alone."""
        return self._weight_sender().plan(version, bucket_bytes, dtype).model_dump()

    def send_weights(self, plan: dict[str, Any], transport: Literal["group", "object_store"] = "group") -> dict[str, Any]:
        """Every rank calls this with rank 0's plan; rank 0 sends and returns its timings."""
        from tooltune.weights import SyncPlan

        return self._weight_sender().send(SyncPlan.model_validate(plan), transport)

    def weight_sync_probe(self, nbytes: int) -> float:
        return self._weight_sender().probe(nbytes)

    def _weight_sender(self):
        from trainers.weight_sender import WeightSender

        if self.cfg.head != "lm":
            raise ValueError(f"weight sync sends a causal LM policy, not a {self.cfg.head} head")
        if getattr(self, "_sender", None) is None:
            self._sender = WeightSender(self.module, self.rank, zero3=self.cfg.zero_stage == 3)
        return self._sender


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
    """Base weights with W + (alpha/r)·BA folded in, under the base model's names. Computed out of
    place: merging into the live weights and unmerging after is not exact in bf16."""
    from peft.tuners.lora import LoraLayer

    adapter = peft_model.active_adapter
    base = peft_model.get_base_model()
    deltas = {
        f"{name}.base_layer.weight": module.get_delta_weight(adapter)
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }
    state = {}
    for k, v in base.state_dict().items():
        if "lora_" in k:
            continue
        # As peft's in-place merge rounds: the sum in the wider dtype (adapters are often fp32 over
        # a bf16 base), then the base's dtype.
        merged = (v + deltas[k]).to(v.dtype) if k in deltas else v
        state[k.replace(".base_layer.", ".")] = merged.detach().cpu().clone()
    return state
