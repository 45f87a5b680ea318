"""Spec-level unit tests for the parts with no external oracle (§10.3 item 4)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.api import Word
from engine.granite_nar.checkpoint import CheckpointError, load_model
from engine.granite_nar.config import ConfigFormatError, NarConfig
from engine.granite_nar.decoding import (
    TokenSpan,
    build_slots,
    collapse,
    draft_spans,
    editor_spans,
    group_words,
    slot_times,
)
from engine.granite_nar.model import GraniteSpeechNar
from engine.granite_nar.windows import merge_words, plan_windows
from tests.checkpoints.granite_nar import randomise, tiny_config_dict


def tiny_model(seed: int = 0) -> GraniteSpeechNar:
    return randomise(GraniteSpeechNar(NarConfig.from_dict(tiny_config_dict())).eval(), seed)


# --- CTC collapse and insertion slots -------------------------------------------------------


def test_collapse_merges_repeats_then_drops_blank():
    blank = 1
    assert collapse([1, 5, 5, 1, 5, 7, 7, 7, 1, 1], blank) == [(5, 1, 2), (5, 4, 4), (7, 5, 7)]
    assert collapse([], blank) == []
    assert collapse([1, 1, 1], blank) == []


def test_slots_interleave_blanks_with_minimum_length():
    assert build_slots([], 1, 8) == [1] * 8
    assert build_slots([7, 9], 1, 8) == [1, 7, 1, 9, 1, 1, 1, 1]
    tokens = [5, 6, 7, 8, 9]
    assert build_slots(tokens, 1, 8) == [1, 5, 1, 6, 1, 7, 1, 8, 1, 9, 1]  # 2n+1 = 11 > 8


def test_draft_spans_time_tokens_by_80ms_windows():
    spans = draft_spans([1, 5, 5, 1, 7], [0.9, 0.8, 0.6, 0.9, 0.5], blank=1)
    assert [(s.token_id, s.start_ms, s.end_ms) for s in spans] == [(5, 80, 240), (7, 320, 400)]
    assert spans[0].prob == pytest.approx(0.7)


def test_inserted_tokens_are_timed_between_their_neighbours():
    draft = [TokenSpan(5, 80, 240, 0.9), TokenSpan(7, 400, 480, 0.9)]
    times = slot_times(draft, 8, duration_ms=1000)
    assert times[:5] == [(0, 80), (80, 240), (240, 400), (400, 480), (480, 1000)]
    assert times[5:] == [(480, 1000)] * 3
    # editor keeps 5, inserts 9 in the gap, substitutes 7 by 8, appends 4 at the end
    spans = editor_spans([1, 5, 9, 8, 4, 1, 1, 1], [1.0] * 8, times, blank=1)
    assert [(s.token_id, s.start_ms, s.end_ms) for s in spans] == [
        (5, 80, 240),
        (9, 240, 400),
        (8, 400, 480),
        (4, 480, 1000),
    ]


def test_group_words_joins_subword_tokens():
    pieces = {10: " hel", 11: "lo", 12: " world", 13: "<eos>"}
    calls = []

    def decode_batch(id_lists):
        calls.append(len(id_lists))
        return ["".join(pieces[i] for i in ids if i != 13) for ids in id_lists]

    spans = [
        TokenSpan(10, 0, 80, 0.5),
        TokenSpan(11, 80, 160, 0.5),
        TokenSpan(13, 160, 240, 1.0),
        TokenSpan(12, 240, 320, 0.8),
    ]
    words = group_words(spans, decode_batch, special={13})
    assert calls == [3, 2]  # every token at once, then every word at once
    assert [(w.word, w.start_ms, w.end_ms) for w, _ in words] == [
        ("hello", 0, 160),
        ("world", 240, 320),
    ]
    assert words[0][0].confidence == pytest.approx(0.5)
    assert [ids for _, ids in words] == [[10, 11], [12]]


# --- Posterior-weighted pooling ---------------------------------------------------------------


def test_bpe_pooling_weights_by_non_blank_posterior():
    model = tiny_model()
    hidden = torch.arange(6, dtype=torch.float32).repeat(32, 1).T[None]  # [1, 6, 32], row t = t
    blank = torch.tensor([[0.0, 0.5, 1.0, 0.75, 0.0, 1.0]])
    pooled = model.encoder.pool_for_bpe(hidden, blank)
    assert pooled.shape == (1, 2, 32)
    first = (0 * 1.0 + 1 * 0.5 + 2 * 0.0 + 3 * 0.25) / (1.75 + 1e-8)
    second = (4 * 1.0 + 5 * 0.0) / (1.0 + 1e-8)  # window padded with weight 0
    assert pooled[0, 0, 0].item() == pytest.approx(first)
    assert pooled[0, 1, 0].item() == pytest.approx(second)
    all_blank = model.encoder.pool_for_bpe(hidden[:, :4], torch.ones(1, 4))
    assert torch.equal(all_blank, torch.zeros(1, 1, 32))  # 0 / (0 + 1e-8), no NaN


def test_ctc_head_only_on_valid_windows():
    model = tiny_model()
    with torch.no_grad():
        enc = model.encode(torch.randn(2, 30, 160), with_taps=False)
        drafts = model.ctc_draft(enc, [30, 9])
    assert [len(d.window_ids) for d in drafts] == [8, 3]  # ceil(L/4)
    assert all(((d.window_probs > 0) & (d.window_probs <= 1)).all() for d in drafts)


# --- Projector ----------------------------------------------------------------------------------


def test_projector_shapes_and_audio_rows():
    model = tiny_model()
    with torch.no_grad():
        enc = model.encode(torch.randn(2, 31, 160), with_taps=True)
        out = model.projector(enc.taps)
        rows = model.audio_embeddings(enc, [31, 12])
    assert out.shape == (2, 9, 64)  # ceil(31/15) * 3 queries
    assert [r.shape[0] for r in rows] == [6, 2]  # floor(L/5)
    scaled = out / model.cfg.text.embedding_multiplier
    assert torch.allclose(rows[0], scaled[0, :6])


def test_projector_queries_start_from_group_means():
    """With the Q-Former residual branches silenced, each output is the learned query plus the
    mean of its 5 frames; window positions enter through keys/values only."""
    model = tiny_model()
    proj = model.projector
    with torch.no_grad():
        for layer in proj.qformer.layers:
            layer.cross_attention.o_proj.weight.zero_()
            layer.cross_attention.o_proj.bias.zero_()
            layer.mlp.fc2.weight.zero_()
            layer.mlp.fc2.bias.zero_()
        taps = [torch.randn(1, 15, 32) for _ in range(4)]
        out = proj(taps)
        x = torch.cat([n(h) for n, h in zip(proj.layer_norms, taps, strict=True)], -1)
        x = torch.nn.functional.gelu(proj.layer_projector(x))
        expected = proj.query[0] + x[0].view(3, 5, -1).mean(1)
        expected = proj.out_linear(proj.out_norm(expected))
    assert torch.allclose(out[0], expected, atol=1e-6)


def test_projector_windows_are_independent():
    model = tiny_model()
    torch.manual_seed(0)  # unseeded, about one draw in a few hundred left the window unchanged
    taps = [torch.randn(1, 30, 32) for _ in range(4)]
    changed = [t.clone() for t in taps]
    for t in changed:
        t[:, 20] += 3.0  # a frame of the second window
    with torch.no_grad():
        a, b = model.projector(taps), model.projector(changed)
    assert torch.equal(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


# --- Config and checkpoint loading -------------------------------------------------------------


def test_legacy_config_keys_are_accepted():
    raw = tiny_config_dict()
    text = raw.pop("text_config")
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"] * 2
    raw.update(model_type="nle", llm_config=text)
    raw["encoder_config"]["bpe_output_dim"] = 321
    cfg = NarConfig.from_dict(raw)
    assert cfg.layout == "legacy" and cfg.text.rope_theta == 20000.0
    assert cfg.bpe_blank_index == 0 and cfg.bpe_id_offset == -1
    model = randomise(GraniteSpeechNar(cfg).eval(), 0)
    with torch.no_grad():
        enc = model.encode(torch.randn(1, 40, 160), with_taps=False)
        draft = model.ctc_draft(enc, [40])[0]
    assert ((draft.window_ids >= 0) & (draft.window_ids < 320)).all()


def test_config_missing_key_is_named():
    raw = tiny_config_dict()
    del raw["encoder_config"]["hidden_dim"]
    with pytest.raises(ConfigFormatError, match="hidden_dim"):
        NarConfig.from_dict(raw)


def test_config_ignores_unknown_top_level_keys():
    raw = tiny_config_dict()
    raw.update(auto_map={"AutoModel": "x"}, transformers_version="5.5.3", audio_token_id=5)
    assert NarConfig.from_dict(raw).blank_token_id == 1


def test_missing_extra_and_misshaped_tensors_are_listed_together(tmp_path, tiny_checkpoint):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((tiny_checkpoint / name).read_bytes())
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    del state["encoder.out_bpe.bias"]
    del state["projector.query"]
    state["encoder.extra.weight"] = torch.zeros(2)
    state["language_model.model.norm.weight"] = torch.zeros(3)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    message = str(err.value)
    for name in (
        "encoder.out_bpe.bias",
        "projector.query",
        "encoder.extra.weight",
        "language_model.model.norm.weight: file (3,), model (64,)",
    ):
        assert name in message
    assert "missing (2)" in message and "unexpected (1)" in message


def test_sharded_checkpoint_loads(tmp_path, tiny_checkpoint):
    folder = tmp_path / "sharded"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((tiny_checkpoint / name).read_bytes())
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_model(folder).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_load_in_bfloat16_keeps_integer_buffers(tiny_checkpoint):
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    state = model.state_dict()
    assert state["encoder.input_linear.weight"].dtype == torch.bfloat16
    assert state["encoder.layers.0.conv.batch_norm.num_batches_tracked"].dtype == torch.int64


# --- Long audio windows ---------------------------------------------------------------------


def test_windows_cover_the_audio_with_overlap():
    assert plan_windows(100, 200, 50) == [(0, 100)]
    ranges = plan_windows(1000, 300, 100)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1000
    for (_, a1), (b0, b1) in zip(ranges, ranges[1:], strict=False):
        assert a1 - b0 >= 100 and b1 - b0 == 300


def test_merge_keeps_each_word_once():
    sr = 1000  # 1 sample = 1 ms keeps the arithmetic readable
    ranges = [(0, 3000), (2000, 5000)]
    first = [
        (Word("a", 100, 400, 1.0), [1]),
        (Word("b", 2300, 2600, 1.0), [2]),
        (Word("c", 2600, 2990, 0.5), [3]),
    ]
    second = [
        (Word("b", 300, 600, 1.0), [2]),
        (Word("c", 600, 1000, 0.9), [3]),
        (Word("d", 1500, 1800, 1.0), [4]),
    ]
    merged = merge_words([first, second], ranges, sr)
    assert [(w.word, w.start_ms) for w, _ in merged] == [
        ("a", 100),
        ("b", 2300),
        ("c", 2600),
        ("d", 3500),
    ]
    assert merged[2][0].confidence == 0.9  # the word near the cut comes from the later window
