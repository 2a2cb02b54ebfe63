"""The distillation teacher, sharded into pipeline stages: per token, its top-k and the mass outside.

A teacher too large for one device is cut into K stages, each a Ray actor holding a contiguous
slice of the decoder layers (the embeddings in the first, the final norm and LM head in the
last). Hidden states go stage to stage as Ray object refs, one micro-batch after another, so
while stage 1 works on micro-batch m, stage 0 already works on m + 1. What leaves the last stage
per token is the top-k token ids, their log-probs and the log of the probability mass outside
them (``tail_logp``): enough for a forward KL over the top-k plus one tail bucket, at k + 1
numbers where a full vocabulary row would be ~50k.

``TeacherStage`` is a plain class (``ray.remote(TeacherStage)`` where it is launched, or called
directly in a test); ``ShardedTeacher`` is the driver side that places, chains and feeds them.
"""

from __future__ import annotations

import gc
import math
from collections import deque
from typing import Any, Literal

import numpy as np
import torch

from cluster.placement import RoleConfig, RoleGroup

Scores = dict[str, torch.Tensor]
"""``{"ids": int32 [..., k], "logp": float32 [..., k], "tail_logp": float32 [...]}``."""


def topk_logprobs(
    logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row of ``logits`` [n, V] under softmax(logits / temperature).

    Returns ids int32 [n, k] and their log-probs float32 [n, k], most likely first, and
    ``tail_logp`` float32 [n]: the log of the mass of the other V - k tokens (-inf when k == V).
    The softmax is fp32 (float64 stays float64) whatever the logits' dtype. The tail is the
    log-sum-exp of the remaining logits minus the full one, not log(1 - sum p_topk): when the
    top-k hold nearly all the mass, the subtraction would cancel to 0 (log -inf) or go negative.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [n, V], got shape {tuple(logits.shape)}")
    vocab = logits.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in 1..{vocab} (the vocabulary size), got {k}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    total = torch.logsumexp(z, dim=-1)
    top, ids = z.topk(k, dim=-1, sorted=True)
    tail = torch.logsumexp(z.scatter(-1, ids, -math.inf), dim=-1) - total
    return ids.to(torch.int32), (top - total[:, None]).float(), tail.float()


@torch.inference_mode()
def topk_from_hidden(
    hidden: torch.Tensor, lm_head: torch.nn.Module, k: int, temperature: float = 1.0, chunk_tokens: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``topk_logprobs`` of ``lm_head(hidden)`` for final hidden states [n, H] (after the final
    norm), computed ``chunk_tokens`` rows at a time: the fp32 [rows, V] logits of a whole batch
    are the largest thing a teacher would build (8 x 2,048 tokens x 49k vocabulary is 3.2 GB)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    # An empty input still runs one (empty) chunk, so the shapes and the checks on k come out right.
    starts = range(0, hidden.shape[0], chunk_tokens) or [0]
    parts = [topk_logprobs(lm_head(hidden[s : s + chunk_tokens]), k, temperature) for s in starts]
    ids, logp, tail = zip(*parts)
    return torch.cat(ids), torch.cat(logp), torch.cat(tail)


def stage_layer_ranges(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """[start, end) of each stage's decoder layers: contiguous, sizes differing by at most one,
    the earlier stages taking the extra layers (the last stage also runs the LM head)."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"stages must be in 1..{num_layers} (the number of layers), got {stages}")
    size, extra = divmod(num_layers, stages)
    bounds = [s * size + min(s, extra) for s in range(stages + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


# Families whose decoder is exactly what ``TeacherStage.forward`` runs (embeddings, layers with
# rotary positions under a full causal mask, final norm, LM head).
STAGE_MODEL_TYPES = frozenset({"llama"})


class TeacherStage:
    """One pipeline stage of a Llama-family causal LM (decoder layers under ``.get_decoder()``:
    ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``), holding only its slice of it.

    The whole checkpoint is loaded once, then everything outside the slice is dropped and freed,
    so a stage's steady-state memory is its slice's. Torch's threads follow the actor's CPU share:
    Ray sets ``OMP_NUM_THREADS`` from ``num_cpus``, as for the learners.
    """

    def __init__(
        self,
        model_dir: str,
        stage: int,
        stages: int,
        k: int,
        temperature: float = 1.0,
        chunk_tokens: int = 1024,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: Literal["sdpa", "eager"] | None = None,
        device: str = "cpu",
    ):
        from transformers import AutoModelForCausalLM

        if not 0 <= stage < stages:
            raise ValueError(f"stage must be in 0..{stages - 1}, got {stage}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(model_dir).model_type
        if model_type not in STAGE_MODEL_TYPES:
            raise ValueError(
                f"{model_dir}: a {model_type!r} model; the pipeline stages run the Llama layout ({', '.join(sorted(STAGE_MODEL_TYPES))}): "
                "other families scale embeddings, soft-cap logits or use sliding windows, which these stages would skip"
            )
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
        )
        model.requires_grad_(False).eval()
        if not 1 <= k <= model.config.vocab_size:
            raise ValueError(f"k must be in 1..{model.config.vocab_size} (the vocabulary size), got {k}")
        decoder = model.get_decoder()
        self.stage, self.stages = stage, stages
        self.first, self.last = stage == 0, stage == stages - 1
        self.k, self.temperature, self.chunk_tokens = k, temperature, chunk_tokens
        self.config = model.config
        self.layer_range = stage_layer_ranges(len(decoder.layers), stages)[stage]
        start, end = self.layer_range
        layers = decoder.layers
        del layers[end:]
        del layers[:start]
        # A tied LM head shares the embedding's weight tensor: each keeps it alive on its own side.
        parts: dict[str, torch.nn.Module] = {"layers": layers, "rotary": decoder.rotary_emb}
        if self.first:
            parts["embed"] = decoder.embed_tokens
        if self.last:
            parts |= {"norm": decoder.norm, "head": model.get_output_embeddings()}
        self.parts = torch.nn.ModuleDict(parts).to(device)
        del model, decoder, layers
        gc.collect()
        self.device = torch.device(device)

    def info(self) -> dict[str, Any]:
        """What this stage holds (also a cheap call that waits for the constructor to finish)."""
        return {
            "stage": self.stage,
            "layers": self.layer_range,
            "parameters": sum(p.numel() for p in self.parts.parameters()),
            "modules": sorted(self.parts),
        }

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor | Scores:
        """Stage 0 takes token ids [B, T]; later stages the previous stage's hidden states [B, T, H].
        Returns hidden states [B, T, H] (on the CPU, to travel through the object store), or, from
        the last stage, the scores of every position (``Scores`` with leading dims [B, T]).

        Rows are right-padded and no padding mask is used: under the causal mask a real token
        attends only to earlier positions, all real, so its scores are those of the unpadded
        sequence. Scores at pad positions are meaningless; drop them.
        """
        from transformers.masking_utils import create_causal_mask

        x = x.to(self.device)
        if self.first:
            if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"stage 0 takes token ids [B, T], got {x.dtype} {tuple(x.shape)}")
            hidden = self.parts["embed"](x)
        else:
            if x.dim() != 3:
                raise ValueError(f"stage {self.stage} takes hidden states [B, T, H], got {tuple(x.shape)}")
            hidden = x
        batch, width = hidden.shape[:2]
        # As LlamaModel.forward builds them with no cache and no padding mask: under sdpa the mask
        # is None (the kernel's is_causal), under eager a materialised [B, 1, T, T] causal mask.
        position_ids = torch.arange(width, device=self.device)[None, :]
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        )
        rotary = self.parts["rotary"](hidden, position_ids=position_ids)
        for layer in self.parts["layers"]:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary)
        if not self.last:
            return hidden.cpu()
        rows = self.parts["norm"](hidden).reshape(batch * width, -1)
        ids, logp, tail = topk_from_hidden(rows, self.parts["head"], self.k, self.temperature, self.chunk_tokens)
        return {
            "ids": ids.reshape(batch, width, -1).cpu(),
            "logp": logp.reshape(batch, width, -1).cpu(),
            "tail_logp": tail.reshape(batch, width).cpu(),
        }


class ShardedTeacher:
    """K ``TeacherStage`` actors in one placement group, fed micro-batches as a pipeline.

    Each micro-batch's chain of calls is submitted at once, every stage's call taking the
    previous one's object ref: the hidden states move actor to actor without the driver, and an
    actor runs calls in the order they were submitted, so stage s works on micro-batch m while
    stage s + 1 works on m - 1. ``max_in_flight`` bounds the micro-batches submitted and not yet
    collected (what the object store holds at once).
    """

    def __init__(
        self,
        model_dir: str,
        stages: int = 2,
        k: int = 64,
        temperature: float = 1.0,
        cpus_per_stage: float = 1.0,
        max_in_flight: int = 4,
        chunk_tokens: int = 1024,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: Literal["sdpa", "eager"] | None = None,
        gpus_per_stage: float = 0.0,
        name: str = "teacher",
    ):
        import ray

        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self.placement = RoleGroup(name, RoleConfig(num_ranks=stages, cpus=cpus_per_stage, gpus=gpus_per_stage))
        device = "cuda" if gpus_per_stage > 0 else "cpu"
        args = (k, temperature, chunk_tokens, dtype, attn_implementation, device)
        try:
            self.stages = self.placement.spawn(TeacherStage, lambda s: (model_dir, s, stages, *args))
            # Waits for every stage to load: a bad checkpoint or k fails here, not on the first batch.
            self.layout = ray.get([s.info.remote() for s in self.stages])
        except BaseException:
            self.placement.close()
            raise

    def submit(self, batch: torch.Tensor):
        """Send one micro-batch down the stages now; returns the object ref of its scores (no
        bound on what is in flight: the caller keeps one, as ``score`` and streamed targets do)."""
        ref = batch
        for stage in self.stages:
            ref = stage.forward.remote(ref)
        return ref

    def score(self, batches: list[torch.Tensor]) -> list[Scores]:
        """Scores of every position of each micro-batch of right-padded token ids [B, T], in input
        order (``TeacherStage.forward``: pad positions' scores are meaningless)."""
        import ray

        pending: deque = deque()
        out: list[Scores] = []
        for batch in batches:
            # Stages run in submission order, so the oldest micro-batch is always the next to finish.
            if len(pending) == self.max_in_flight:
                out.append(ray.get(pending.popleft()))
            pending.append(self.submit(batch))
        return out + ray.get(list(pending))

    def score_sequences(self, seqs: list[list[int]], micro_batch_size: int, pad_id: int) -> list[dict[str, np.ndarray]]:
        """Scores of unpadded sequences, ``micro_batch_size`` per micro-batch (each right-padded to
        its longest with ``pad_id``). Per sequence of length L, numpy arrays ``ids`` int32 [L, k],
        ``logp`` float32 [L, k], ``tail_logp`` float32 [L]; position t scores the token at t + 1."""
        groups, batches = padded_micro_batches(seqs, micro_batch_size, pad_id)
        return unpad_scores(groups, self.score(batches))

    def shutdown(self) -> None:
        """Kill the stage actors and remove their placement group."""
        self.placement.close()


def padded_micro_batches(seqs: list[list[int]], micro_batch_size: int, pad_id: int) -> tuple[list[list[list[int]]], list[torch.Tensor]]:
    """``seqs`` in groups of ``micro_batch_size``, each right-padded to its longest with ``pad_id``."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if any(len(s) == 0 for s in seqs):
        raise ValueError("every sequence needs at least one token")
    groups = [seqs[i : i + micro_batch_size] for i in range(0, len(seqs), micro_batch_size)]
    batches = [torch.tensor([s + [pad_id] * (max(map(len, g)) - len(s)) for s in g], dtype=torch.long) for g in groups]
    return groups, batches


def unpad_scores(groups: list[list[list[int]]], scores: list[Scores]) -> list[dict[str, np.ndarray]]:
    """Per sequence, its unpadded scores as numpy arrays, in the groups' order."""
    out = []
    for group, batch_scores in zip(groups, scores, strict=True):
        for row, seq in enumerate(group):
            out.append({key: value[row, : len(seq)].numpy() for key, value in batch_scores.items()})
    return out
