"""The sharded teacher: top-k log-probs and tail mass on numbers computed by hand, and the
pipeline of stages (in process, and as real Ray actors) scoring exactly what the unsharded
model scores."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.teacher import ShardedTeacher, TeacherStage, stage_layer_ranges, topk_from_hidden, topk_logprobs

LN = math.log


def test_topk_logprobs_by_hand():
    # Probabilities 0.1, 0.2, 0.3, 0.4 (logits are log-probs up to a shift of 5).
    logits = torch.tensor([[LN(0.1), LN(0.2), LN(0.3), LN(0.4)]]) + 5.0
    ids, logp, tail = topk_logprobs(logits, k=2)
    assert ids.dtype == torch.int32 and logp.dtype == torch.float32 and tail.dtype == torch.float32
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(logp, torch.tensor([[LN(0.4), LN(0.3)]]))
    torch.testing.assert_close(tail, torch.tensor([LN(0.1 + 0.2)]))


def test_topk_logprobs_temperature():
    # At T = 2 the probabilities are proportional to sqrt(p): 1, sqrt 2, sqrt 3, 2 over their sum.
    logits = torch.tensor([[LN(1.0), LN(2.0), LN(3.0), LN(4.0)]], dtype=torch.bfloat16).float()
    weights = [math.sqrt(x) for x in logits[0].exp().tolist()]
    total = sum(weights)
    ids, logp, tail = topk_logprobs(logits, k=1, temperature=2.0)
    assert ids.tolist() == [[3]]
    torch.testing.assert_close(logp, torch.tensor([[LN(weights[3] / total)]]))
    torch.testing.assert_close(tail, torch.tensor([LN(sum(weights[:3]) / total)]))


def test_topk_logprobs_whole_vocabulary_and_extreme_rows():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0], [200.0, 0.0, -200.0, 100.0]])
    ids, logp, tail = topk_logprobs(logits, k=4)
    full = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(logp, full.sort(dim=-1, descending=True).values)
    torch.testing.assert_close(full.gather(-1, ids.long()), logp)
    assert torch.isneginf(tail).all()
    # Nearly all the mass in the top-1: the tail is still finite and right (log(1 - p) would be 0 - 0).
    _, logp1, tail1 = topk_logprobs(logits[2:], k=1)
    assert logp1.item() == 0.0
    torch.testing.assert_close(tail1, torch.tensor([-100.0]))


@pytest.mark.parametrize(("k", "temperature"), [(0, 1.0), (5, 1.0), (2, 0.0), (2, -1.0), (2, math.nan), (2, math.inf)])
def test_topk_logprobs_rejects_bad_arguments(k, temperature):
    with pytest.raises(ValueError, match="k must be|temperature must be"):
        topk_logprobs(torch.zeros(2, 4), k, temperature)


def test_stage_layer_ranges():
    assert stage_layer_ranges(4, 1) == [(0, 4)]
    assert stage_layer_ranges(4, 2) == [(0, 2), (2, 4)]
    assert stage_layer_ranges(5, 2) == [(0, 3), (3, 5)]
    assert stage_layer_ranges(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert stage_layer_ranges(3, 3) == [(0, 1), (1, 2), (2, 3)]
    for bad in (0, 4):
        with pytest.raises(ValueError, match="stages must be in 1..3"):
            stage_layer_ranges(3, bad)


def test_topk_from_hidden_in_chunks_equals_whole():
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(11, 16, generator=gen)
    whole = topk_logprobs(head(hidden).detach(), 5, 0.7)
    chunked = topk_from_hidden(hidden, head, 5, 0.7, chunk_tokens=4)
    assert torch.equal(chunked[0], whole[0])
    for a, b in zip(chunked[1:], whole[1:]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    ids, logp, tail = topk_from_hidden(hidden[:0], head, 5)
    assert ids.shape == (0, 5) and logp.shape == (0, 5) and tail.shape == (0,)


# ---- the stages against the unsharded model ---------------------------------------------------

K = 8
# Lengths differ, so every micro-batch but one is right-padded.
LENGTHS = [5, 9, 3, 7, 6, 4, 8]


def sequences(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in LENGTHS]


def unsharded_scores(model_dir: str, seqs: list[list[int]], temperature: float = 1.0, attn: str | None = None):
    """The reference: the whole HF model on each sequence alone (no padding at all)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    with torch.inference_mode():
        return [topk_logprobs(model(torch.tensor([s])).logits[0], K, temperature) for s in seqs]


def assert_same_scores(got: list[dict], want: list[tuple]) -> None:
    assert len(got) == len(want)
    for row, ((ids, logp, tail), scores) in enumerate(zip(want, got)):
        assert torch.equal(torch.as_tensor(scores["ids"]), ids), f"row {row}: top-k ids differ"
        torch.testing.assert_close(torch.as_tensor(scores["logp"]), logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.as_tensor(scores["tail_logp"]), tail, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory) -> str:
    """Three layers (uneven over two stages, one each over three) and an LM head of its own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("untied")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_stages_in_process_equal_unsharded(untied_model_dir, attn):
    # Eager attention gets a materialised causal mask from create_causal_mask, sdpa none (is_causal):
    # both paths must match the model's own forward.
    seqs = sequences(96)
    want = unsharded_scores(untied_model_dir, seqs, temperature=1.5, attn=attn)
    batch = torch.tensor([s + [0] * (max(LENGTHS) - len(s)) for s in seqs])
    from transformers import AutoModelForCausalLM

    whole = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(untied_model_dir).parameters())
    for stages in (1, 2, 3):
        chain = [
            TeacherStage(untied_model_dir, s, stages, K, temperature=1.5, chunk_tokens=5, attn_implementation=attn)
            for s in range(stages)
        ]
        x = batch
        for stage in chain:
            x = stage.forward(x)
        assert_same_scores([{k: v[r, : len(s)] for k, v in x.items()} for r, s in enumerate(seqs)], want)
        info = [stage.info() for stage in chain]
        assert [i["layers"] for i in info] == stage_layer_ranges(3, stages)
        assert "embed" in info[0]["modules"] and "head" in info[-1]["modules"]
        assert all("embed" not in i["modules"] for i in info[1:]) and all("head" not in i["modules"] for i in info[:-1])
        # The slices partition the model: no stage holds another's weights.
        assert sum(i["parameters"] for i in info) == whole


@pytest.fixture(scope="module")
def ray_cluster():
    from cluster.local import local_ray

    with local_ray():
        yield


@pytest.mark.slow
@pytest.mark.parametrize("stages", [2, 1])
def test_sharded_teacher_equals_unsharded(ray_cluster, tiny_model_dir, stages):
    import json
    from pathlib import Path

    vocab = json.loads((Path(tiny_model_dir) / "config.json").read_text())["vocab_size"]
    seqs = sequences(vocab)
    want = unsharded_scores(tiny_model_dir, seqs)
    # Micro-batches of 3, 3 and 1 with at most 2 in flight: the pipeline fills, waits and drains.
    teacher = ShardedTeacher(tiny_model_dir, stages=stages, k=K, cpus_per_stage=0.25, max_in_flight=2, chunk_tokens=4)
    try:
        assert [s["stage"] for s in teacher.layout] == list(range(stages))
        got = teacher.score_sequences(seqs, micro_batch_size=3, pad_id=0)
        assert [g["ids"].shape for g in got] == [(n, K) for n in LENGTHS]
        assert_same_scores(got, want)
    finally:
        teacher.shutdown()
