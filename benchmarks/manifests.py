"""Speech with reference transcripts for the WER benchmark and the tests, built at run time.

No audio is committed: the LibriVox and `cards` clips come from Debian's pocketsphinx-testdata,
synthetic speech is generated with espeak-ng, and telephony copies are derived from either. A
manifest is a list of `Utterance`s; anything generated is written under a folder the caller
chooses.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf

from engine.api import TARGET_SAMPLE_RATE
from engine.audio import resample
from streaming.core.audiofile import read_audio

LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
CARDS_DIR = Path("/usr/share/pocketsphinx/test/data/cards")
TELEPHONY_RATE = 8000
ESPEAK_VOICE = "en-us"
ESPEAK_WORDS_PER_MINUTE = 150

# Everyday sentences of different shapes (questions, instructions, numbers, names of days), so
# the synthetic set is not one long list of statements. Numbers are words, as a person says them;
# the normaliser turns them into digits on both sides before scoring.
SENTENCES = (
    "Please leave the package at the front door if nobody answers.",
    "The weather was cold and windy, so we stayed inside and read.",
    "She bought three apples, two oranges and a loaf of bread.",
    "Our meeting has been moved to Thursday afternoon.",
    "Can you tell me how to get to the nearest train station?",
    "The children played in the garden until the sun went down.",
    "He has worked at the hospital for twenty years.",
    "I would like to book a table for four people tonight.",
    "The library closes early on Sundays during the summer.",
    "Turn left at the second traffic light and park behind the bank.",
    "The river flooded the valley after a week of heavy rain.",
    "Thank you for calling, an agent will be with you shortly.",
    "We need to finish the report before the end of the month.",
    "The old man told us a story about his first job.",
    "There are sixty minutes in an hour and twenty four hours in a day.",
    "Could you please speak a little more slowly?",
    "The price of the ticket went up by ten dollars last year.",
    "A small dog was sleeping in the shade of the big tree.",
    "Remember to water the plants while I am away.",
    "The doctor said I should drink more water and get some rest.",
)

# pocketsphinx `transcription` lines: "<s> words </s> (utterance-id)"
_TRANSCRIPTION_LINE = re.compile(r"<s>\s+(?P<text>.*?)\s+</s>\s+\((?P<id>[^()\s]+)\)")


class Utterance(NamedTuple):
    id: str
    audio: Path
    reference: str


Manifest = list[Utterance]


class ManifestError(RuntimeError):
    """A manifest cannot be built; the message says what is missing and how to install it."""


def librivox(folder: Path = LIBRIVOX_DIR) -> Manifest:
    """The LibriVox clips of pocketsphinx-testdata (16 kHz mono WAV) with their references."""
    return _pocketsphinx(Path(folder) / "transcription", "LibriVox")


def cards(folder: Path = CARDS_DIR) -> Manifest:
    """The `cards` recordings of pocketsphinx-testdata (16 kHz mono WAV): another speaker than
    LibriVox's, in short phrases a live caption must get whole ("four queen of clubs")."""
    return _pocketsphinx(Path(folder) / "cards.transcription", "cards")


def _pocketsphinx(transcription: Path, name: str) -> Manifest:
    """A pocketsphinx `transcription` file and the `<id>.wav` files beside it."""
    if not transcription.is_file():
        raise ManifestError(
            f"no {name} references at {transcription}: apt-get install pocketsphinx-testdata"
        )
    manifest = []
    for number, line in enumerate(transcription.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        match = _TRANSCRIPTION_LINE.fullmatch(line.strip())
        if match is None:
            raise ManifestError(f"{transcription}:{number}: not '<s> text </s> (id)': {line!r}")
        audio = transcription.parent / f"{match['id']}.wav"
        if not audio.is_file():
            raise ManifestError(f"{transcription}:{number}: audio file {audio} is missing")
        manifest.append(Utterance(match["id"], audio, match["text"]))
    if not manifest:
        raise ManifestError(f"{transcription} lists no utterances")
    return manifest


def espeak(folder: Path, n: int = len(SENTENCES)) -> Manifest:
    """The first `n` of SENTENCES spoken by espeak-ng, as 16 kHz 16-bit mono WAV in `folder`.

    espeak-ng writes its voice's native rate (22.05 kHz for en-us), so each file is read back and
    resampled to 16 kHz rather than trusting a fixed rate.
    """
    if not 1 <= n <= len(SENTENCES):
        raise ValueError(f"n must be in 1..{len(SENTENCES)}, got {n}")
    program = shutil.which("espeak-ng")
    if program is None:
        raise ManifestError("espeak-ng is not installed: apt-get install espeak-ng")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = []
    for index, sentence in enumerate(SENTENCES[:n], 1):
        uid = f"espeak-{index:02d}"
        raw = folder / f"{uid}.native.wav"
        command = [program, "-v", ESPEAK_VOICE, "-s", str(ESPEAK_WORDS_PER_MINUTE), "-w", str(raw)]
        done = subprocess.run([*command, sentence], capture_output=True, text=True)
        if done.returncode != 0 or not raw.is_file():
            raise ManifestError(f"espeak-ng failed on {uid}: {done.stderr.strip()}")
        samples, rate = read_audio(raw)
        raw.unlink()
        target = folder / f"{uid}.wav"
        speech = np.clip(resample(samples, rate, TARGET_SAMPLE_RATE), -1.0, 1.0)
        sf.write(target, speech, TARGET_SAMPLE_RATE, subtype="PCM_16")
        manifest.append(Utterance(uid, target, sentence))
    return manifest


def mulaw_8k(manifest: Manifest, folder: Path) -> Manifest:
    """The same utterances as 8 kHz G.711 mu-law WAV in `folder`, as a phone line delivers them.

    Resampled with the project's anti-aliasing resampler first, so what is measured is the
    telephony penalty (narrow band + 8-bit companding), not aliasing from a crude downsampler.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for utterance in manifest:
        samples, rate = read_audio(utterance.audio)
        # The filter can overshoot a full-scale peak; clip rather than let the encoder wrap it.
        narrow = np.clip(resample(samples, rate, TELEPHONY_RATE), -1.0, 1.0)
        target = folder / f"{utterance.id}.wav"
        if target.resolve() == Path(utterance.audio).resolve():
            raise ValueError(f"{folder} holds the source audio; give mulaw_8k another folder")
        sf.write(target, narrow, TELEPHONY_RATE, subtype="ULAW")
        copies.append(utterance._replace(audio=target))
    return copies
