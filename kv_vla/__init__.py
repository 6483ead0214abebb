"""kv_vla: a VLA runtime whose chunked, RNN-gated KV cache lives for the whole control episode."""

__version__ = "0.1.0"
