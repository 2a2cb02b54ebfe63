"""Packed rows: each document attends only to itself and carries exactly the loss it has unpacked."""

import pytest
import torch

from trainers.losses import model_inputs, token_nll, uses_flash_attention
from trainers.packing import collate, loss_tokens, pack_examples

PAD = 0


def doc(ids: list[int], loss_mask: list[int] | None = None) -> dict[str, list[int]]:
    return {"input_ids": ids, "loss_mask": loss_mask if loss_mask is not None else [1] * len(ids)}


def test_pack_examples_restarts_positions_and_masks_the_cross_document_target():
    a, b, c = doc([11, 12, 13], [0, 1, 1]), doc([21, 22]), doc([31, 32, 33, 34])
    rows = pack_examples([a, b, c], seq_len=6)
    assert rows == [
        # b's first token would be predicted from a's last one: its loss_mask becomes 0.
        {"input_ids": [11, 12, 13, 21, 22], "loss_mask": [0, 1, 1, 0, 1], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [31, 32, 33, 34], "loss_mask": [1, 1, 1, 1], "position_ids": [0, 1, 2, 3]},
    ]
    # Unpacked: a 2, b 1, c 3 targets (position 0 of a row is never one).
    assert loss_tokens(rows) == loss_tokens([a, b, c]) == 6


def test_pack_examples_truncates_long_examples_with_their_positions():
    rows = pack_examples([doc([1, 2, 3, 4, 5]), doc([6])], seq_len=3)
    assert rows == [
        {"input_ids": [1, 2, 3], "loss_mask": [1, 1, 1], "position_ids": [0, 1, 2]},
        {"input_ids": [6], "loss_mask": [1], "position_ids": [0]},
    ]


def test_collate_pads_positions_as_a_document_of_their_own_and_leaves_unpacked_rows_alone():
    packed = collate(pack_examples([doc([1, 2, 3]), doc([4, 5]), doc([6, 7])], seq_len=5), PAD)
    assert packed["position_ids"] == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert packed["attention_mask"] == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert packed["loss_mask"] == [[1, 1, 1, 0, 1], [1, 1, 0, 0, 0]]
    unpacked = collate([doc([1, 2, 3]), doc([4])], PAD)
    assert unpacked == {
        "input_ids": [[1, 2, 3], [4, PAD, PAD]],
        "attention_mask": [[1, 1, 1], [1, 0, 0]],
        "loss_mask": [[1, 1, 1], [1, 0, 0]],
    }


def test_model_inputs_packed_rows_drop_the_padding_mask_and_flatten_for_flash_attention():
    batch = collate(pack_examples([doc([1, 2, 3]), doc([4, 5]), doc([6, 7])], seq_len=5), PAD)
    inputs, targets = model_inputs(batch)
    assert set(inputs) == {"input_ids", "position_ids", "use_cache"} and inputs["use_cache"] is False
    assert targets.tolist() == [[1, 1, 0, 1], [1, 0, 0, 0]]
    flat, flat_targets = model_inputs(batch, flatten=True)
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, PAD, PAD, PAD]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 1, 2]]
    # Target j is token j+1; the last token of row 0 (5) must not predict row 1's first (6).
    assert flat_targets.tolist() == [[1, 1, 0, 1, 0, 1, 0, 0, 0]]
    unpacked, _ = model_inputs(collate([doc([1, 2])], PAD))
    assert set(unpacked) == {"input_ids", "attention_mask"}


def test_flash_attention_varlen_boundaries_come_from_the_flattened_positions():
    """transformers' flash path (no flash-attn needed to check this part): with a batch of one and
    no attention mask it cuts cu_seqlens at every position-id restart, i.e. at each document and
    at the pads' own run."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    batch = collate(pack_examples([doc([1] * 5), doc([2] * 7), doc([3] * 4)], seq_len=12), PAD)
    flat, _ = model_inputs(batch, flatten=True)
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(flat["position_ids"])
    assert cu_q.tolist() == cu_k.tolist() == [0, 5, 12, 16, 24] and int(max_q) == 8
    assert _is_packed_sequence(flat["position_ids"], batch_size=1)
    # Unflattened (batch of two), flash attention would see no packing and attend across documents.
    assert not _is_packed_sequence(model_inputs(batch)[0]["position_ids"], batch_size=2)


def tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, attn_implementation=attn,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Random init gives near-uniform predictions; larger weights make attention matter to the NLL.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    assert not uses_flash_attention(model)
    return model


def documents() -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(1)
    lengths, docs = (5, 7, 4), []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        # Loss on every token, the first included ("all"-token loss, plain text): the hard case.
        docs.append(doc(ids, [1] * n if i != 1 else [1, 1, 0, 0, 1, 1, 1]))
    return docs


def losses(nll: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Each loss token's NLL, in row-major order (= document order, packed or not)."""
    return nll[mask.bool()].tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_each_token_the_nll_it_has_unpacked(attn):
    model, docs = tiny_llama(attn), documents()
    rows = pack_examples(docs, seq_len=12)
    assert [len(r["input_ids"]) for r in rows] == [12, 4]  # docs 1+2 share a row; doc 3 is padded

    with torch.no_grad():
        reference = losses(*token_nll(model, collate(docs, PAD)))
        packed = losses(*token_nll(model, collate(rows, PAD)))
        flat = losses(*token_nll(model, collate(rows, PAD), flatten=True))
        # The old packing (no position ids, so the padding mask and running positions): doc 2 sees doc 1.
        old = collate([{k: r[k] for k in ("input_ids", "loss_mask")} for r in rows], PAD)
        leaky = losses(*token_nll(model, old))

    assert len(reference) == loss_tokens(docs) == loss_tokens(rows) == 4 + 4 + 3
    assert packed == pytest.approx(reference, abs=1e-5)
    assert flat == pytest.approx(reference, abs=1e-5)
    assert leaky != pytest.approx(reference, abs=1e-3)
