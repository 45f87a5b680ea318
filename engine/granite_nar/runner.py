"""The model runner: moves a batch of windows through the NAR model with as few device round
trips as the algorithm allows, eagerly (the reference) or compiled.

Per batch: one host-to-device copy of the padded waveforms; one device-to-host copy of the CTC
argmax ids and probabilities of every pooled window (the host needs them to build the editor's
slots, spec §5); one host-to-device copy of everything the editor's packing needs (slot ids,
gather index, positions, document ids and the attention's block layout, all worked out on the
host from lengths it already knows); one device-to-host copy of the editor's ids and
probabilities. Nothing else waits on the device.

Mode "compiled" ("bucketed" is the same without `torch.compile`): the frames of a batch are
padded up to the scheduler's length bucket (`engine.api.length_bucket`) and the packed editor
rows up to a multiple of `FLEX_BLOCK`, so compiled shapes come from a small fixed set; the
encoder masks the bucket padding so that every real frame comes out as in the eager reference
(encoder.py); the editor attends with FlexAttention over the packed rows (editor.py); and each
encoder block and each editor layer runs through a `torch.compile`d call (regional compilation:
one graph serves all 16 blocks, another all 40 layers, so compiling takes a layer's time, not
a whole model's). Graphs are made per length bucket (`warm_up` makes them all before serving);
batch size and packed editor rows become symbolic, so new batches compile nothing. Features,
pooling, projector and heads stay eager: a handful of kernels per batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..api import LENGTH_BUCKETS_S, length_bucket
from ..features import SAMPLES_PER_FEATURE, nar_batch
from .editor import FLEX_BLOCK, FlexPackedAttention, PaddedAttention, document_blocks
from .encoder import EncoderOutput, call_layer
from .model import EditPlan, EditTensors, GraniteSpeechNar
from .transfer import copy_once

FRAMES_PER_SECOND = 16000 // SAMPLES_PER_FEATURE
GRAPHS_PER_FUNCTION = 64


def bucket_frames(frames: int) -> int:
    """The padded frame count of a batch whose longest window has `frames` frames."""
    return max(frames, round(length_bucket(frames / FRAMES_PER_SECOND) * FRAMES_PER_SECOND))


def warm_up_lengths(longest_s: float, shortest_s: float = 0.0) -> list[float]:
    """One window length per length bucket, from the bucket that holds `shortest_s` up to the
    one that holds `longest_s`."""
    first, last = length_bucket(shortest_s), length_bucket(longest_s)
    return [min(bound, longest_s) for bound in LENGTH_BUCKETS_S if first <= bound <= last]


@dataclass
class EncodedBatch:
    """A batch after the encoder: what the editor step needs, and the CTC draft on the host."""

    encoded: EncoderOutput
    lengths: list[int]  # encoder frames of each window
    frames: int  # padded frame count of the batch (a bucket when compiled)
    ctc_ids: list[list[int]]  # ceil(L_i/4) tokenizer ids per window (blank included)
    ctc_probs: list[list[float]]


class ModelRunner:
    """`mode`: "eager" (the reference), "bucketed" (the compiled runner's shapes, masking and
    FlexAttention, run eagerly, so tests can tell padding from compilation), or "compiled"."""

    MODES = ("eager", "bucketed", "compiled")

    def __init__(self, model: GraniteSpeechNar, mode: str = "eager") -> None:
        if mode not in self.MODES:
            raise ValueError(f"runner mode {mode!r}: use one of {', '.join(self.MODES)}")
        self.model = model
        self.mode = mode
        self.bucketed = mode != "eager"
        self.device = model.device
        self._call_block = self._call_layer = call_layer
        if mode == "compiled":
            # buckets x batch classes x block-count classes pass dynamo's default of 8 graphs
            # per function, past which it silently runs eagerly
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, GRAPHS_PER_FUNCTION)
            # one compiled function per stack: dynamo keeps its graphs (and learns which sizes
            # vary) per function, and encoder blocks and editor layers share no shapes
            self._call_block = torch.compile(call_block, dynamic=None)
            self._call_layer = torch.compile(call_editor_layer, dynamic=None)

    def warm_up(self, longest_s: float, largest_batch: int, shortest_s: float = 0.0) -> float:
        """Compile before serving, so that no stream's first final waits for it: batches of one,
        two and `largest_batch` windows in every length bucket from `shortest_s` up to
        `longest_s` (the engine's window). Shapes differ in ways torch.compile specialises on
        (a batch of one, one attention block or several, padding to a whole block or none,
        kernels picked by batch size), so each bucket gets its own graphs; batch size and packed
        editor rows are symbolic after that. Returns the seconds it took (0 when not
        compiled)."""
        if self.mode != "compiled":
            return 0.0
        start = time.perf_counter()
        rng = np.random.default_rng(0)
        blank, slots = self.model.cfg.blank_token_id, self.model.cfg.min_edit_sequence_length
        for seconds in warm_up_lengths(longest_s, shortest_s):
            for count in sorted({1, 2, largest_batch}):
                waves = [0.1 * rng.standard_normal(int(seconds * 16000), np.float32)] * count
                self.encode(waves, with_taps=False)
                batch = self.encode(waves, with_taps=True)
                self.edit(batch, list(range(count)), [[blank] * slots] * count)
            # long slot lists: packed editor rows over several FlexAttention blocks
            self.edit(batch, [0, 1], [[blank] * FLEX_BLOCK * 2] * 2)
        return time.perf_counter() - start

    @torch.inference_mode()
    def encode(self, waves: list[np.ndarray], with_taps: bool) -> EncodedBatch:
        """Features, encoder and greedy CTC for a batch of 16 kHz windows."""
        features, lengths = nar_batch(waves, device=self.device)
        frames, valid = features.shape[1], None
        if self.bucketed:
            valid, frames = frames, bucket_frames(frames)
            features = F.pad(features, (0, 0, 0, frames - valid))
        encoded, ctc = self._encode_and_draft(features, valid, with_taps)
        ids, probs = ctc.cpu().numpy()  # the batch's one device-to-host copy before the editor
        window = self.model.cfg.encoder.bpe_pooling_window
        counts = [-(-length // window) for length in lengths]
        return EncodedBatch(
            encoded,
            lengths,
            frames,
            [ids[i, :c].astype(np.int64).tolist() for i, c in enumerate(counts)],
            [probs[i, :c].tolist() for i, c in enumerate(counts)],
        )

    @torch.inference_mode()
    def edit(
        self, batch: EncodedBatch, keep: list[int], slots: list[list[int]]
    ) -> list[tuple[list[int], list[float]]]:
        """One editor pass over the windows `keep` of `batch`, whose text slots are `slots`:
        argmax ids and probabilities per slot."""
        cfg = self.model.cfg.projector
        rows = -(-batch.frames // cfg.block_size) * cfg.queries_per_block
        plan = EditPlan.build(
            [batch.lengths[i] // cfg.downsample_rate for i in keep],
            [i * rows for i in keep],
            len(batch.lengths) * rows,
            slots,
            FLEX_BLOCK if self.bucketed else 1,
        )
        if self.bucketed:
            layout = {"documents": plan.documents} | document_blocks(plan.documents)
        else:
            layout = PaddedAttention.layout(plan.lengths)
        on_device = copy_once(plan.arrays() | layout, self.device)  # the stage's one copy in
        tensors = EditTensors(*(on_device.pop(name) for name in EditTensors.fields()))
        if self.bucketed:
            attend = FlexPackedAttention(on_device.pop("documents"), on_device)
        else:
            attend = PaddedAttention(plan.lengths, on_device)
        out = self._project_and_edit(batch.encoded, tensors, attend).cpu().numpy()  # one copy back
        ids, probs = out[0].astype(np.int64).tolist(), out[1].tolist()
        ends = np.cumsum([len(s) for s in slots]).tolist()
        return [(ids[a:b], probs[a:b]) for a, b in zip([0, *ends[:-1]], ends, strict=True)]

    def _encode_and_draft(
        self, features: torch.Tensor, valid: int | None, with_taps: bool
    ) -> tuple[EncoderOutput, torch.Tensor]:
        encoded = self.model.encode(features, with_taps, valid, self._call_block)
        ids, probs = self.model.ctc_windows(encoded)
        return encoded, torch.stack([ids.float(), probs])  # ids < 2^24: exact in float32

    def _project_and_edit(self, encoded: EncoderOutput, plan: EditTensors, attend) -> torch.Tensor:
        audio_rows = self.model.projected(encoded).flatten(0, 1)
        ids, probs = self.model.edit_packed(audio_rows, plan, attend, self._call_layer)
        return torch.stack([ids.float(), probs])


def call_block(layer: torch.nn.Module, *inputs) -> torch.Tensor:
    """An encoder block, compiled on its own (see `ModelRunner`)."""
    return layer(*inputs)


def call_editor_layer(layer: torch.nn.Module, *inputs) -> torch.Tensor:
    """An editor layer, compiled on its own (see `ModelRunner`)."""
    return layer(*inputs)
