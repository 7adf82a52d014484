"""Llama shapes the distributed and QLoRA benchmarks build beside ``perf_setup.FULL_LLAMA``
(the ``llama`` model of ``unipeft bench perf --full``)."""

from __future__ import annotations

LLAMA3_8B = {  # Llama-3-8B's shape: the benchmarks' `8b`
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
}
TINY_LLAMA = {  # CPU-sized: the benchmarks' --quick
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
}
