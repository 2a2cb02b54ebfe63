"""Weight sync on real parts: DeepSpeed learners in Ray actors (gloo) stream their weights, or
their LoRA adapter, to vLLM engines in Ray actors, which verify every bucket and every name
before they serve the new version, and refuse anything else while serving the previous one.

The protocol's pure parts (bucket plans, checksums, what a receiver expects) are tested first,
on numbers worked out by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tooltune.weights import (
    BLOCK_BYTES,
    CHECKSUM_BYTES,
    WeightSyncConfig,
    WeightSyncRefused,
    bucket_checksum,
    bucket_views,
    checksum_problem,
    lora_expected,
    pack_bucket,
    plan_buckets,
    plan_problems,
    tensor_checksum,
)

TOL = 1e-3
TEXT = "<|im_start|>user\nWhat is the weather in Paris on 2026-03-14?<|im_end|>\n<|im_start|>assistant\nIt is"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- the protocol, by hand ------------------------------------------------------------------
def test_checksum_is_two_block_sums_modulo_2_64():
    words = torch.zeros(2 * 32, dtype=torch.int64)
    words[0], words[31], words[32] = 5, -1, 7  # blocks: 5 + (2**64 - 1) = 4 mod 2**64, and 7
    payload = words.view(torch.uint8)
    assert bucket_checksum(payload) == (4 + 7, 1 * 4 + 3 * 7)

    # One flipped bit anywhere changes it, and so do two blocks swapped.
    flipped = payload.clone()
    flipped[300] ^= 0x80
    assert bucket_checksum(flipped) != bucket_checksum(payload)
    swapped = torch.cat([payload[BLOCK_BYTES:], payload[:BLOCK_BYTES]])
    assert bucket_checksum(swapped)[0] == bucket_checksum(payload)[0]
    assert bucket_checksum(swapped) != bucket_checksum(payload)


def test_buckets_cut_at_the_size_and_pack_what_unpacks():
    specs = [("a", (3,), "float32"), ("b", (2, 2), "bfloat16"), ("c", (70,), "float32"), ("d", (1,), "int64")]
    plan = plan_buckets(specs, bucket_bytes=300, version=4)
    # a: 12 bytes at 0; b: 8 bytes at 16 (aligned up from 12); c (280 bytes, at 32) would end past
    # 300, so it starts a second bucket; d (8 bytes at 288, aligned up from 280) still fits there.
    assert [[(e.name, e.offset) for e in b.entries] for b in plan.buckets] == [[("a", 0), ("b", 16)], [("c", 0), ("d", 288)]]
    assert [b.nbytes for b in plan.buckets] == [BLOCK_BYTES, 2 * BLOCK_BYTES]

    tensors = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.ones(2, 2), "c": torch.arange(70.0), "d": torch.tensor([9])}
    for bucket in plan.buckets:
        buffer = torch.full((bucket.nbytes + CHECKSUM_BYTES,), 0xAB, dtype=torch.uint8)
        pack_bucket([tensors[e.name] for e in bucket.entries], bucket, buffer)
        for name, view in bucket_views(buffer, bucket):
            assert torch.equal(view, tensors[name].to(view.dtype))
        assert checksum_problem(buffer, bucket, 0) is None
        assert not (buffer[: bucket.nbytes] == 0xAB).any()  # padding zeroed: equal weights, equal sums
        buffer[bucket.entries[-1].offset] ^= 1
        assert "checksum of bucket 7" in checksum_problem(buffer, bucket, 7)


def test_a_plan_is_checked_against_what_the_receiver_holds():
    expected = {"w": ((2, 3), "float32"), "v": ((4,), "float32")}
    good = plan_buckets([("w", (2, 3), "float32"), ("v", (4,), "float32")], 1 << 20, version=3)
    assert plan_problems(good, expected, loaded_version=2) == []
    assert plan_problems(good, expected, loaded_version=3) == ["version 3 is not newer than the loaded version 3"]

    bad = plan_buckets([("w", (3, 2), "bfloat16"), ("w", (2, 3), "float32"), ("x", (1,), "float32")], 1 << 20, 3)
    assert plan_problems(bad, expected, loaded_version=0) == [
        "missing: v",
        "sent more than once: w",
        "unknown: x",
        "wrong: w shape (3, 2) != (2, 3), w dtype bfloat16 != float32",
    ]
    overlapping = good.model_copy(deep=True)
    overlapping.buckets[0].entries[1].offset = 16  # w spans bytes 0..24
    assert plan_problems(overlapping, expected, 0) == ["bucket 0 layout: v misplaced"]


def test_lora_expected_names_follow_peft_and_the_base_shapes():
    base = {"model.layers.0.self_attn.q_proj.weight": (64, 32), "model.layers.0.mlp.up_proj.weight": (96, 32),
            "model.layers.0.input_layernorm.weight": (32,), "model.embed_tokens.weight": (100, 32)}  # fmt: skip
    got = lora_expected(base, {"r": 4, "target_modules": ["q_proj"]}, max_rank=8)
    assert got == {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ((4, 32), None),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": ((64, 4), None),
    }
    assert len(lora_expected(base, {"r": 4, "target_modules": r".*_proj"}, max_rank=8)) == 4
    with pytest.raises(WeightSyncRefused, match="rank 16"):
        lora_expected(base, {"r": 16, "target_modules": ["q_proj"]}, max_rank=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_lora_weights_are_peft_merge_without_touching_the_live_weights(tiny_model_dir, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainers.learner import _merged_lora_state

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    live = {k: v.clone() for k, v in model.state_dict().items()}
    merged = _merged_lora_state(model)
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())
    reference = model.merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in reference)
    down = "model.layers.0.mlp.down_proj"
    assert not torch.equal(merged[f"{down}.weight"], live[f"base_model.model.{down}.base_layer.weight"])


# ---- real learners and engines --------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    from cluster.local import RayConfig, local_ray

    with local_ray(RayConfig(object_store_gib=0.5)):
        yield


@pytest.fixture(scope="module")
def seq(tiny_model_dir) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)(TEXT, add_special_tokens=False)["input_ids"]


def _engine(cfg: dict):
    import ray

    from rollout.vllm_worker import RolloutWorker

    worker = ray.remote(RolloutWorker).options(num_cpus=0.5).remote(cfg)
    ray.get(worker.version.remote())
    return worker


def _close(actors) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)


@pytest.fixture(scope="module")
def engine_fp32(ray_local, tiny_model_dir):
    """An fp32 engine that can serve adapters. The LoRA test runs first on it: its base must still
    be the checkpoint's, which the full syncs after it replace."""
    import ray

    worker = _engine({"model": tiny_model_dir, "enable_lora": True, "max_lora_rank": 8})
    yield worker
    ray.get(worker.shutdown.remote())
    _close([worker])


@pytest.fixture(scope="module")
def engine_bf16(ray_local, tiny_model_dir):
    import ray

    worker = _engine({"model": tiny_model_dir, "dtype": "bfloat16"})
    yield worker
    ray.get(worker.shutdown.remote())
    _close([worker])


def _learners(model_dir: str, ranks: int, **cfg):
    import ray

    from trainers.learner import Learner

    full = {"model": model_dir, "lr": 2e-2, "micro_batch_size": 1, **cfg}
    actors = [ray.remote(Learner).options(num_cpus=0.5).remote(full, r, ranks) for r in range(ranks)]
    addr, port = ray.get(actors[0].master_address.remote())
    ray.get([a.setup.remote(addr, port) for a in actors])
    return actors


def _step(learners, seq: list[int]) -> None:
    """One real optimizer step of the SFT loss on every rank (each rank its own row)."""
    import ray

    from trainers.losses import sft_nll

    rows = [{"input_ids": [seq[r:]], "loss_mask": [[1] * len(seq[r:])]} for r in range(len(learners))]
    tokens = sum(len(row["input_ids"][0]) - 1 for row in rows)
    ray.get([a.train_step.remote(row, sft_nll, tokens) for a, row in zip(learners, rows)])


def _learner_logprobs(learners, seq: list[int]) -> list[float]:
    import ray

    return ray.get([a.logprobs.remote([seq]) for a in learners])[0][0]


def _engine_logprobs(worker, seq: list[int]) -> list[float]:
    import ray

    return ray.get(worker.score.remote([seq]))[0]


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def _synced(learners, worker, seq: list[int], version: int, cfg: WeightSyncConfig | None = None, tol: float = TOL) -> dict:
    """A training step, then a sync: the engine must then serve the learner's new policy."""
    import ray

    from ray_jobs.weight_sync import sync_weights

    before = _engine_logprobs(worker, seq)
    _step(learners, seq)
    timings = sync_weights(learners, [worker], version, cfg)
    after = _engine_logprobs(worker, seq)
    assert _max_diff(after, _learner_logprobs(learners, seq)) < tol
    assert _max_diff(after, before) > 10 * tol
    assert ray.get(worker.version.remote())[0] == version
    return timings


@pytest.mark.slow
def test_lora_sync_moves_only_the_adapter_and_never_touches_the_base(engine_fp32, tiny_model_dir, seq):
    import ray

    from ray_jobs.weight_sync import connect_weight_sync

    assert ray.get(engine_fp32.version.remote())[0] == 0, "the LoRA test needs the engine's checkpoint base"
    lora = {"r": 8, "alpha": 16, "target_modules": ALL_LINEAR}
    learners = _learners(tiny_model_dir, 1, zero_stage=2, lora=lora)
    try:
        connect_weight_sync(learners, [engine_fp32])

        def base_digest(model):
            return tensor_checksum({n: p for n, p in model.named_parameters() if "lora_" not in n})

        learner_base = ray.get(learners[0].with_model.remote(base_digest))
        engine_base = ray.get(engine_fp32.weights_digest.remote())
        full_bytes = sum(p.numel() * 4 for p in _checkpoint(tiny_model_dir).values())
        for version in range(1, 21):
            timings = _synced(learners, engine_fp32, seq, version)
            # Only the adapter moved: r x (in + out) per linear layer, a small share of the model.
            assert timings["kind"] == "lora" and timings["bytes"] < 0.1 * full_bytes
        assert ray.get(learners[0].with_model.remote(base_digest)) == learner_base
        assert ray.get(engine_fp32.weights_digest.remote()) == engine_base
    finally:
        _close(learners)


def _checkpoint(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{model_dir}/model.safetensors")


@pytest.mark.slow
def test_full_sync_zero3_fp32_and_refusals_keep_the_previous_version(engine_fp32, tiny_model_dir, seq):
    import ray

    from ray_jobs.weight_sync import connect_weight_sync, sync_weights

    learners = _learners(tiny_model_dir, 2, zero_stage=3)
    try:
        connect_weight_sync(learners, [engine_fp32])
        start = ray.get(engine_fp32.version.remote())[0]
        # Small buckets: many of them, each gathered on its own under ZeRO-3.
        small = WeightSyncConfig(bucket_mb=0.25)
        timings = _synced(learners, engine_fp32, seq, start + 1, small)
        assert timings["kind"] == "full" and timings["buckets"] > 3
        served = (ray.get(engine_fp32.version.remote()), _engine_logprobs(engine_fp32, seq))

        def unchanged() -> None:
            assert (ray.get(engine_fp32.version.remote()), _engine_logprobs(engine_fp32, seq)) == served

        _step(learners, seq)  # the learners move on; every refused sync below must leave the engine behind
        with pytest.raises(WeightSyncRefused, match=f"version {start + 1} is not newer than the loaded version {start + 1}"):
            sync_weights(learners, [engine_fp32], start + 1, small)
        unchanged()

        plan = ray.get(learners[0].weights_plan.remote(start + 2, small.bucket_bytes, "float32"))
        name = plan["buckets"][1]["entries"][0]["name"]
        missing = copy.deepcopy(plan)
        del missing["buckets"][1]["entries"][0]
        _refused(learners, engine_fp32, missing, plan, f"missing: {name}")
        unchanged()
        # Layer 1's down_proj sent under layer 0's name: one name twice, another missing.
        twice = copy.deepcopy(plan)
        down0, down1 = (f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1))
        renamed = [e for b in twice["buckets"] for e in b["entries"] if e["name"] == down1]
        assert len(renamed) == 1
        renamed[0]["name"] = down0
        _refused(learners, engine_fp32, twice, plan, f"missing: {down1}; sent more than once: {down0}")
        unchanged()

        # Bytes changed on the way (object-store transport, where the test can reach them).
        import numpy as np

        sent = ray.get([a.send_weights.remote(plan, "object_store") for a in learners])[0]
        buckets = list(sent["buckets"])
        corrupt = np.array(ray.get(buckets[2]))
        corrupt[100] ^= 0x10
        buckets[2] = ray.put(corrupt)
        with pytest.raises(WeightSyncRefused, match="checksum of bucket 2"):
            ray.get(engine_fp32.receive_weights.remote(plan, buckets))
        unchanged()

        # The same plan's true bytes through the object store are served.
        ray.get(engine_fp32.receive_weights.remote(plan, sent["buckets"]))
        after = _engine_logprobs(engine_fp32, seq)
        assert _max_diff(after, _learner_logprobs(learners, seq)) < TOL and _max_diff(after, served[1]) > 10 * TOL
        assert ray.get(engine_fp32.version.remote())[0] == start + 2
    finally:
        _close(learners)


def _refused(learners, worker, received_plan: dict, sent_plan: dict, match: str) -> None:
    """The worker is given ``received_plan`` while the learners send ``sent_plan``: it refuses
    before any byte moves, and the learners learn it."""
    import re

    import ray

    receiving = worker.receive_weights.remote(received_plan)
    sent = ray.get([a.send_weights.remote(sent_plan, "group") for a in learners])
    assert sent[0] == {"applied": False}
    with pytest.raises(WeightSyncRefused, match=re.escape(match)):
        ray.get(receiving)


@pytest.mark.slow
def test_full_sync_bf16(engine_bf16, engine_fp32, tiny_model_dir, seq):
    import ray

    from ray_jobs.weight_sync import connect_weight_sync, sync_weights

    learners = _learners(tiny_model_dir, 1, zero_stage=2, dtype="bfloat16")
    try:
        connect_weight_sync(learners, [engine_bf16])
        # vLLM's bf16 kernels and transformers' round differently: on the same checkpoint, before
        # any sync, their log-probs already differ by this much; a sync must not add to it.
        floor = _max_diff(_engine_logprobs(engine_bf16, seq), _learner_logprobs(learners, seq))
        timings = _synced(learners, engine_bf16, seq, version=1, tol=max(TOL, 3 * floor))
        # bf16 on the wire: half the fp32 checkpoint's bytes.
        assert timings["bytes"] < 0.6 * sum(p.numel() * 4 for p in _checkpoint(tiny_model_dir).values())

        # Exactly the learner's bf16 weights arrived: into an fp32 engine (cast on the way, which
        # is exact), they give the log-probs of the learner's weights run in fp32.
        connect_weight_sync(learners, [engine_fp32])
        version = ray.get(engine_fp32.version.remote())[0] + 1
        sync_weights(learners, [engine_fp32], version)

        def fp32_logprobs(model, seq):
            from transformers import AutoModelForCausalLM

            ref = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
            ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
            ids = torch.tensor([seq])
            logits = ref(input_ids=ids).logits[0, :-1].float()
            return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()

        expected = ray.get(learners[0].with_model.remote(fp32_logprobs, seq))
        assert _max_diff(_engine_logprobs(engine_fp32, seq), expected) < TOL
    finally:
        _close(learners)
