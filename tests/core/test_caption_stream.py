"""Captions end to end over the gateway: caption.append / caption.cue on the native protocol,
GET /v1/sessions/{id}/captions.vtt|srt, and the caption delay metric; with EchoEngine and with
real LibriVox speech through the CPU model at real-time pace."""

from __future__ import annotations

import asyncio
import json
import re
import time

import numpy as np
import pytest
from websockets.asyncio.client import connect

from clients.client import StreamscribeClient
from streaming.core.captions import NO_BREAK_AFTER, ROLLUP_ROW_CHARS, timestamp
from streaming.core.stability import word_key
from tests.core.test_caption_export import check_file_cues, parse_srt, parse_vtt
from tests.gateway_harness import EchoEngine, collect, gateway_config, http_get, running
from tests.streams import RATE, chunks, joined, librivox_clips, to_s16le

ORIGIN_MS = 10 * 3_600_000  # programme time 10:00:00.000 at audio time 0


@pytest.fixture(scope="module")
def speech():
    return [audio for _, audio, _ in librivox_clips()]


def url(gateway, query: str = "") -> str:
    return f"ws://127.0.0.1:{gateway.port}/v1/stream{query}"


def check_wire_cues(cues: list[dict], width: int) -> None:
    """caption.cue messages obey the pop-on rules (same checks as for files)."""
    check_file_cues([(c["start_ms"], c["end_ms"], c["lines"]) for c in cues], width)
    assert [c["id"] for c in cues] == list(range(1, len(cues) + 1))


def check_rollup(appends: list[dict]) -> list[str]:
    """Replays caption.append messages: the text on screen only grows, rows hold 32
    characters, ">>" exactly where the channel changes. Returns the rows."""
    rows: list[str] = []
    shown, channel = "", None
    for append in appends:
        changed = channel is not None and append["channel"] != channel
        assert append["speaker_change"] == changed and append["text"].startswith(">> ") == changed
        channel = append["channel"]
        if append["row_break"] or not rows:
            rows.append(append["text"])
        else:
            rows[-1] += append["text"]
        text = "\n".join(rows)
        assert text.startswith(shown) and len(rows[-1]) <= ROLLUP_ROW_CHARS
        shown = text
    return rows


def histogram(metrics: str, name: str, kind: str) -> tuple[int, list[tuple[float, float]]]:
    """(count, [(upper bound, cumulative count)]) of one labelled Prometheus histogram."""
    buckets = [
        (float(le), float(value))
        for le, value in re.findall(
            rf'{name}_bucket\{{kind="{kind}",le="([^"]+)"\}} (\S+)', metrics
        )
    ]
    count = re.search(rf'{name}_count\{{kind="{kind}"\}} (\S+)', metrics)
    return (int(float(count.group(1))) if count else 0), buckets


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus histogram_quantile: linear within the bucket that holds the rank."""
    total = buckets[-1][1]
    rank, lower, below = q * total, 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(cumulative - below, 1e-9)
        lower, below = upper, cumulative
    return lower


def test_popon_cues_over_the_wire_and_as_files(speech):
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with connect(url(gw)) as ws:
                await ws.recv()
                start = {
                    "type": "session.start",
                    "captions": {"mode": "popon", "preset": 32, "hold_back_words": 1},
                    "timecode_origin_ms": ORIGIN_MS,
                }
                await ws.send(json.dumps(start))
                started = json.loads(await ws.recv())
                session = started["session_id"]
                for chunk in chunks(to_s16le(joined(speech[:2])), RATE * 2 // 10):
                    await ws.send(chunk)
                early = await collect(ws, until="caption.cue")
                running_vtt = await http_get(gw.port, f"/v1/sessions/{session}/captions.vtt")
                await ws.send(json.dumps({"type": "close"}))
                messages = early + await collect(ws)
            files = [
                await http_get(gw.port, f"/v1/sessions/{session}/captions.{kind}")
                for kind in ("vtt", "srt")
            ]
            one_channel = await http_get(gw.port, f"/v1/sessions/{session}/captions.srt?channel=0")
            missing = await http_get(gw.port, "/v1/sessions/0123abc/captions.vtt")
            metrics = (await http_get(gw.port, "/metrics"))[2]
        return started, running_vtt, messages, files, one_channel, missing, metrics

    started, running_vtt, messages, files, one_channel, missing, metrics = asyncio.run(main())
    config = started["config"]
    assert (config["captions_mode"], config["captions_preset"]) == ("popon", 32)
    assert config["captions_hold_back_words"] == 1 and config["timecode_origin_ms"] == ORIGIN_MS
    cues = [m for m in messages if m["type"] == "caption.cue"]
    check_wire_cues(cues, 32)
    finals = [m for m in messages if m["type"] == "transcript.final"]
    assert (
        " ".join(" ".join(c["lines"]) for c in cues).split()
        == " ".join(f["text"] for f in finals).split()
    )
    for cue in cues:
        assert cue["start_tc"] == timestamp(cue["start_ms"] + ORIGIN_MS)
        assert cue["end_tc"] == timestamp(cue["end_ms"] + ORIGIN_MS)
        assert set(cue) == {"type", "seq", "channel", "id", "start_ms", "end_ms"} | {
            "start_tc",
            "end_tc",
            "lines",
        }
    # A cue is sent before the final of its segment when the segment is long enough to fill one.
    assert messages.index(cues[0]) < messages.index(finals[-1])
    assert not any(m["type"] == "caption.append" for m in messages)

    status, headers, body = running_vtt
    assert status == 200 and headers["Content-Type"].startswith("text/vtt")
    so_far = parse_vtt(body)
    expected = [(c["start_ms"] + ORIGIN_MS, c["end_ms"] + ORIGIN_MS, c["lines"]) for c in cues]
    assert so_far and so_far == expected[: len(so_far)]
    (vtt_status, _, vtt), (srt_status, srt_headers, srt) = files
    assert vtt_status == srt_status == 200
    assert srt_headers["Content-Type"].startswith("application/x-subrip")
    assert parse_vtt(vtt) == parse_srt(srt) == expected
    assert parse_srt(one_channel[2]) == expected
    assert missing[0] == 404 and "0123abc" in missing[2]
    count, _ = histogram(metrics, "streamscribe_caption_delay_seconds", "cue")
    assert count == len(cues)


def test_rollup_over_two_channels_marks_each_change(speech):
    a, b = speech[1], speech[2]
    gap = np.zeros(RATE, dtype=np.float32)
    quiet = [np.zeros_like(a), np.zeros_like(b)]
    left = np.concatenate([gap, a, gap, quiet[1], gap, a, gap])
    right = np.concatenate([gap, quiet[0], gap, b, gap, quiet[0], gap])
    stereo = to_s16le(np.stack([left, right], axis=1).reshape(-1))

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            query = "?channels=2&captions_mode=rollup&captions_rows=3&captions_hold_back_words=0"
            async with connect(url(gw, query)) as ws:
                await ws.recv()
                for chunk in chunks(stereo, RATE * 4 // 10):
                    await ws.send(chunk)
                await ws.send(json.dumps({"type": "close"}))
                messages = await collect(ws)
            metrics = (await http_get(gw.port, "/metrics"))[2]
            not_kept = await http_get(gw.port, "/v1/sessions/x/captions.vtt")
        return messages, metrics, not_kept

    messages, metrics, not_kept = asyncio.run(main())
    appends = [m for m in messages if m["type"] == "caption.append"]
    assert appends and all(m["rows"] == 3 for m in appends)
    check_rollup(appends)
    assert appends[0]["channel"] == 0 and not appends[0]["row_break"]
    changes = [m["channel"] for m in appends if m["speaker_change"]]
    assert len(changes) >= 2 and changes[:2] == [1, 0]
    for channel in (0, 1):
        said = [m for m in messages if m["type"] == "transcript.final" and m["channel"] == channel]
        shown = " ".join(m["text"] for m in appends if m["channel"] == channel)
        assert shown.replace(">>", " ").split() == " ".join(m["text"] for m in said).split()
    count, _ = histogram(metrics, "streamscribe_caption_delay_seconds", "append")
    assert count == len(appends)
    assert not_kept[0] == 404  # roll-up sessions keep no cues


def test_nested_captions_must_be_an_object_and_known():
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            replies = []
            for captions in ("popon", {"mode": "subtitles"}, {"preset": 40}, {"colour": "red"}):
                async with connect(url(gw)) as ws:
                    await ws.recv()
                    await ws.send(json.dumps({"type": "session.start", "captions": captions}))
                    replies.append(json.loads(await ws.recv()))
        return replies

    not_object, bad_mode, bad_preset, unknown = asyncio.run(main())
    assert not_object["code"] == "invalid_config" and "captions" in not_object["message"]
    assert bad_mode["code"] == "invalid_config" and "captions_mode" in bad_mode["message"]
    assert "captions_preset" in bad_preset["message"] and "32, 37, 42" in bad_preset["message"]
    assert "captions_colour" in unknown["message"]


def test_caption_files_need_the_api_key_when_keys_are_set():
    async def main():
        async with running(gateway_config(api_keys="k1"), EchoEngine()) as gw:
            path = "/v1/sessions/abc/captions.vtt"
            return await http_get(gw.port, path), await http_get(gw.port, path + "?api_key=k1")

    refused, allowed = asyncio.run(main())
    assert refused[0] == 401 and allowed[0] == 404


@pytest.mark.slow
async def paced_session(port: int, pcm: bytes, captions_mode: str) -> list[tuple[float, dict]]:
    """Stream 16 kHz s16 PCM in 100 ms frames at real time with the client; every event with
    its arrival in seconds from the start."""
    timed: list[tuple[float, dict]] = []
    async with StreamscribeClient.connect(
        f"ws://127.0.0.1:{port}", captions_mode=captions_mode
    ) as client:
        t0 = time.monotonic()

        async def read():
            async for event in client.events():
                timed.append((time.monotonic() - t0, event))

        reader = asyncio.create_task(read())
        for k, chunk in enumerate(chunks(pcm, RATE * 2 // 10)):
            await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.1 - time.monotonic()))
            await client.send_audio(chunk)
        await client.close()
        await reader
    return timed


def test_real_speech_captions_at_real_time(capsys):
    """LibriVox clips paced like a live microphone through the CPU model, in a pop-on session and
    then a roll-up one. Prints the caption delay (p95 of the metric)."""
    pytest.importorskip("faster_whisper", reason="pip install -e '.[cpu]'")
    from benchmarks.scoring import corpus_wer
    from engine.whisper import load_engine

    clips = librivox_clips()[:2]
    reference = " ".join(ref for _, _, ref in clips)
    pcm = to_s16le(joined([a for _, a, _ in clips], silence_s=1.0))

    async def session(gw, mode: str) -> tuple[list[dict], list[float]]:
        timed = await paced_session(gw.port, pcm, mode)
        delays = [t - e["end_ms"] / 1000 for t, e in timed if e["type"] == "caption.append"]
        return [e for _, e in timed], delays

    async def main():
        async with running(gateway_config(), load_engine("tiny.en"), timeout_s=120) as gw:
            cued, _ = await session(gw, "popon")
            rolled, delays = await session(gw, "rollup")
            metrics = (await http_get(gw.port, "/metrics"))[2]
        return cued, rolled, delays, metrics

    cued, rolled, client_delays, metrics = asyncio.run(main())
    cues = [m for m in cued if m["type"] == "caption.cue"]
    check_wire_cues(cues, 42)
    lines = [line for c in cues for line in c["lines"]]
    for line, after in zip(lines, lines[1:], strict=False):
        last, first = line.split()[-1], after.split()[0]
        assert word_key(last) not in NO_BREAK_AFTER or not last[-1].isalpha(), (line, after)
        assert not (last[0].isupper() and first[0].isupper() and last[-1].isalpha())
    assert corpus_wer([reference], [" ".join(lines)]) <= 0.2, lines
    rows = check_rollup([m for m in rolled if m["type"] == "caption.append"])
    assert corpus_wer([reference], [" ".join(rows)]) <= 0.2, rows

    p95 = {}
    for kind in ("cue", "append"):
        count, buckets = histogram(metrics, "streamscribe_caption_delay_seconds", kind)
        assert count > 0
        p95[kind] = quantile(0.95, buckets)
    client_p95 = float(np.percentile(client_delays, 95))
    with capsys.disabled():
        print(
            f"\ncaption delay p95 (real time, CPU model): cue {p95['cue']:.2f} s, append "
            f"{p95['append']:.2f} s (client-side append {client_p95:.2f} s)"
        )
    # The target is 3 s; on a CPU shared with other work the engine's own latency dominates.
    assert p95["cue"] <= 10.0 and p95["append"] <= 10.0


def doubled_words(words: list[str], reference: list[str]) -> int:
    """Words that repeat the word before them more often than `reference` has such repeats."""
    def repeats(seq: list[str]) -> int:
        return sum(a == b for a, b in zip(seq, seq[1:], strict=False))

    return max(0, repeats(words) - repeats(reference))


def test_doubled_words_counts_only_repeats_the_reference_lacks():
    assert doubled_words("leisure to to consider".split(), "leisure to consider".split()) == 1
    assert doubled_words("that that is".split(), "that that is".split()) == 0
    assert doubled_words("a b c".split(), "a b b c".split()) == 0


def test_rollup_captions_of_real_speech_neither_drop_nor_double_words():
    """The issue's reproduction: sense_and_sensibility 0870 at real time with roll-up captions
    through the CPU model, three times. The roll-up text must have no doubled word and at most
    the final's word errors against the reference (captions used to read "leisure to to
    consider", "leisure to how much", "Dashwood then" where the finals were right)."""
    pytest.importorskip("faster_whisper", reason="pip install -e '.[cpu]'")
    from benchmarks.scoring import normalise
    from engine.whisper import load_engine

    clip_id, audio, reference = next(c for c in librivox_clips() if c[0].endswith("0870"))
    pcm = to_s16le(joined([audio], silence_s=1.0))

    async def one_run(gw) -> tuple[list[dict], list[dict]]:
        events = [e for _, e in await paced_session(gw.port, pcm, "rollup")]
        appends = [e for e in events if e["type"] == "caption.append"]
        finals = [e for e in events if e["type"] == "transcript.final"]
        return appends, finals

    async def main():
        async with running(gateway_config(), load_engine("tiny.en"), timeout_s=120) as gw:
            return [await one_run(gw) for _ in range(3)]

    truth = normalise(reference).split()
    for appends, finals in asyncio.run(main()):
        captions = normalise(" ".join(check_rollup(appends))).split()
        final = normalise(" ".join(f["text"] for f in finals)).split()
        assert doubled_words(captions, truth) == 0, captions
        caption_errors = word_errors(truth, captions)
        assert caption_errors <= word_errors(truth, final), (clip_id, captions, final)



def word_errors(reference: list[str], hypothesis: list[str]) -> int:
    """Substitutions + deletions + insertions."""
    import jiwer

    if not hypothesis:
        return len(reference)
    out = jiwer.process_words(" ".join(reference), " ".join(hypothesis))
    return out.substitutions + out.deletions + out.insertions
