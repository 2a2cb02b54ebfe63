"""Chunked log-probs and entropy equal the naive full-vocabulary computation, values and gradients,
on the tiny model (plain, LoRA, bf16, ZeRO-3) and on a hand-computed case, in less memory."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from trainers.logprobs import final_hidden_states, naive_token_logprobs, output_embeddings, token_logprobs

LORA_ON_TIED_HEAD = "ignore:Model has `tie_word_embeddings=True`:UserWarning"


def load_tiny(path: str, lora: bool = False, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if lora:
        from peft import LoraConfig, get_peft_model

        # Random (not zero) B matrices, so the adapter changes the outputs; the head is adapted
        # too, so token_logprobs calls a LoRA-wrapped head.
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
        model = get_peft_model(model, cfg)
    return model


def padded_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Three rows of 13 tokens, two of them right-padded (lengths 13, 9, 5)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 13), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def chunked_and_naive(model, batch, temperature: float, chunk_tokens: int = 7):
    """(log-probs, entropy) of the next tokens, chunked from final hidden states and naive from the
    full logits. 3 x 12 = 36 rows in chunks of 7: the last chunk is short."""
    targets = batch["input_ids"][:, 1:]
    hidden = final_hidden_states(model, **batch)[:, :-1]
    chunked = token_logprobs(
        hidden, output_embeddings(model), targets, temperature=temperature, chunk_tokens=chunk_tokens, with_entropy=True
    )
    naive = naive_token_logprobs(model(**batch).logits[:, :-1], targets, temperature)
    return chunked, naive


@pytest.mark.filterwarnings(LORA_ON_TIED_HEAD)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_equals_naive_on_tiny_model(tiny_model_dir, temperature, lora):
    model = load_tiny(tiny_model_dir, lora)
    batch = padded_batch(model.config.vocab_size)
    with torch.inference_mode():
        (logp, entropy), (naive_logp, naive_entropy) = chunked_and_naive(model, batch, temperature)
    assert logp.shape == entropy.shape == (3, 12) and logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, naive_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, naive_entropy, rtol=0, atol=1e-5)
    # Not trivially equal: real distributions, and temperature changes them.
    assert entropy.min() > 0.5 and logp.max() < 0
    if temperature != 1.0:
        with torch.inference_mode():
            (logp_t1, _), _ = chunked_and_naive(model, batch, 1.0)
        assert (logp - logp_t1).abs().max() > 0.01


def test_final_hidden_states_are_after_the_final_norm(tiny_model_dir):
    model = load_tiny(tiny_model_dir)
    batch = padded_batch(model.config.vocab_size)
    with torch.inference_mode():
        hidden = final_hidden_states(model, **batch)
        out = model(**batch, output_hidden_states=True)
        logits = model.lm_head(hidden)
    torch.testing.assert_close(hidden, out.hidden_states[-1], rtol=0, atol=0)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-6)


def test_bf16_model_gives_fp32_equal_to_naive(tiny_model_dir):
    model = load_tiny(tiny_model_dir, dtype=torch.bfloat16)
    batch = padded_batch(model.config.vocab_size)
    with torch.inference_mode():
        (logp, entropy), (naive_logp, naive_entropy) = chunked_and_naive(model, batch, 0.7)
    assert logp.dtype == entropy.dtype == torch.float32
    # The same bf16 logits, softmaxed in fp32 both ways (in bf16 they would differ by ~1e-2).
    torch.testing.assert_close(logp, naive_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, naive_entropy, rtol=0, atol=1e-5)


def grads_of(model, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings(LORA_ON_TIED_HEAD)
@pytest.mark.parametrize(
    "terms, lora", [("logp+entropy", False), ("logp", False), ("entropy", False), ("logp+entropy", True)]
)
def test_gradients_equal_naive(tiny_model_dir, terms, lora):
    model = load_tiny(tiny_model_dir, lora)
    batch = padded_batch(model.config.vocab_size)
    gen = torch.Generator().manual_seed(1)
    w_logp, w_entropy = torch.randn(3, 12, generator=gen), torch.randn(3, 12, generator=gen)
    use_logp, use_entropy = "logp" in terms, "entropy" in terms

    def loss(chunked: bool) -> torch.Tensor:
        (logp, entropy), (naive_logp, naive_entropy) = chunked_and_naive(model, batch, 0.7)
        logp, entropy = (logp, entropy) if chunked else (naive_logp, naive_entropy)
        # Only the terms used: an unused output then gets no gradient at all (None), not zeros.
        parts = [(logp * w_logp).sum()] if use_logp else []
        return sum(parts + [(entropy * w_entropy).sum()] if use_entropy else parts)

    chunked, naive = grads_of(model, lambda: loss(True)), grads_of(model, lambda: loss(False))
    assert chunked.keys() == naive.keys() and len(naive) > 0
    for name, g in naive.items():
        assert g.norm() > 0, name
        assert (chunked[name] - g).norm() <= 1e-5 * g.norm(), name


def test_backward_keeps_no_vocabulary_sized_tensor(tiny_model_dir):
    """What autograd holds between forward and backward is each chunk's input rows, never their
    [rows, V] logits: those are computed again in backward."""
    model = load_tiny(tiny_model_dir)
    batch = padded_batch(model.config.vocab_size)
    hidden = final_hidden_states(model, **batch)[:, :-1].detach().requires_grad_()
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        targets = batch["input_ids"][:, 1:]
        logp, entropy = token_logprobs(hidden, model.lm_head, targets, chunk_tokens=7, with_entropy=True)
    assert saved and all(model.config.vocab_size not in shape for shape in saved), saved
    (logp.sum() + entropy.sum()).backward()
    assert hidden.grad is not None and hidden.grad.norm() > 0


def hand_head() -> torch.nn.Linear:
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    return head


def test_hand_computed_case():
    # Logits W h: token 0, h = (0, 0) -> (0, 0, 0); token 1, h = (ln 2, 0) -> (ln 2, 0, ln 2).
    hidden = torch.tensor([[[0.0, 0.0], [math.log(2.0), 0.0]]])
    targets = torch.tensor([[0, 1]])
    logp, entropy = token_logprobs(hidden, hand_head(), targets, chunk_tokens=1, with_entropy=True)
    # Token 0: uniform over 3: log p = -ln 3, H = ln 3.
    # Token 1: exp(logits) = (2, 1, 2), p = (0.4, 0.2, 0.4): log p(1) = ln 0.2 = -1.6094379;
    #   H = -(2 * 0.4 ln 0.4 + 0.2 ln 0.2) = 0.8 * 0.9162907 + 0.2 * 1.6094379 = 1.0549202.
    torch.testing.assert_close(logp, torch.tensor([[-1.0986123, -1.6094379]]))
    torch.testing.assert_close(entropy, torch.tensor([[1.0986123, 1.0549202]]))
    logp, entropy = token_logprobs(hidden, hand_head(), targets, temperature=0.5, with_entropy=True)
    # Temperature 0.5 doubles the logits. Token 0 stays uniform. Token 1: (2 ln 2, 0, 2 ln 2)
    #   -> exp = (4, 1, 4), p = (4/9, 1/9, 4/9): log p(1) = -ln 9 = -2.1972246;
    #   H = 8/9 ln(9/4) + 1/9 ln 9 = 0.8888889 * 0.8109302 + 0.1111111 * 2.1972246 = 0.9649629.
    torch.testing.assert_close(logp, torch.tensor([[-1.0986123, -2.1972246]]))
    torch.testing.assert_close(entropy, torch.tensor([[1.0986123, 0.9649629]]))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gradient_is_exact_in_float64(temperature):
    """Finite differences agree with the written-out backward, through the chunks' recomputation,
    for both outputs, with respect to the hidden states and the head's weight."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 3, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = hand_head().weight.detach().double().requires_grad_()
    targets = torch.tensor([[0, 2, 1], [1, 1, 0]])

    def outputs(h, w):
        head = lambda x: torch.nn.functional.linear(x, w)  # noqa: E731 (a head whose weight is an input)
        return token_logprobs(h, head, targets, temperature=temperature, chunk_tokens=4, with_entropy=True)

    assert torch.autograd.gradcheck(outputs, (hidden, weight))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_here(*args: str, timeout: float = 300) -> dict:
    """This file run as a script in a fresh process (its own memory peak, its own process group)."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_zero3_partitioned_head_equals_naive(tiny_model_dir):
    """Under ZeRO-3 the head's weight is an empty placeholder: calling the module gathers it, in
    the forward and again in the recomputation during backward."""
    result = run_here("zero3", tiny_model_dir)
    assert result["head_weight_numel"] == 0
    assert result["logp_err"] < 1e-5 and result["entropy_err"] < 1e-5
    assert result["grads"] > 0 and result["max_grad_rel_err"] < 1e-5


@pytest.mark.slow
def test_peak_memory_below_half_of_naive_on_smollm2_vocabulary():
    """V = 49,152, H = 576 (SmolLM2), 4 x 512 tokens, forward and backward with entropy: the naive
    computation builds [2048, 49152] fp32 tensors (403 MB each), the chunked one [512, 49152]."""
    naive = run_here("memory", "naive")["peak_mb"]
    chunked = run_here("memory", "chunked")["peak_mb"]
    print(f"peak memory: naive {naive:.0f} MB, chunked {chunked:.0f} MB")
    assert naive > 4 * 403
    assert chunked < naive / 2


def _peak_memory(mode: str) -> dict:
    """Peak resident memory (MB) above what was resident before one forward and backward."""

    def kib(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))

    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(576, 49152, bias=False)
    hidden = torch.randn(4, 512, 576, generator=gen, requires_grad=True)
    targets = torch.randint(0, 49152, (4, 512), generator=gen)
    weights = torch.randn(4, 512, generator=gen)
    # Writing 5 resets the peak (VmHWM) to the current resident size: Linux >= 4.0.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = kib("VmRSS")
    if mode == "naive":
        logp, entropy = naive_token_logprobs(head(hidden), targets)
    else:
        logp, entropy = token_logprobs(hidden, head, targets, chunk_tokens=512, with_entropy=True)
    ((logp + 0.01 * entropy) * weights).sum().backward()
    return {"peak_mb": (kib("VmHWM") - before) / 1024}


def _zero3(model_dir: str) -> dict:
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": 1,
        # Without a zero threshold, parameters under 1e5 elements (all of the tiny model's) stay whole.
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    hf_ds_config = HfDeepSpeedConfig(cfg)  # noqa: F841 (must be alive while the model loads)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=cfg)
    batch = padded_batch(reference.config.vocab_size)
    targets = batch["input_ids"][:, 1:]
    hidden = final_hidden_states(engine, **batch)[:, :-1]
    head = output_embeddings(engine)
    logp, entropy = token_logprobs(hidden, head, targets, temperature=0.7, chunk_tokens=7, with_entropy=True)
    naive_logp, naive_entropy = naive_token_logprobs(reference(**batch).logits[:, :-1], targets, 0.7)
    engine.backward(logp.sum() + entropy.sum())
    (naive_logp.sum() + naive_entropy.sum()).backward()
    from deepspeed.utils import safe_get_full_grad

    ref_params = dict(reference.named_parameters())
    errors = [
        ((safe_get_full_grad(p) - ref_params[n].grad).norm() / ref_params[n].grad.norm()).item()
        for n, p in engine.module.named_parameters()
    ]
    return {
        "head_weight_numel": head.weight.numel(),
        "logp_err": (logp - naive_logp).abs().max().item(),
        "entropy_err": (entropy - naive_entropy).abs().max().item(),
        "grads": len(errors),
        "max_grad_rel_err": max(errors),
    }


if __name__ == "__main__":
    result = _peak_memory(sys.argv[2]) if sys.argv[1] == "memory" else _zero3(sys.argv[2])
    print(json.dumps(result))
