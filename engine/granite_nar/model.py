"""The whole NAR model as one module tree whose state dict matches the official checkpoint.

The model works on tensors only: features in, CTC ids and editor ids out. It knows nothing of
requests, audio formats or words (see `engine.py` for that), nor of how batches are moved and
compiled (see `runner.py`). `ctc_draft`, `audio_embeddings` and `edit` are the per-sample
reference API the oracle tests check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import NarConfig
from .editor import Attend, GraniteEditor, PaddedAttention, packed_positions
from .encoder import ConformerEncoder, EncoderOutput, LayerCall, call_layer
from .projector import WindowedQFormerProjector
from .transfer import copy_once


@dataclass
class CtcDraft:
    """Greedy BPE-CTC output of one sample at 12.5 Hz (one entry per pooling window)."""

    window_ids: torch.Tensor  # [W] argmax channel mapped to tokenizer ids (blank = blank id)
    window_probs: torch.Tensor  # [W] softmax probability of the argmax


@dataclass
class EditorOutput:
    slot_ids: torch.Tensor  # [S] argmax per text slot
    slot_probs: torch.Tensor  # [S] its softmax probability


class GraniteSpeechNar(nn.Module):
    def __init__(self, cfg: NarConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ConformerEncoder(cfg.encoder)
        self.projector = WindowedQFormerProjector(cfg.projector)
        self.language_model = GraniteEditor(cfg.text, scale_logits=cfg.editor_logits_scaled)

    @property
    def device(self) -> torch.device:
        return self.encoder.input_linear.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.input_linear.weight.dtype

    def encode(
        self,
        features: torch.Tensor,
        with_taps: bool,
        valid: int | None = None,
        call: LayerCall = call_layer,
    ) -> EncoderOutput:
        taps = self.cfg.encoder_layer_indices if with_taps else ()
        return self.encoder(features, tap_layers=tuple(taps), valid=valid, call=call)

    def ctc_windows(self, enc: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy BPE CTC over every pooled window of the batch: ids and argmax probabilities
        [B, W] (W = ceil(T/4)); a sample's own are its first ceil(L_i/4) windows."""
        pooled = self.encoder.pool_for_bpe(enc.hidden, enc.blank_prob, enc.frame_ok)
        logits = self.encoder.out_bpe(pooled).float()
        best, channel = logits.max(dim=-1)
        probs = torch.exp(best - torch.logsumexp(logits, dim=-1))
        ids = channel + self.cfg.bpe_id_offset
        if self.cfg.bpe_id_offset:
            ids = ids.masked_fill(channel == self.cfg.bpe_blank_index, self.cfg.blank_token_id)
        return ids, probs

    def ctc_draft(self, enc: EncoderOutput, lengths: list[int]) -> list[CtcDraft]:
        """BPE head output for the first ceil(L_i/4) pooled windows of each sample only."""
        window = self.cfg.encoder.bpe_pooling_window
        ids, probs = self.ctc_windows(enc)
        return [
            CtcDraft(ids[i, : -(-length // window)], probs[i, : -(-length // window)])
            for i, length in enumerate(lengths)
        ]

    def projected(self, enc: EncoderOutput) -> torch.Tensor:
        """Projector output in the editor's embedding space, divided by the embedding
        multiplier: [B, R, D]; a sample's own are its first L_i // 5 rows."""
        projected = self.projector(enc.taps, enc.frame_ok)
        if self.cfg.scale_projected_embeddings:
            projected = projected / self.cfg.text.embedding_multiplier
        return projected.to(self.language_model.model.embed_tokens.weight.dtype)

    def audio_embeddings(self, enc: EncoderOutput, lengths: list[int]) -> list[torch.Tensor]:
        """`projected` cut to L_i // 5 rows per sample."""
        projected = self.projected(enc)
        rate = self.cfg.projector.downsample_rate
        return [projected[i, : length // rate] for i, length in enumerate(lengths)]

    def edit_packed(
        self,
        audio_rows: torch.Tensor,
        plan: EditTensors,
        attend: Attend,
        call: LayerCall = call_layer,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One bidirectional pass: packed rows gathered from [audio_rows ; slot embeddings]
        by `plan`; argmax ids and probabilities of the text slots only (the LM head skips
        the audio rows)."""
        embed = self.language_model.model.embed_tokens
        rows = torch.cat([audio_rows, embed(plan.slot_ids)])[plan.gather]
        hidden = self.language_model.run(rows, plan.position, attend, call)
        logits = self.language_model.logits(hidden[plan.text_rows]).float()
        best, ids = logits.max(dim=-1)
        return ids, torch.exp(best - torch.logsumexp(logits, dim=-1))

    def edit(self, audio: list[torch.Tensor], slots: list[torch.Tensor]) -> list[EditorOutput]:
        """The reference editor pass over [audio ; slot embeddings] per sample, packed
        together, with the reference attention."""
        counts = [len(a) for a in audio]
        starts = np.cumsum([0, *counts[:-1]]).tolist()
        slot_lists = [s.tolist() for s in slots]
        plan = EditPlan.build(counts, starts, sum(counts), slot_lists, pad_to=1)
        arrays = plan.arrays() | PaddedAttention.layout(plan.lengths)
        on_device = copy_once(arrays, self.device)
        tensors = EditTensors(*(on_device.pop(name) for name in EditTensors.fields()))
        attend = PaddedAttention(plan.lengths, on_device)
        ids, probs = self.edit_packed(torch.cat(audio), tensors, attend)
        sizes = [len(s) for s in slots]
        return [
            EditorOutput(i, p) for i, p in zip(ids.split(sizes), probs.split(sizes), strict=True)
        ]


@dataclass(frozen=True)
class EditTensors:
    """An `EditPlan` on the device."""

    gather: torch.Tensor  # [N] row of [audio_rows ; slot embeddings] for each packed row
    position: torch.Tensor  # [N] position inside its sample
    text_rows: torch.Tensor  # [S] packed rows of the text slots, sample by sample
    slot_ids: torch.Tensor  # [S] the slots' token ids

    @staticmethod
    def fields() -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(EditTensors))


@dataclass(frozen=True)
class EditPlan:
    """Where each sample's audio rows and text slots go in the packed editor input, worked out
    on the host from lengths the host already knows, so the device never waits on it."""

    lengths: list[int]  # packed rows per sample (audio + slots)
    gather: np.ndarray
    position: np.ndarray
    text_rows: np.ndarray
    slot_ids: np.ndarray
    documents: np.ndarray  # [N] sample of each packed row; padding rows form one more

    @classmethod
    def build(
        cls,
        audio_counts: list[int],
        audio_starts: list[int],
        audio_total: int,
        slots: list[list[int]],
        pad_to: int,
    ) -> EditPlan:
        """Sample i is its `audio_counts[i]` rows from `audio_starts[i]` of the `audio_total`
        audio rows, then its `slots[i]` (whose embeddings follow the audio rows in the
        gathered tensor); the packed length is padded up to a multiple of `pad_to`."""
        slot_counts = [len(s) for s in slots]
        lengths = [a + s for a, s in zip(audio_counts, slot_counts, strict=True)]
        total = sum(lengths)
        padded = -(-total // pad_to) * pad_to
        gather = np.zeros(padded, dtype=np.int64)
        documents = np.full(padded, len(lengths), dtype=np.int64)
        position = np.zeros(padded, dtype=np.int64)
        position[:total] = packed_positions(lengths)
        text_rows = np.zeros(sum(slot_counts), dtype=np.int64)
        row, slot = 0, 0
        for i, (a, start, s) in enumerate(
            zip(audio_counts, audio_starts, slot_counts, strict=True)
        ):
            gather[row : row + a] = np.arange(start, start + a)
            gather[row + a : row + a + s] = np.arange(audio_total + slot, audio_total + slot + s)
            text_rows[slot : slot + s] = np.arange(row + a, row + a + s)
            documents[row : row + a + s] = i
            row, slot = row + a + s, slot + s
        slot_ids = np.fromiter((t for s in slots for t in s), dtype=np.int64, count=slot)
        return cls(lengths, gather, position, text_rows, slot_ids, documents)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays the device needs, by `EditTensors` field name."""
        return {name: getattr(self, name) for name in EditTensors.fields()}
