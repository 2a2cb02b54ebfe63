"""The reward model: pairs from rankings, accuracy by hand, and a real training run on DeepSpeed
learners in Ray whose checkpoint loads as a sequence classifier and is served by scorer actors."""

import json

import pytest

from tooltune.chat import reward_ids
from tooltune.preferences import Candidate, PreferenceRecord, write_preferences
from trainers.reward_model import Pair, RewardDataConfig, pair_columns, pairwise_accuracy, preference_pairs


def record(prompt_id, ranks, category="single", texts=None):
    texts = texts or [f"answer {i}" for i in range(len(ranks))]
    return PreferenceRecord(
        prompt_id=prompt_id, tools=[], prompt=[{"role": "user", "content": f"question {prompt_id}"}],
        candidates=[Candidate(id=f"{prompt_id}/{i}", messages=[{"role": "assistant", "content": t}]) for i, t in enumerate(texts)],
        ranks=ranks, judge="rules", category=category,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    from tooltune.chat import install_tool_template, needs_tool_template

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    if needs_tool_template(tok):
        install_tool_template(tok)
    return tok


def test_pairs_of_rankings_ties_and_margins_by_hand(tokenizer):
    cfg = RewardDataConfig(train_files=["unused"])
    # k = 4 without ties: 6 pairs; [0, 1, 1, 2] ties candidates 1 and 2: 5 pairs; all tied: none.
    pairs, dropped = preference_pairs(tokenizer, [record("a", [2, 0, 3, 1]), record("b", [0, 1, 1, 2]), record("c", [0, 0])], cfg)
    by_prompt = {p: [q for q in pairs if q.prompt_id == p] for p in "abc"}
    assert (len(by_prompt["a"]), len(by_prompt["b"]), len(by_prompt["c"]), dropped) == (6, 5, 0, 0)
    # The better one comes first: in "a" candidate 1 (rank 0) beats every other one.
    ids = [tuple(pair_columns([p])["input_ids"][0]) for p in by_prompt["a"]]
    best = by_prompt["a"][0].chosen
    assert sum(p.chosen == best for p in by_prompt["a"]) == 3 and ids[0] == best
    # Margins are rank gaps x scale; a too-long candidate drops its pairs.
    margins = preference_pairs(tokenizer, [record("b", [0, 1, 1, 2])], cfg.model_copy(update={"margin": "rank_gap", "margin_scale": 0.5}))[0]
    assert sorted(p.margin for p in margins) == [0.5, 0.5, 0.5, 0.5, 1.0]
    long = record("d", [0, 1], texts=["short", "long " * 400])
    assert preference_pairs(tokenizer, [long], cfg)[1] == 1
    # The scored end is the answer's last token: the render stops before the turn end that closes it.
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answer = tokenizer("answer 1", add_special_tokens=False)["input_ids"]
    assert all(p.chosen[-1] != end and p.rejected[-1] != end for p in pairs)
    assert [p for p in by_prompt["a"] if p.chosen_id == "a/1"][0].chosen[-len(answer):] == tuple(answer)


def test_pair_columns_interleave_chosen_and_rejected():
    pairs = [Pair("a", "single", (1, 2), (3,), 0.0), Pair("b", "single", (4,), (5, 6), 2.0)]
    assert pair_columns(pairs) == {"input_ids": [[1, 2], [3], [4], [5, 6]], "margin": [0.0, 0.0, 2.0, 2.0]}
    assert "margin" not in pair_columns(pairs[:1])


def test_pairwise_accuracy_by_hand():
    pairs = [Pair("a", "single", (1,), (2,)), Pair("a", "single", (1,), (3,)), Pair("b", "no_tool", (4,), (5,))]
    # single: 1 of 2 right (the tie 0.5 = 0.5 is a miss); no_tool: 1 of 1.
    out = pairwise_accuracy(pairs, [1.0, 0.5, 2.0], [0.0, 0.5, -1.0])
    assert out == {"accuracy": 2 / 3, "pairs": 3.0, "accuracy/no_tool": 1.0, "pairs/no_tool": 1.0, "accuracy/single": 0.5, "pairs/single": 2.0}


def world_records(split, n, seed=0):
    """Rankings on tool-world tasks: the gold episode beats a direct answer with no call (for a
    task that needs a tool) or a needless calculator call (for one that does not)."""
    from tooltune.episode import ToolCall
    from tooltune.world import WorldConfig, generate_world, gold_messages, world_registry

    cfg = WorldConfig(seed=seed, n_train=n, n_validation=n, n_test=0, distractor_tools=0, no_tool_fraction=0.3, eval_no_tool_fraction=0.3)
    registry = world_registry(cfg)
    records = []
    for task in generate_world(cfg)[split][:n]:
        gold = gold_messages(task, registry)[1 + bool(task.system) :]
        if task.needs_tool:
            bad = [{"role": "assistant", "content": "I think it is 12."}]
        else:
            call = ToolCall("calculator", {"expression": "1 + 1"})
            bad = [{"role": "assistant", "content": "", "tool_calls": [call.to_openai("call_0")]},
                   {"role": "tool", "tool_call_id": "call_0", "name": "calculator", "content": "2"}, gold[-1]]  # fmt: skip
        prompt = [{"role": "user", "content": task.query}]
        candidates = [Candidate(id=f"{task.id}/gold", messages=gold), Candidate(id=f"{task.id}/bad", messages=bad)]
        records.append(PreferenceRecord(prompt_id=task.id, tools=task.tools, prompt=prompt, candidates=candidates,
                                        ranks=[0, 1], judge="rules", category=task.category))  # fmt: skip
    return records


@pytest.mark.slow
def test_reward_model_trains_resumes_loads_as_classifier_and_scorer_actors_agree(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cluster.placement import RoleConfig
    from ray_jobs.reward_model import RewardModelConfig, run_reward_model, start_scorers
    from tooltune.config import ConfigError
    from trainers.heads import ScalarHeadModel

    train = write_preferences(tmp_path / "train.parquet", world_records("train", 48))
    held_out = write_preferences(tmp_path / "validation.parquet", world_records("validation", 16, seed=1))
    cfg = RewardModelConfig.model_validate({
        "model": tiny_model_dir,
        "learners": {"num_ranks": 1, "cpus": 1},
        "learner": {"head": "reward", "zero_stage": 0, "lr": 3e-3, "micro_batch_size": 8},
        "data": {"train_files": [str(train)], "validation_files": [str(held_out)], "max_length": 2048},
        "train": {"max_steps": 40, "eval_every": 8, "save_every": 8},
        "output_dir": str(tmp_path / "rm"), "tensorboard": False,
    })  # fmt: skip
    first = run_reward_model(cfg, stop_after=8)
    assert first["data"] == {"train_rankings": 48, "train_pairs": 48, "train_pairs_too_long": 0,
                             "validation_rankings": 16, "validation_pairs": 16, "validation_pairs_too_long": 0}  # fmt: skip
    with pytest.raises(ConfigError, match=r"learner.lr \(0.003 -> 0.001\)"):
        run_reward_model(cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"lr": 1e-3})}))
    result = run_reward_model(cfg)
    assert [h["step"] for h in result["history"]] == list(range(9, 41))
    logged = [json.loads(line)["step"] for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 41))
    assert (tmp_path / "rm" / "curves.png").stat().st_size > 0
    # Per category, on prompts it never trained on.
    accuracy = result["validation"]
    assert {"accuracy/no_tool", "accuracy/single"} <= accuracy.keys()
    assert accuracy["accuracy"] >= 0.9 and accuracy["accuracy"] > first["history"][7]["validation/accuracy"] - 1e-9

    # The checkpoint is a sequence classifier, and the head reloads as trained.
    ckpt = result["checkpoint"]
    tok = AutoTokenizer.from_pretrained(ckpt)
    classifier = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    scalar = ScalarHeadModel.from_pretrained(ckpt).eval()
    trajectories = scripted_trajectories(tok, 3)
    seqs = [reward_ids(tok, t.episode.messages, t.task.tools) for t in trajectories]
    with torch.no_grad():
        by_classifier = [classifier(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs]
        in_process = [scalar(input_ids=torch.tensor([s]))[0, -1].item() for s in seqs]
    assert by_classifier == pytest.approx(in_process, abs=1e-5)
    # A critic may start from the reward model: same weights, its bias at 0.
    critic = ScalarHeadModel.from_pretrained(ckpt, bias=True)
    assert torch.equal(critic.head.weight, scalar.head.weight) and critic.head.bias.item() == 0.0

    # Two scorer actors, each a share of the batch: one score per trajectory, as in-process;
    # the rule part from the tool-cost table (gold single call 12, direct guess -5).
    from cluster.local import local_ray
    from rollout.scorer import ScorerConfig

    with local_ray(cfg.ray):
        group, scorer = start_scorers(ckpt, RoleConfig(num_ranks=2, cpus=0.5), scorer_cfg=ScorerConfig(rm_weight=2.0, rule_weight=1.0))
        try:
            scores = scorer.score(trajectories)
        finally:
            group.shutdown()
    assert [s.rm for s in scores] == pytest.approx(in_process, abs=1e-5)
    assert [s.rule for s in scores] == [12.0, -5.0] * 3
    assert [s.total for s in scores] == pytest.approx([2 * m + r for m, r in zip(in_process, [12.0, -5.0] * 3)], abs=1e-4)


def scripted_trajectories(tokenizer, n):
    """Gold and direct-guess episodes of the first ``n`` single-call validation tasks, played
    through the tool loop."""
    from rollout.agent_loop import LoopConfig
    from rollout.scripted import run_scripted
    from tooltune.contrasts import scripted_turns
    from tooltune.world import WorldConfig, generate_world

    tasks = [t for t in generate_world(WorldConfig(n_train=0, n_validation=40, n_test=0))["validation"] if t.category == "single"][:n]
    scripts = [(t, scripted_turns(t, v)) for t in tasks for v in ("gold", "direct_guess")]
    return run_scripted(scripts, tokenizer, LoopConfig(max_turns=4, max_new_tokens=512, max_total_tokens=4096), None)


def test_reward_ids_are_the_tokens_the_tool_loop_holds(tokenizer):
    # What the scorer reads (the episode's messages rendered) is what the policy wrote: the
    # trajectory's own ids up to its closing turn end.
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for trajectory in scripted_trajectories(tokenizer, 2):
        ids = trajectory.token_ids
        assert ids[-1] == end
        assert reward_ids(tokenizer, trajectory.episode.messages, trajectory.task.tools) == ids[:-1]
