"""A rollout worker over transformers ``generate``: the fallback where vLLM does not serve a
model or a machine, and the baseline the rollout benchmark measures vLLM against.

The batch interface and result types of ``RolloutWorker`` (``generate``, ``score``, ``version``;
not its per-request ``generate_one`` nor the streamed weight sync: new weights arrive as one
safetensors blob, ``update_weights``), and the same semantics for what a caller
sees: sampling keys as in vLLM's ``SamplingParams``, log-probs of the sampled tokens under the
distribution they were sampled from (after temperature, top-k and top-p, like the vLLM worker's
``processed_logprobs``), the policy version of each token, finish reasons "stop"/"length"
with vLLM's ``stop_reason``, and output text cut at a stop string. A plain class; launched as
``ray.remote(HFRolloutWorker)``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Literal

import torch
from pydantic import Field
from transformers import LogitsProcessor, StoppingCriteria

from rollout.vllm_worker import Generation, PromptResult
from tooltune.config import StrictModel
from tooltune.weights import tensor_checksum

# The vLLM ``SamplingParams`` keys this worker implements; any other key is an error, not ignored.
SAMPLING_KEYS = frozenset(
    {
        "n", "temperature", "top_p", "top_k", "max_tokens", "seed",
        "stop", "stop_token_ids", "ignore_eos", "include_stop_str_in_output",
    }
)  # fmt: skip


class HFRolloutConfig(StrictModel):
    model: str
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    seed: int = 0
    # Sequences (prompts x n) per ``generate`` call. On CPU, with tool prompts of ~600 tokens, 8 was
    # faster than 4, 16, 32 or 128 (attention over the padded cache dominates); a GPU wants more.
    max_batch_sequences: int = Field(8, ge=1)
    # ``score`` computes full-vocabulary logits: at most this many positions per forward.
    score_tokens: int = Field(4096, ge=1)
    # Torch threads; None uses every core this process may run on (Ray actors default to one).
    num_threads: int | None = Field(None, ge=1)
    device: str = "auto"
    # "auto": eager on CPU, where sdpa's kernel is slow for one query token against a long padded
    # cache (it decoded at half the speed in benchmarks/rollout.py), sdpa elsewhere.
    attn_implementation: Literal["auto", "sdpa", "eager"] = "auto"


class HFRolloutWorker:
    def __init__(self, cfg: HFRolloutConfig | dict):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg if isinstance(cfg, HFRolloutConfig) else HFRolloutConfig.model_validate(cfg)
        self.policy_version = 0
        self.weights_checksum: str | None = None
        torch.set_num_threads(self.cfg.num_threads or _usable_cores())
        torch.manual_seed(self.cfg.seed)
        if self.cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(self.cfg.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model)
        dtype = "auto" if self.cfg.dtype == "auto" else getattr(torch, self.cfg.dtype)
        attn = self.cfg.attn_implementation
        if attn == "auto":
            attn = "eager" if self.device.type == "cpu" else "sdpa"
        self.model = AutoModelForCausalLM.from_pretrained(self.cfg.model, dtype=dtype, attn_implementation=attn)
        self.model = self.model.to(self.device).eval()
        self._stopping()

    @classmethod
    def around(cls, model: Any, tokenizer: Any, **cfg: Any) -> HFRolloutWorker:
        """A worker over a model already in memory, not a copy (a learner's model, evaluated
        during training). The caller owns train/eval mode; the model's generation config is
        swapped only while it generates, so a checkpoint saved later keeps its own."""
        self = cls.__new__(cls)
        self.cfg = HFRolloutConfig(model="<in memory>", **cfg)
        self.policy_version, self.weights_checksum = 0, None
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self._stopping()
        return self

    def _stopping(self) -> None:
        # vLLM stops on the tokenizer's EOS (stop_reason None) and on the checkpoint's other
        # generation EOS ids (stop_reason = the id); so does this worker, and it does all the
        # stopping itself: the model's own generation defaults must not add any.
        gen_eos = self.model.generation_config.eos_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.extra_eos_ids = ({gen_eos} if isinstance(gen_eos, int) else set(gen_eos or ())) - {self.eos_id}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    # ---- generation ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: dict[str, Any]) -> list[PromptResult]:
        """Sample ``sampling["n"]`` continuations per prompt, with each sampled token's log-prob."""
        unknown = set(sampling) - SAMPLING_KEYS
        if unknown:
            raise ValueError(f"HFRolloutWorker does not support sampling keys {sorted(unknown)}")
        n = sampling.get("n", 1)
        # Similar lengths share a batch (less left padding to compute over); a prompt's n samples
        # always share one, so its prompt is run once.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
        per_batch = max(1, self.cfg.max_batch_sequences // n)
        results = [PromptResult(prompt_token_ids=list(p)) for p in prompts]
        seed = sampling.get("seed")
        # A seeded call replays its own stream and leaves the worker's stream where it was.
        fork = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        with fork if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(order), per_batch):
                chunk = order[start : start + per_batch]
                gens = self._generate_batch([prompts[i] for i in chunk], n, sampling)
                for k, i in enumerate(chunk):
                    results[i].samples = gens[k * n : (k + 1) * n]
        return results

    def _generate_batch(self, prompts: list[list[int]], n: int, sampling: dict[str, Any]) -> list[Generation]:
        """``n`` samples of each prompt, in prompt order."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        ids, mask = self._left_pad(prompts)
        # All but the last prompt token go through the model once, not n times: generate then
        # continues every sample from a copy of that cache.
        cache = self._prefill(ids[:, :-1], mask[:, :-1], n) if n > 1 and ids.shape[1] > 1 else None
        ids, mask = ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
        stop = sampling.get("stop") or []
        ignore_eos = sampling.get("ignore_eos", False)
        keep_stop = sampling.get("include_stop_str_in_output", False)
        start = ids.shape[1]
        # The sampling warpers are passed here, before the recorder, rather than built by generate
        # (which would put them after it): the recorder then sees the distribution sampled from.
        recorder = _SampledLogprobs()
        finish = _Finish(
            self.tokenizer,
            prompt_len=start,
            eos_id=None if ignore_eos else self.eos_id,
            stop_ids=set(sampling.get("stop_token_ids") or ()) | (set() if ignore_eos else self.extra_eos_ids),
            stop=[stop] if isinstance(stop, str) else list(stop),
        )
        with self._own_generation_defaults():
            seqs = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=cache,
                generation_config=self._generation_config(sampling),
                logits_processor=LogitsProcessorList([*_warpers(sampling), recorder]),
                stopping_criteria=StoppingCriteriaList([finish]),
            )
        logprobs = recorder.result(seqs)
        gens = []
        for row in range(ids.shape[0]):
            length, reason, stop_reason = finish.ended.get(row, (seqs.shape[1] - start, "length", None))
            tokens = seqs[row, start : start + length].tolist()
            # Like vLLM: the text leaves out the stop token or stop string unless asked to keep it.
            by_token = reason == "stop" and not isinstance(stop_reason, str)
            shown = tokens[:-1] if by_token and not keep_stop else tokens
            text = self.tokenizer.decode(shown, skip_special_tokens=True)
            if isinstance(stop_reason, str):
                text = text[: text.find(stop_reason) + (len(stop_reason) if keep_stop else 0)]
            versions = [self.policy_version] * len(tokens)
            gens.append(Generation(tokens, logprobs[row, :length].tolist(), text, reason, stop_reason, versions))
        return gens

    @contextlib.contextmanager
    def _own_generation_defaults(self):
        """``generate`` fills unset options from the model's generation config: make it empty."""
        from transformers import GenerationConfig

        # A peft model generates through its base model, whose config is the one read.
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        saved = model.generation_config
        model.generation_config = GenerationConfig(pad_token_id=self.pad_id)
        try:
            yield
        finally:
            model.generation_config = saved

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, n: int):
        """The KV cache of left-padded ``ids``, each row repeated ``n`` times. Positions are counted
        from each row's first real token, as ``generate`` counts them."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1)
        cache.batch_repeat_interleave(n)
        return cache

    def _generation_config(self, sampling: dict[str, Any]):
        from transformers import GenerationConfig

        common = {"max_new_tokens": sampling.get("max_tokens", 16), "pad_token_id": self.pad_id}
        if sampling.get("temperature", 1.0) == 0:
            return GenerationConfig(do_sample=False, **common)
        # Temperature, top-k and top-p come from ``_warpers``; transformers' top_k default (50)
        # is turned off, so generate adds no warper of its own.
        return GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, **common)

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.tensor(s)
            mask[row, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(x_t | x_<t) for t >= 1 of fixed sequences (prompt log-probs, nothing sampled)."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
        out: dict[int, list[float]] = {}
        while order:
            # Full-vocabulary logits are rows x width x vocab floats: bound the rows by a token budget.
            rows = max(1, min(self.cfg.max_batch_sequences, self.cfg.score_tokens // len(sequences[order[0]])))
            chunk, order = order[:rows], order[rows:]
            ids, mask = self._left_pad([sequences[i] for i in chunk])
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            lps = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)
            del logits
            for row, i in enumerate(chunk):
                out[i] = lps[row, ids.shape[1] - len(sequences[i]) :].tolist()
        return [out[i] for i in range(len(sequences))]

    # ---- weights in ---------------------------------------------------------------------
    def update_weights(self, blob: bytes, version: int, checksum: str) -> str:
        """Load full weights (checkpoint names, a tied LM head may be absent). The blob is verified
        before it touches the model: a corrupt sync leaves the loaded weights and version as they were."""
        from safetensors.torch import load

        if version <= self.policy_version:
            raise ValueError(f"policy version {version} is not newer than loaded version {self.policy_version}")
        state = load(blob)
        got = tensor_checksum(state)
        if got != checksum:
            raise RuntimeError(
                f"weight sync to version {version} failed: checksum {got[:12]} != expected {checksum[:12]}"
            )
        expected = set(self.model.state_dict())
        if self._lm_head_tied():
            expected.discard("lm_head.weight")
            state.pop("lm_head.weight", None)
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"weights for version {version} do not fit the model: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        self.model.load_state_dict(state, strict=False)
        self.policy_version, self.weights_checksum = version, checksum
        return checksum

    def _lm_head_tied(self) -> bool:
        head, embed = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        return head is not None and head.weight.data_ptr() == embed.weight.data_ptr()

    def version(self) -> tuple[int, str | None]:
        return self.policy_version, self.weights_checksum

    def shutdown(self) -> None:
        import gc

        del self.model
        gc.collect()


def _warpers(sampling: dict[str, Any]) -> list[LogitsProcessor]:
    """Temperature, top-k and top-p in vLLM's order, as logits processors (none when greedy)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    temperature = sampling.get("temperature", 1.0)
    if temperature == 0:
        return []
    top_k, top_p = sampling.get("top_k", 0), sampling.get("top_p", 1.0)
    out: list[LogitsProcessor] = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    # vLLM's top_k of 0 or -1 means "off".
    if top_k > 0:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


class _SampledLogprobs(LogitsProcessor):
    """The last logits processor: it sees the scores sampled from (after the warpers) and keeps,
    per step, the log-prob of the token that step then sampled."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last is not None:
            self.steps.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def result(self, sequences: torch.Tensor) -> torch.Tensor:
        """[batch, new tokens] log-probs; the last step's token is only known once generate returns."""
        steps = [*self.steps, self.last.gather(-1, sequences[:, -1:]).squeeze(-1)]
        return torch.stack(steps, dim=1).cpu()


class _Finish(StoppingCriteria):
    """Stopping criterion with vLLM's semantics, recording why and where each row ended: the EOS
    (stop_reason None), a stop token id (the id) or a stop string in the decoded text (the string)."""

    def __init__(self, tokenizer, prompt_len: int, eos_id: int | None, stop_ids: set[int], stop: list[str]):
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, stop
        self.eos_id, self.stop_ids = eos_id, stop_ids
        self.ended: dict[int, tuple[int, str, str | int | None]] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        length = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].tolist()
        for row, tok in enumerate(last):
            if row in self.ended:
                continue
            if tok == self.eos_id:
                self.ended[row] = (length, "stop", None)
            elif tok in self.stop_ids:
                self.ended[row] = (length, "stop", tok)
            elif self.stop:
                text = self.tokenizer.decode(input_ids[row, self.prompt_len :].tolist(), skip_special_tokens=True)
                hits = [(text.find(s) + len(s), s) for s in self.stop if s in text]
                if hits:
                    self.ended[row] = (length, "stop", min(hits, key=lambda h: h[0])[1])
        return torch.tensor([row in self.ended for row in range(len(last))], device=input_ids.device)


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
