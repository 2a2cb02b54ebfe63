"""Runs inside vLLM's worker process (``worker_extension_cls``): loads weights sent as bytes.

Tensors passed straight through ``collective_rpc`` arrive as lists, so the learners send one
safetensors blob; it travels through the Ray object store, across nodes as well.
"""

from __future__ import annotations


class WeightSyncExtension:
    """Mixed into vLLM's worker class: ``self`` is the worker."""

    def load_weights_blob(self, blob: bytes, expected_checksum: str) -> str:
        """Load full weights in checkpoint names, only if they are the ones expected: the checksum
        is compared before the engine is touched. Returns the checksum of what was received."""
        from safetensors.torch import load

        from tooltune.weights import tensor_checksum

        state = load(blob)
        got = tensor_checksum(state)
        if got == expected_checksum:
            self.reload_weights(weights_iterator=iter(state.items()))
            self._refresh_tied_lm_head()
        return got

    def _refresh_tied_lm_head(self) -> None:
        # A tied LM head receives no weights of its own, so the in-place reload restores its old
        # kernel state; on CPU that holds a pre-packed GEMM of the old embedding. Re-pack it.
        model = self.model_runner.model
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if lm_head is None or embed is None or not hasattr(lm_head, "quant_method"):
            return
        if lm_head.weight.data_ptr() == embed.weight.data_ptr():
            lm_head.quant_method.process_weights_after_loading(lm_head)
