"""SFT on real DeepSpeed learners in Ray: data-parallel equivalence, ZeRO-3, exact resume."""

import json

import pytest

from ray_jobs.sft import SFTConfig, run_sft
from tooltune.config import ConfigError

WORDS = "tools call the weather in paris is sunny and the answer to the question is forty two".split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) for _ in range(48)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def config(tmp_path, text_file, name, ranks, micro, zero=2, steps=4, **train):
    return SFTConfig.model_validate(
        {
            "model": "tiny",
            "learners": {"num_ranks": ranks, "cpus": 0.5},
            "learner": {"zero_stage": zero, "lr": 3e-3, "micro_batch_size": micro},
            "data": {"world": None, "text_files": [text_file]},
            "train": {"seq_len": 64, "max_steps": steps, "eval_every": 100, "save_every": 2, **train},
            "output_dir": str(tmp_path / name),
            "tensorboard": False,
        }
    )


def losses(result):
    return [h["train/loss"] for h in result["history"]]


@pytest.mark.slow
def test_two_ranks_batch_b_equal_one_rank_batch_2b_and_resume_is_exact(tmp_path, text_file):
    one = run_sft(config(tmp_path, text_file, "one", ranks=1, micro=8))
    two = run_sft(config(tmp_path, text_file, "two", ranks=2, micro=4))
    assert len(losses(one)) == 4
    assert losses(one)[-1] < losses(one)[0]
    # Same rows per step, loss normalised by the global token count: only float reduction
    # order differs between one rank and an all-reduce over two.
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)

    cut = config(tmp_path, text_file, "cut", ranks=1, micro=8)
    first = run_sft(cut, stop_after=2)
    assert [h["step"] for h in first["history"]] == [1, 2]
    # A crash after step 3 was logged but before it was saved: the resumed run logs it again.
    metrics = tmp_path / "cut" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + json.dumps({"step": 3, "train/loss": 9.9}) + "\n")
    # A resume with a config that changes the run is refused, naming the keys, and trains nothing.
    changed = cut.model_copy(update={"learner": cut.learner.model_copy(update={"lr": 1e-3})})
    with pytest.raises(ConfigError, match=r"checkpoint step-000002 was trained with another config: learner.lr \(0.003 -> 0.001\)"):
        run_sft(changed)
    resumed = run_sft(cut)
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    assert losses(first) + losses(resumed) == pytest.approx(losses(one), rel=1e-6, abs=1e-7)
    assert resumed["checkpoint"].endswith("step-000004/model")
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4] and logged[2]["train/loss"] == pytest.approx(losses(one)[2], rel=1e-6)
    # A finished run says so instead of reporting its old checkpoint as new ...
    with pytest.raises(ConfigError, match=r"already finished \(step 4 of 4"):
        run_sft(cut)
    # ... and trains again from scratch with resume=false (the old checkpoints are gone).
    again = run_sft(cut.model_copy(update={"resume": False, "train": cut.train.model_copy(update={"max_steps": 2})}))
    assert [h["step"] for h in again["history"]] == [1, 2] and again["checkpoint"].endswith("step-000002/model")
    assert losses(again) == pytest.approx(losses(one)[:1] + [losses(again)[1]], rel=1e-6)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_zero3_two_ranks_trains_and_saves_loadable_checkpoint(tmp_path, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_sft(config(tmp_path, text_file, "z3", ranks=2, micro=4, zero=3, steps=2))
    assert losses(result)[-1] < losses(result)[0]
    model = AutoModelForCausalLM.from_pretrained(result["checkpoint"])
    tok = AutoTokenizer.from_pretrained(result["checkpoint"])
    assert "tools" in tok.chat_template and model.num_parameters() > 0


@pytest.mark.slow
def test_lora_sft_saves_merged_and_adapter_checkpoints(tmp_path, text_file):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainers.learner import LoraConfig

    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    cfg = config(tmp_path, text_file, "lora", ranks=1, micro=8, steps=2)
    cfg = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"lora": lora, "lr": 1e-2})})
    merged = run_sft(cfg)
    base = AutoModelForCausalLM.from_pretrained(merged["base_model"])
    tuned = AutoModelForCausalLM.from_pretrained(merged["checkpoint"])
    # LoRA's B starts at zero: only a real update moves the merged attention weights.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base.state_dict()[q], tuned.state_dict()[q])
    assert torch.equal(base.state_dict()["model.layers.0.mlp.up_proj.weight"], tuned.state_dict()["model.layers.0.mlp.up_proj.weight"])

    adapter_cfg = cfg.model_copy(update={"output_dir": str(tmp_path / "adapter"), "train": cfg.train.model_copy(update={"merged": False})})
    adapter = run_sft(adapter_cfg)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(merged["base_model"]), adapter["checkpoint"])
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        assert torch.allclose(with_adapter(ids).logits, tuned(ids).logits, atol=1e-4)


@pytest.mark.slow
def test_tool_world_evaluation_during_training_scores_the_weights_of_that_step(tmp_path):
    from rollout.agent_loop import run_episodes
    from rollout.hf_worker import HFRolloutWorker
    from tooltune.metrics import compute_metrics
    from tooltune.world import generate_world

    world = {"seed": 1, "n_train": 32, "n_validation": 6, "n_test": 0, "distractor_tools": 0}
    loop = {"max_turns": 2, "max_new_tokens": 24, "sampling": {"temperature": 0.0}}
    cfg = SFTConfig.model_validate(
        {
            "model": "tiny",
            "learners": {"num_ranks": 1, "cpus": 1},
            "learner": {"zero_stage": 2, "lr": 3e-3, "micro_batch_size": 4},
            "data": {"world": world, "conversation_loss": "all"},
            "train": {"seq_len": 512, "max_steps": 2, "eval_every": 100, "save_every": 1, "keep_last": 2},
            "evaluation": {"during_training_every": 1, "during_training_limit": 4, "loop": loop},
            "output_dir": str(tmp_path / "periodic"),
            "tensorboard": False,
        }
    )
    result = run_sft(cfg)
    logged = [{k[len("tool_eval/") :]: v for k, v in h.items() if k.startswith("tool_eval/")} for h in result["history"]]
    assert [bool(m) for m in logged] == [True, True]
    assert logged[-1]["tokens_per_query"] > 0
    # The same tasks, loop and greedy decoding on the checkpoint saved at that step: same episodes.
    tasks = generate_world(cfg.data.world)["validation"][:4]
    tok = __import__("transformers").AutoTokenizer.from_pretrained(result["checkpoint"])
    for step, metrics in zip((1, 2), logged):
        ckpt = tmp_path / "periodic" / "checkpoints" / f"step-{step:06d}" / "model"
        worker = HFRolloutWorker({"model": str(ckpt), "attn_implementation": "sdpa"})
        runs = run_episodes(tasks, worker, tok, cfg.evaluation.loop)
        offline = compute_metrics(tasks, [r.episode for r in runs])
        assert {k: v for k, v in offline.items() if k in metrics} == pytest.approx(metrics)
        # Generating on the learner's model left the generation config it saves alone.
        assert __import__("transformers").GenerationConfig.from_pretrained(ckpt).eos_token_id == tok.eos_token_id
