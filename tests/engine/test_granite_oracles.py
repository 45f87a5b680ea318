"""Spec §10.3: our encoder and editor against transformers' independent implementations."""

from __future__ import annotations

import pytest
import torch
from transformers import GraniteConfig, GraniteModel, GraniteSpeechEncoderConfig
from transformers.models.granite_speech.modeling_granite_speech import GraniteSpeechCTCEncoder

from engine.granite_nar.checkpoint import load_model
from engine.granite_nar.config import NarConfig
from engine.granite_nar.model import GraniteSpeechNar
from tests.checkpoints.granite_nar import randomise, tiny_config_dict

ENCODER_TOL = 1e-5
EDITOR_TOL = 1e-5


def tiny_model(conv_kernel_size: int = 5, seed: int = 0) -> GraniteSpeechNar:
    cfg = NarConfig.from_dict(tiny_config_dict(conv_kernel_size))
    return randomise(GraniteSpeechNar(cfg).eval(), seed)


def oracle_encoder(model: GraniteSpeechNar) -> GraniteSpeechCTCEncoder:
    enc = model.cfg.encoder
    config = GraniteSpeechEncoderConfig(
        input_dim=enc.input_dim,
        num_layers=enc.num_layers,
        hidden_dim=enc.hidden_dim,
        num_heads=enc.num_heads,
        dim_head=enc.dim_head,
        feedforward_mult=enc.feedforward_mult,
        conv_kernel_size=enc.conv_kernel_size,
        conv_expansion_factor=enc.conv_expansion_factor,
        context_size=enc.context_size,
        max_pos_emb=enc.max_pos_emb,
        output_dim=enc.output_dim,
    )
    oracle = GraniteSpeechCTCEncoder(config).eval()
    state = {k: v for k, v in model.encoder.state_dict().items() if not k.startswith("out_bpe")}
    oracle.load_state_dict(state, strict=True)
    return oracle


@pytest.mark.parametrize("kernel", [5, 4])
@pytest.mark.parametrize("frames", [20, 57, 3])
def test_encoder_layers_match_transformers(kernel, frames):
    model = tiny_model(kernel)
    oracle = oracle_encoder(model)
    features = torch.randn(2, frames, 160, generator=torch.Generator().manual_seed(frames))
    captured = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: captured.append(o)) for layer in oracle.layers
    ]
    with torch.no_grad():
        oracle(features)
        ours = model.encoder(features, tap_layers=(0, 1, 2, 3, 4))
    for hook in hooks:
        hook.remove()
    # The oracle adds the layer-2 bypass in place into the tensor its hook saw (no clone), so
    # captured[i] is hs[i+1] after the bypass: the NAR model's tap semantics.
    for index, (theirs, mine) in enumerate(zip(captured, ours.taps[1:], strict=True), start=1):
        diff = (theirs - mine).abs().max().item()
        assert diff < ENCODER_TOL, f"layer {index}: max |diff| {diff}"
    assert torch.equal(ours.taps[-1], ours.hidden)


def oracle_editor(model: GraniteSpeechNar) -> GraniteModel:
    text = model.cfg.text
    config = GraniteConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        rope_theta=text.rope_theta,
        embedding_multiplier=text.embedding_multiplier,
        attention_multiplier=text.attention_multiplier,
        residual_multiplier=text.residual_multiplier,
        logits_scaling=text.logits_scaling,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    oracle = GraniteModel(config).eval()
    oracle.load_state_dict(model.language_model.model.state_dict(), strict=True)
    return oracle


def test_editor_body_matches_bidirectional_transformers_granite():
    model = tiny_model()
    oracle = oracle_editor(model)
    lengths = [13, 30, 8]
    gen = torch.Generator().manual_seed(1)
    embeds = torch.randn(sum(lengths), model.cfg.text.hidden_size, generator=gen) * 0.1
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    same = segment[:, None] == segment[None, :]
    mask = torch.zeros(same.shape).masked_fill(~same, torch.finfo(torch.float32).min)
    positions = torch.cat([torch.arange(n) for n in lengths])
    with torch.no_grad():
        theirs = oracle(
            inputs_embeds=embeds[None],
            attention_mask=mask[None, None],
            position_ids=positions[None],
        ).last_hidden_state[0]
        mine = model.language_model(embeds, lengths)
    assert (theirs - mine).abs().max().item() < EDITOR_TOL
    their_logits = theirs @ oracle.embed_tokens.weight.T / model.cfg.text.logits_scaling
    my_logits = model.language_model.logits(mine)
    assert (their_logits - my_logits).abs().max().item() < EDITOR_TOL
    assert torch.equal(their_logits.argmax(-1), my_logits.argmax(-1))


def test_editor_is_bidirectional_and_isolates_samples():
    """Changing a later row changes earlier rows of the same sample only."""
    model = tiny_model()
    lengths = [10, 12]
    embeds = torch.randn(sum(lengths), model.cfg.text.hidden_size)
    with torch.no_grad():
        base = model.language_model(embeds, lengths)
        changed = embeds.clone()
        changed[9] += 1.0  # last row of sample 0
        after = model.language_model(changed, lengths)
    assert not torch.allclose(base[0], after[0])  # earlier row of the same sample: bidirectional
    assert torch.equal(base[10:], after[10:])  # the other sample: untouched


def test_packed_batch_equals_per_sample_runs():
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    dim = model.cfg.text.hidden_size
    audio = [torch.randn(n, dim, generator=gen) * 0.1 for n in (4, 9, 0)]
    slots = [torch.randint(0, 320, (n,), generator=gen) for n in (8, 11, 8)]
    with torch.no_grad():
        packed = model.edit(audio, slots)
        for a, s, out in zip(audio, slots, packed, strict=True):
            alone = model.edit([a], [s])[0]
            assert torch.equal(out.slot_ids, alone.slot_ids)
            assert torch.allclose(out.slot_probs, alone.slot_probs, atol=1e-6)


def test_save_load_round_trip_is_exact(tmp_path, tiny_checkpoint):
    loaded = load_model(tiny_checkpoint)
    from engine.granite_nar.checkpoint import save_model

    again = load_model(save_model(loaded, tmp_path / "copy"))
    first, second = loaded.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    features = torch.randn(1, 40, 160)
    with torch.no_grad():
        assert torch.equal(loaded.encoder(features).hidden, again.encoder(features).hidden)
