"""Random-weight Granite NAR checkpoints in the official layout, for tests and benchmarks.

`write_tiny_checkpoint` keeps every structural feature of the real model at ~1 M parameters
(spec §10.2) and writes config.json, model.safetensors and a small byte-level BPE tokenizer.
`full_size_config` is the real model's shape, for benchmarks with random weights.
Run `python -m tests.checkpoints.granite_nar OUT_DIR` to write a tiny checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.granite_nar.checkpoint import save_model
from engine.granite_nar.config import NarConfig
from engine.granite_nar.model import GraniteSpeechNar

TINY_VOCAB = 320
PAD_ID, END_OF_TEXT_ID = 0, 1
SPECIAL_TOKENS = ["<|pad|>", "<|end_of_text|>"]

TRAINING_TEXT = """\
the quick brown fox jumps over the lazy dog while the sun shines on the river bank
she sells sea shells by the sea shore and the shells she sells are surely sea shells
every morning the call center opens at eight and the first customers ask about their bills
please hold the line while i transfer your call to the billing department thank you
broadcast news tonight the weather will be cold with rain in the north and wind in the west
numbers one two three four five six seven eight nine ten eleven twelve twenty hundred
"""


def tiny_config_dict(conv_kernel_size: int = 5) -> dict:
    """The spec's tiny NAR config in the current official config.json layout."""
    return {
        "architectures": ["GraniteSpeechNarForASR"],
        "model_type": "granite_speech_nar",
        "blank_token_id": END_OF_TEXT_ID,
        "encoder_config": {
            "input_dim": 160,
            "num_layers": 4,
            "hidden_dim": 32,
            "num_heads": 2,
            "dim_head": 16,
            "feedforward_mult": 2,
            "conv_kernel_size": conv_kernel_size,
            "conv_expansion_factor": 2,
            "context_size": 20,
            "max_pos_emb": 32,
            "output_dim": 12,
            "self_conditioning_layer": 2,
            "bpe_output_dim": TINY_VOCAB,
            "bpe_pooling_window": 4,
            "blank_token_id": END_OF_TEXT_ID,
            "dropout": 0.1,
            "model_type": "granite_speech_nar_encoder",
        },
        "projector_config": {
            "encoder_dim": 32,
            "num_encoder_layers": 4,
            "hidden_size": 48,
            "num_heads": 4,
            "num_layers": 2,
            "block_size": 15,
            "downsample_rate": 5,
            "mlp_ratio": 2,
            "layernorm_eps": 1e-6,
            "attn_bias": True,
            "mlp_bias": True,
            "llm_dim": 64,
            "model_type": "granite_speech_nar_projector",
        },
        "text_config": {
            "model_type": "granite",
            "vocab_size": TINY_VOCAB,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "embedding_multiplier": 12.0,
            "attention_multiplier": 0.0625,
            "residual_multiplier": 0.22,
            "logits_scaling": 8.0,
            "tie_word_embeddings": True,
            "bos_token_id": END_OF_TEXT_ID,
            "eos_token_id": END_OF_TEXT_ID,
            "pad_token_id": PAD_ID,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        },
        "encoder_layer_indices": [1, 2, 3, -1],
        "min_edit_sequence_length": 8,
        "scale_projected_embeddings": True,
        "tie_word_embeddings": True,
    }


def full_size_config() -> NarConfig:
    """The shape of ibm-granite/granite-speech-4.1-2b-nar (spec §2-§4), for benchmarks."""
    raw = tiny_config_dict(conv_kernel_size=15)
    raw["blank_token_id"] = 100257
    raw["encoder_config"].update(
        num_layers=16,
        hidden_dim=1024,
        num_heads=8,
        dim_head=128,
        feedforward_mult=4,
        context_size=200,
        max_pos_emb=512,
        output_dim=348,
        self_conditioning_layer=8,
        bpe_output_dim=100352,
        blank_token_id=100257,
    )
    raw["projector_config"].update(encoder_dim=1024, hidden_size=2048, num_heads=32, llm_dim=2048)
    raw["text_config"].update(
        vocab_size=100352,
        hidden_size=2048,
        intermediate_size=4096,
        num_hidden_layers=40,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        attention_multiplier=0.0078125,
        bos_token_id=100257,
        eos_token_id=100257,
        pad_token_id=100256,
    )
    raw["encoder_layer_indices"] = [4, 8, 12, -1]
    return NarConfig.from_dict(raw)


def build_tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE with the Granite special ids (pad 0, end_of_text 1) and 320 ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    return tokenizer


def fill_seeded(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Seeded values in every floating-point tensor, in state-dict order: norm gains near 1,
    BN variances in [0.5, 1.5), small biases and means, weights scaled by their fan-in (an
    embedding's by its width). Shared by the tiny NAR and AR checkpoints."""
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            shape = tensor.shape
            if name.endswith("running_var"):
                value = 0.5 + torch.rand(shape, generator=gen)
            elif "norm" in name.lower() and name.endswith("weight"):
                value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            elif name.endswith("bias") or name.endswith("running_mean"):
                value = 0.1 * torch.randn(shape, generator=gen)
            elif tensor.dim() >= 2:
                fan_in = shape[-1] if "embed" in name else math.prod(shape[1:])
                value = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
            else:
                value = 0.5 * torch.randn(shape, generator=gen)
            tensor.copy_(value)


def randomise(model: GraniteSpeechNar, seed: int) -> GraniteSpeechNar:
    """Fill every tensor with seeded random values that exercise the whole model: norms that
    are not identity, BN statistics that are not 0/1, a char head whose blank is not always
    the argmax, and a BPE head leaning toward a few ids so drafts hold tokens, repeats and
    blanks."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    with torch.no_grad():
        fill_seeded(model, gen)
        model.encoder.out.bias[0] += 1.0
        favoured = torch.randint(2, cfg.encoder.bpe_output_dim, (6,), generator=gen)
        model.encoder.out_bpe.bias[favoured] += 2.5
        model.encoder.out_bpe.bias[cfg.bpe_blank_index] += 2.0
    return model


def write_tiny_checkpoint(folder: str | Path, seed: int = 0, conv_kernel_size: int = 5) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = NarConfig.from_dict(tiny_config_dict(conv_kernel_size))
    model = randomise(GraniteSpeechNar(cfg).eval(), seed)
    save_model(model, folder)
    tokenizer = build_tiny_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|end_of_text|>",
                "eos_token": "<|end_of_text|>",
                "pad_token": "<|pad|>",
            },
            indent=2,
        )
        + "\n"
    )
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random Granite NAR checkpoint.")
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conv-kernel-size", type=int, default=5)
    args = parser.parse_args()
    print(write_tiny_checkpoint(args.folder, args.seed, args.conv_kernel_size))


if __name__ == "__main__":
    main()
