"""Granite Speech 4.1 2B (autoregressive) as an optional accuracy pass, through transformers.

See `engine.py` for how segments become batched greedy decoding and `prompt.py` for the
prompts (plain ASR, a language hint, keyword biasing, translation).
"""

from .engine import GraniteArEngine, load_engine

__all__ = ["GraniteArEngine", "load_engine"]
