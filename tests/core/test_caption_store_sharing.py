"""CaptionStore with a sink and mirrored sessions: what another instance's cues do to the store
(streaming/transport/caption_share.py feeds it; here it is fed directly)."""

from __future__ import annotations

from streaming.core.captions import CaptionStore
from streaming.core.events import CaptionCue


def cue(n: int, channel: int = 0) -> CaptionCue:
    return CaptionCue(n, channel, n * 1000, n * 1000 + 900, [f"cue {n}"], 0, "", "")


class Sink:
    def __init__(self) -> None:
        self.said: list[tuple] = []

    def opened(self, session_id: str, origin_ms: int) -> None:
        self.said.append(("opened", session_id, origin_ms))

    def added(self, session_id: str, origin_ms: int, cue: CaptionCue) -> None:
        self.said.append(("added", session_id, origin_ms, cue.id))


def test_own_sessions_go_to_the_sink_and_mirrored_ones_do_not():
    sink = Sink()
    store = CaptionStore(10, 100, sink=sink)
    store.open("mine", 5)
    store.add("mine", cue(1))
    store.mirror("theirs", 7, [cue(1), cue(2)])
    store.add("theirs", cue(3))  # not this instance's session: not added, not said
    assert sink.said == [("opened", "mine", 5), ("added", "mine", 5, 1)]
    assert [c.id for c in store.cues("theirs")[0]] == [1, 2] and store.cues("theirs")[1] == 7
    assert store.is_local("mine") and not store.is_local("theirs") and not store.is_local("x")


def test_mirrored_cues_merge_by_id_and_a_restart_starts_over():
    store = CaptionStore(10, 100)
    store.mirror("s", 0, [cue(2)])  # heard live before the catch-up read the older ones
    store.mirror("s", 0, [cue(1), cue(2), cue(3)])
    assert [c.id for c in store.cues("s")[0]] == [1, 2, 3] and store.total == 3
    store.mirror("s", 0, [], fresh=True)
    assert store.cues("s")[0] == [] and store.total == 0


def test_an_own_session_is_never_overwritten_by_a_mirror():
    store = CaptionStore(10, 100)
    store.open("s", 0)
    store.add("s", cue(1))
    store.mirror("s", 99, [cue(5)], fresh=True)
    assert [c.id for c in store.cues("s")[0]] == [1] and store.cues("s")[1] == 0


def test_mirrored_sessions_share_the_bounds():
    store = CaptionStore(2, 4)
    store.open("old", 0)
    store.add("old", cue(1))
    store.mirror("a", 0, [cue(1)])
    store.mirror("b", 0, [cue(1)])  # a third session: the least recent ("old") goes
    assert set(store.sessions) == {"a", "b"}
    store.mirror("b", 0, [cue(2), cue(3), cue(4)])  # 5 cues in all: "a" goes
    assert set(store.sessions) == {"b"} and store.total == 4
    store.mirror("b", 0, [cue(5)])  # alone and over: its oldest cue goes, and may come again
    assert [c.id for c in store.cues("b")[0]] == [2, 3, 4, 5] and store.total == 4
