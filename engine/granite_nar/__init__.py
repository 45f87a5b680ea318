"""Granite Speech 4.1 2B NAR: Conformer CTC draft, windowed Q-Former, bidirectional LLM editor.

The module tree and parameter names follow the official checkpoint exactly, so its
`model.safetensors` loads unchanged (see `../shared/docs/granite-speech-4.1.md`).
"""
