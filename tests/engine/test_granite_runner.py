"""The Granite NAR model runner (engine/granite_nar/runner.py): bucketed shapes, FlexAttention
over packed rows and torch.compile must give what the eager reference gives."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters
from websockets.asyncio.client import connect

from engine.api import EngineOptions, Segment
from engine.granite_nar.editor import (
    FLEX_BLOCK,
    FlexPackedAttention,
    PaddedAttention,
    document_blocks,
)
from engine.granite_nar.engine import GraniteNarEngine, bucket_batches, load_engine
from engine.granite_nar.model import EditPlan
from engine.granite_nar.runner import ModelRunner, bucket_frames
from engine.granite_nar.transfer import copy_once
from streaming.ops.config import load_config
from tests.gateway_harness import collect, gateway_config, running
from tests.streams import chunks, joined, librivox_clips, to_s16le

RATE = 16000  # tests.streams' rate too
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * RATE)) * 0.1).astype(np.float32)


def engine_in(tiny_engine: GraniteNarEngine, mode: str) -> GraniteNarEngine:
    engine = GraniteNarEngine(tiny_engine.model, tiny_engine.tokenizer)
    engine.runner = ModelRunner(tiny_engine.model, mode)
    return engine


# lengths that cross the tiny encoder's 20-frame attention blocks, 4-frame BPE windows and
# 15-frame projector blocks at different points, and two batches in one 2 s bucket
BATCHES = [[1.13, 1.52, 1.97], [0.31, 0.9], [2.71], [1.2, 1.21, 1.6, 1.9]]


def test_bucket_frames_follow_the_scheduler_buckets():
    assert bucket_frames(1) == 50 and bucket_frames(50) == 50
    assert bucket_frames(51) == 100 and bucket_frames(401) == 800
    assert bucket_frames(1601) == 3200  # past the largest bucket: its multiples
    assert all(bucket_frames(f) >= f for f in range(1, 2000, 7))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=6), st.integers(0, 2**16))
def test_flex_attention_over_packed_rows_equals_the_padded_reference(lengths, seed):
    torch.manual_seed(seed)
    total = sum(lengths)
    plan = EditPlan.build(
        [0] * len(lengths), [0] * len(lengths), 0, [[0] * n for n in lengths], FLEX_BLOCK
    )
    assert len(plan.documents) % FLEX_BLOCK == 0 and len(plan.documents) - total < FLEX_BLOCK
    blocks = copy_once(document_blocks(plan.documents), torch.device("cpu"))
    flex = FlexPackedAttention(torch.from_numpy(plan.documents), blocks)
    rows = len(plan.documents)
    q, k, v = torch.randn(rows, 4, 8), torch.randn(rows, 2, 8), torch.randn(rows, 2, 8)
    reference = PaddedAttention.on(lengths, torch.device("cpu"))(
        q[:total], k[:total], v[:total], 0.3
    )
    torch.testing.assert_close(flex(q, k, v, 0.3)[:total], reference, atol=1e-5, rtol=1e-5)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(1, 30)), min_size=1, max_size=6),
    st.integers(0, 5),
    st.sampled_from([1, 8, FLEX_BLOCK]),
)
def test_edit_plan_packs_each_sample_as_its_audio_then_its_slots(samples, spare, pad_to):
    """Rows gathered by the plan from [audio rows ; slot rows] are, sample by sample, its own
    audio rows in order then its slots; positions restart per sample; text rows point at the
    slots; padding rows form a document of their own."""
    width = max(a for a, _ in samples) + spare  # audio rows per sample in the batch tensor
    starts = [i * width for i in range(len(samples))]
    slots = [[1000 * i + j for j in range(n)] for i, (_, n) in enumerate(samples)]
    audio_total = width * len(samples)
    plan = EditPlan.build([a for a, _ in samples], starts, audio_total, slots, pad_to)
    labels = [("audio", i, r) for i in range(len(samples)) for r in range(width)]
    labels += [("slot", i, j) for i, (_, n) in enumerate(samples) for j in range(n)]
    packed = [labels[g] for g in plan.gather]
    expected, documents = [], []
    for i, (a, n) in enumerate(samples):
        expected += [("audio", i, r) for r in range(a)] + [("slot", i, j) for j in range(n)]
        documents += [i] * (a + n)
    total = len(expected)
    assert packed[:total] == expected and len(packed) % pad_to == 0
    assert len(packed) - total < pad_to
    assert plan.documents.tolist() == documents + [len(samples)] * (len(packed) - total)
    assert [packed[r] for r in plan.text_rows] == [
        ("slot", i, j) for i, (_, n) in enumerate(samples) for j in range(n)
    ]
    assert plan.slot_ids.tolist() == [t for s in slots for t in s]
    assert plan.position[:total].tolist() == [p for a, n in samples for p in range(a + n)]


def test_block_layout_skips_blocks_that_share_no_document():
    documents = np.repeat([0, 1, 2], [FLEX_BLOCK * 2, FLEX_BLOCK, FLEX_BLOCK // 2])
    documents = np.concatenate([documents, np.full(FLEX_BLOCK // 2, 3)])
    layout = document_blocks(documents)
    # blocks 0-1: document 0 only (full to each other); block 2: document 1; block 3: 2 and 3
    assert layout["full_num"].tolist() == [2, 2, 1, 0]
    assert layout["kv_num"].tolist() == [0, 0, 0, 1]
    assert layout["full_idx"][0, :2].tolist() == [0, 1] and layout["kv_idx"][3, 0] == 3


@pytest.mark.parametrize("batch", BATCHES)
def test_bucket_padding_leaves_every_real_frame_as_the_reference(tiny_engine, batch):
    model = tiny_engine.model
    waves = [noise(s, i) for i, s in enumerate(batch)]
    eager = ModelRunner(model, "eager").encode(waves, with_taps=True)
    bucketed = ModelRunner(model, "bucketed").encode(waves, with_taps=True)
    assert bucketed.frames == bucket_frames(eager.frames) > eager.frames
    frames = eager.frames
    torch.testing.assert_close(bucketed.encoded.hidden[:, :frames], eager.encoded.hidden)
    for a, b in zip(bucketed.encoded.taps, eager.encoded.taps, strict=True):
        torch.testing.assert_close(a[:, :frames], b)
    assert bucketed.ctc_ids == eager.ctc_ids
    for a, b in zip(bucketed.ctc_probs, eager.ctc_probs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    rows = [n // 5 for n in eager.lengths]
    with torch.inference_mode():
        mine, reference = (model.projected(x.encoded) for x in (bucketed, eager))
    for i, n in enumerate(rows):
        torch.testing.assert_close(mine[i, :n], reference[i, :n])


@settings(max_examples=25, deadline=None, derandomize=True)  # float ties: a fixed sample
@given(st.lists(st.integers(320, 3 * RATE), min_size=1, max_size=4), st.integers(0, 2**16))
def test_any_batch_keeps_its_ctc_draft_when_bucketed(tiny_engine, sizes, seed):
    """For any window lengths (one encoder frame to 3 s), bucket padding changes no CTC id
    and no probability beyond float noise."""
    waves = [noise(n / RATE, seed + i) for i, n in enumerate(sizes)]
    eager = ModelRunner(tiny_engine.model, "eager").encode(waves, with_taps=False)
    bucketed = ModelRunner(tiny_engine.model, "bucketed").encode(waves, with_taps=False)
    assert bucketed.frames == bucket_frames(eager.frames)
    assert bucketed.ctc_ids == eager.ctc_ids
    for a, b in zip(bucketed.ctc_probs, eager.ctc_probs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_without_bucket_padding_the_encoder_is_unchanged(tiny_engine):
    """Passing `valid` equal to the frame count masks nothing the reference does not."""
    features = torch.randn(2, 47, 160)
    model = tiny_engine.model
    with torch.no_grad():
        plain = model.encode(features, with_taps=True)
        masked = model.encode(features, with_taps=True, valid=47)
    torch.testing.assert_close(masked.hidden, plain.hidden)


def assert_same_transcripts(engine, reference, batches, seed: int) -> None:
    """`draft` and `transcribe` of every batch: the same tokens, text and words as `reference`."""
    for batch in batches:
        segments = [Segment(noise(s, i + seed)) for i, s in enumerate(batch)]
        for call in ("draft", "transcribe"):
            mine, expected = (getattr(e, call)(segments) for e in (engine, reference))
            for a, b in zip(mine, expected, strict=True):
                assert a.token_ids == b.token_ids and a.text == b.text
                assert all(type(t) is int for t in a.token_ids + b.token_ids)  # JSON-ready
                assert [w.word for w in a.words] == [w.word for w in b.words]
                assert a.confidence == pytest.approx(b.confidence, rel=1e-4)


def test_bucketed_engine_gives_the_eager_transcripts(tiny_engine):
    assert_same_transcripts(engine_in(tiny_engine, "bucketed"), tiny_engine, BATCHES, seed=10)


def test_bucketed_bf16_agrees_with_eager_bf16(tiny_checkpoint):
    """bf16 rounding differs between padded shapes: the argmax must still agree almost
    everywhere (spec §10: CTC hypotheses may flip on marginal frames)."""
    engine = load_engine(str(tiny_checkpoint), EngineOptions(device="cpu", dtype="bfloat16"))
    waves = [noise(s, i) for i, s in enumerate([1.13, 1.52, 1.97, 2.71])]
    eager = ModelRunner(engine.model, "eager").encode(waves, with_taps=False)
    bucketed = ModelRunner(engine.model, "bucketed").encode(waves, with_taps=False)
    pairs = zip(eager.ctc_ids, bucketed.ctc_ids, strict=True)
    same = sum(x == y for a, b in pairs for x, y in zip(a, b, strict=True))
    total = sum(len(a) for a in eager.ctc_ids)
    assert same / total >= 0.95


def test_an_unknown_mode_is_refused(tiny_engine):
    with pytest.raises(ValueError, match="compiled"):
        ModelRunner(tiny_engine.model, "fast")


def test_the_compile_setting_reaches_the_runner(tiny_checkpoint):
    cfg = load_config(env={}, overrides={"engine.compile": "true"})
    assert cfg.engine.compile is True
    assert load_config(env={"STREAMSCRIBE_ENGINE__COMPILE": "true"}).engine.compile is True
    keywords = cfg.engine.load_keywords(str(tiny_checkpoint))
    keywords.update(device="cpu", dtype="float32")
    from engine import selection

    assert selection.load_engine(**keywords).runner.mode == "compiled"
    assert load_engine(str(tiny_checkpoint)).runner.mode == "eager"


@pytest.fixture(scope="module")
def compiled_engine(tiny_checkpoint):
    options = EngineOptions(device="cpu", dtype="float32", compile=True)
    return load_engine(str(tiny_checkpoint), options)


def test_compiled_engine_is_argmax_identical_and_compiles_once_per_shape_family(
    compiled_engine, tiny_engine
):
    """fp32 on tiny weights: torch.compile (inductor, CPU) gives the eager tokens exactly; after
    the warm-up at load, no length, bucket or batch size compiles anything new."""
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    batches = [*BATCHES, [4.5, 6.1, 9.7], [12.0], [1.05, 1.33, 1.66, 1.99, 1.5]]
    assert_same_transcripts(compiled_engine, tiny_engine, batches, seed=20)
    assert counters["stats"]["unique_graphs"] == graphs
    assert counters["frames"]["total"] == counters["frames"]["ok"]  # no eager fallback
    assert not any("recompile limit" in reason for reason in counters["unimplemented"])


def test_the_compiled_engine_serves_streams_with_the_eager_finals(compiled_engine, tiny_engine):
    """Real speech through the running server, one stream at a time (so each final is its own
    batch): the compiled engine's finals are the eager engine's."""
    speech = joined([audio for _, audio, _ in librivox_clips()[:2]], silence_s=1.5)

    async def stream(engine) -> list[dict]:
        async with running(gateway_config(), engine) as gateway:
            async with connect(f"ws://127.0.0.1:{gateway.port}/v1/stream") as ws:
                for chunk in chunks(to_s16le(speech), RATE * 2 // 10):
                    await ws.send(chunk)
                    await asyncio.sleep(0.02)
                await ws.send(json.dumps({"type": "close"}))
                messages = await collect(ws)
        return [(m["text"], m["start_ms"]) for m in messages if m["type"] == "transcript.final"]

    compiled, eager = (asyncio.run(stream(e)) for e in (compiled_engine, tiny_engine))
    assert len(compiled) >= 2 and compiled == eager


def test_batches_hold_one_length_bucket_each():
    pieces = [(0, 0, 30 * RATE), (1, 0, RATE // 2), (2, 0, 3 * RATE), (3, 0, RATE), (4, 0, 40)]
    batches = bucket_batches(pieces, max_batch=2)
    assert batches == [
        [(4, 0, 40), (1, 0, RATE // 2)],
        [(3, 0, RATE)],
        [(2, 0, 3 * RATE)],
        [(0, 0, 30 * RATE)],
    ]
    many = [(i, 0, RATE + 100 + i) for i in range(5)]  # all in the 2 s bucket
    assert bucket_batches(many, max_batch=2) == [many[:2], many[2:4], many[4:]]


def test_a_short_window_is_not_padded_to_a_long_one(tiny_engine):
    """Batched with a 9 s segment, a 1 s segment gets exactly what it gets alone (one bucket per
    model batch); in one padded batch its encoder would see 8 s of padding."""
    short, long = Segment(noise(1.0, 1)), Segment(noise(9.0, 2))
    for call in ("draft", "transcribe"):
        together = getattr(tiny_engine, call)([long, short])
        assert together[1] == getattr(tiny_engine, call)([short])[0]
        assert together[0] == getattr(tiny_engine, call)([long])[0]
