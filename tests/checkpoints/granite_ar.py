"""Random-weight Granite Speech AR checkpoints, written by transformers itself, for tests.

`write_tiny_ar_checkpoint` builds the 4.1-2b shape at ~0.25 M parameters (spec §10.3 item 5:
untied head, no LoRA, BLIP-2 Q-Former projector, audio token = last id) and saves it with
`save_pretrained`, so the files carry the official (original-format) tensor names, plus a
tokenizer.json whose special ids line up with the config.
Run `python -m tests.checkpoints.granite_ar OUT_DIR` to write one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from engine.granite_ar.checkpoint import quiet_progress
from engine.granite_ar.prompt import AUDIO_TOKEN, END_OF_ROLE, END_OF_TEXT, START_OF_ROLE
from tests.checkpoints.granite_nar import (
    TINY_VOCAB,
    build_tiny_tokenizer,
    fill_seeded,
    tiny_config_dict,
)

# The NAR tokenizer's ids (pad 0, end_of_text 1, BPE up to 319), then the two chat-template
# role tokens and, last as in the real 100353-id vocabulary, the audio placeholder.
AUDIO_TOKEN_ID = TINY_VOCAB + 2
TINY_AR_VOCAB = AUDIO_TOKEN_ID + 1
ENCODER_KEYS = (
    "input_dim",
    "num_layers",
    "hidden_dim",
    "num_heads",
    "dim_head",
    "feedforward_mult",
    "conv_kernel_size",
    "conv_expansion_factor",
    "context_size",
    "max_pos_emb",
    "output_dim",
)
# Random weights steered toward useful test output: audio rows loud next to the text embeddings
# (what the model writes depends on what it hears), and head rows of word-start tokens and of
# end-of-text scaled up (texts split into words, and some samples stop on their own).
AUDIO_GAIN = 4.0
WORD_START_GAIN = 2.0
END_OF_TEXT_GAIN = 2.0


def tiny_ar_config():
    """A GraniteSpeechConfig with the NAR tiny encoder and text model (spec §10.2) and a tiny
    BLIP-2 Q-Former; 1024 positions leave room for a 30 s window's prompt and budget."""
    from transformers import GraniteSpeechConfig

    nar = tiny_config_dict()
    encoder = {key: nar["encoder_config"][key] for key in ENCODER_KEYS}
    text = {
        **nar["text_config"],
        "vocab_size": TINY_AR_VOCAB,
        "tie_word_embeddings": False,
        "max_position_embeddings": 1024,
    }
    projector = {
        "model_type": "blip_2_qformer",
        "hidden_size": 48,
        "num_attention_heads": 4,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "cross_attention_frequency": 1,
        "encoder_hidden_size": encoder["hidden_dim"],
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
    }
    return GraniteSpeechConfig(
        encoder_config=encoder,
        text_config=text,
        projector_config=projector,
        audio_token_index=AUDIO_TOKEN_ID,
        has_lora_adapter=False,
        tie_word_embeddings=False,
        window_size=15,
        downsample_rate=5,
    )


def build_tiny_ar_tokenizer() -> Tokenizer:
    """The NAR tiny byte-level BPE plus the role and audio tokens at the config's ids."""
    tokenizer = build_tiny_tokenizer()
    added = [START_OF_ROLE, END_OF_ROLE, AUDIO_TOKEN]
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in added])
    return tokenizer


def randomise(model: torch.nn.Module, seed: int, tokenizer: Tokenizer) -> torch.nn.Module:
    """Seeded values everywhere (norms that are not identity, BN statistics that are not 0/1),
    then the gains above."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fill_seeded(model, gen)
        model.model.projector.linear.weight *= AUDIO_GAIN
        word_starts = [i for token, i in tokenizer.get_vocab().items() if token.startswith("Ġ")]
        model.lm_head.weight[word_starts] *= WORD_START_GAIN
        model.lm_head.weight[tokenizer.token_to_id(END_OF_TEXT)] *= END_OF_TEXT_GAIN
    return model


def write_tiny_ar_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """config.json + model.safetensors (official names) + tokenizer.json in `folder`."""
    from transformers import GraniteSpeechForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = GraniteSpeechForConditionalGeneration(tiny_ar_config()).eval()
    tokenizer = build_tiny_ar_tokenizer()
    with quiet_progress():
        randomise(model, seed, tokenizer).save_pretrained(str(folder))
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random Granite AR checkpoint.")
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_tiny_ar_checkpoint(args.folder, args.seed))


if __name__ == "__main__":
    main()
