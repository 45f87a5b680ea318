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
(encoder.py); the editor attends with FlexAttention over the packed rows (editor.py); the
encoder-and-CTC and the projector-and-editor steps are each one `torch.compile`d function with
dynamic shapes (the batch size, the valid frame count and the packed rows stay symbolic, so a
new length inside a bucket compiles nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..api import length_bucket
from ..features import SAMPLES_PER_FEATURE, nar_batch
from .editor import FLEX_BLOCK, FlexPackedAttention, PaddedAttention, document_blocks
from .encoder import EncoderOutput
from .model import EditPlan, EditTensors, GraniteSpeechNar, copy_once

FRAMES_PER_SECOND = 16000 // SAMPLES_PER_FEATURE


def bucket_frames(frames: int) -> int:
    """The padded frame count of a batch whose longest window has `frames` frames."""
    return max(frames, round(length_bucket(frames / FRAMES_PER_SECOND) * FRAMES_PER_SECOND))


@dataclass
class EncodedBatch:
    """A batch after the encoder: what the editor step needs, and the CTC draft on the host."""

    encoded: EncoderOutput
    lengths: list[int]  # encoder frames of each window
    frames: int  # padded frame count of the batch (a bucket when compiled)
    ctc_ids: list[np.ndarray]  # [ceil(L_i/4)] tokenizer ids per window (blank included)
    ctc_probs: list[np.ndarray]


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
        self._encode_step = self._encode_and_draft
        self._edit_step = self._project_and_edit
        if mode == "compiled":
            self._encode_step = torch.compile(self._encode_and_draft, dynamic=True)
            self._edit_step = torch.compile(self._project_and_edit, dynamic=True)

    @torch.inference_mode()
    def encode(self, waves: list[np.ndarray], with_taps: bool) -> EncodedBatch:
        """Features, encoder and greedy CTC for a batch of 16 kHz windows."""
        features, lengths = nar_batch(waves, device=self.device)
        frames, valid = features.shape[1], None
        if self.bucketed:
            valid, frames = frames, bucket_frames(frames)
            features = F.pad(features, (0, 0, 0, frames - valid))
        encoded, ctc = self._encode_step(features, valid, with_taps)
        ids, probs = ctc.cpu().numpy()  # the batch's one device-to-host copy before the editor
        window = self.model.cfg.encoder.bpe_pooling_window
        counts = [-(-length // window) for length in lengths]
        return EncodedBatch(
            encoded,
            lengths,
            frames,
            [ids[i, :c].astype(np.int64) for i, c in enumerate(counts)],
            [probs[i, :c] for i, c in enumerate(counts)],
        )

    @torch.inference_mode()
    def edit(
        self, batch: EncodedBatch, keep: list[int], slots: list[list[int]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
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
        arrays = plan.arrays()
        if self.bucketed:
            arrays |= document_blocks(plan.documents)
        on_device = copy_once(arrays, self.device)
        tensors = EditTensors(*(on_device.pop(name) for name in EditTensors.fields()))
        if self.bucketed:
            attend = FlexPackedAttention(on_device.pop("documents"), on_device)
        else:
            attend = PaddedAttention(plan.lengths, self.device)
        out = self._edit_step(batch.encoded, tensors, attend).cpu().numpy()  # one copy back
        counts = np.cumsum([len(s) for s in slots])[:-1]
        return list(
            zip(np.split(out[0].astype(np.int64), counts), np.split(out[1], counts), strict=True)
        )

    def _encode_and_draft(
        self, features: torch.Tensor, valid: int | None, with_taps: bool
    ) -> tuple[EncoderOutput, torch.Tensor]:
        encoded = self.model.encode(features, with_taps, valid)
        ids, probs = self.model.ctc_windows(encoded)
        return encoded, torch.stack([ids.float(), probs])  # ids < 2^24: exact in float32

    def _project_and_edit(self, encoded: EncoderOutput, plan: EditTensors, attend) -> torch.Tensor:
        audio_rows = self.model.projected(encoded).flatten(0, 1)
        ids, probs = self.model.edit_packed(audio_rows, plan, attend)
        return torch.stack([ids.float(), probs])
