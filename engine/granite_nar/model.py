"""The whole NAR model as one module tree whose state dict matches the official checkpoint.

The model works on tensors only: features in, CTC ids and editor ids out. It knows nothing of
requests, audio formats or words (see `engine.py` for that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import NarConfig
from .editor import GraniteEditor
from .encoder import ConformerEncoder, EncoderOutput
from .projector import WindowedQFormerProjector


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

    def encode(self, features: torch.Tensor, with_taps: bool) -> EncoderOutput:
        taps = self.cfg.encoder_layer_indices if with_taps else ()
        return self.encoder(features, tap_layers=tuple(taps))

    def ctc_draft(self, enc: EncoderOutput, lengths: list[int]) -> list[CtcDraft]:
        """BPE head on the first ceil(L_i/4) pooled windows of each sample only."""
        pooled = self.encoder.pool_for_bpe(enc.hidden, enc.blank_prob)
        window = self.cfg.encoder.bpe_pooling_window
        counts = [-(-length // window) for length in lengths]
        rows = torch.cat([pooled[i, :c] for i, c in enumerate(counts)])
        logits = self.encoder.out_bpe(rows).float()
        best, channel = logits.max(dim=-1)
        probs = torch.exp(best - torch.logsumexp(logits, dim=-1))
        ids = channel + self.cfg.bpe_id_offset
        if self.cfg.bpe_id_offset:
            ids[channel == self.cfg.bpe_blank_index] = self.cfg.blank_token_id
        return [CtcDraft(i, p) for i, p in zip(ids.split(counts), probs.split(counts), strict=True)]

    def audio_embeddings(self, enc: EncoderOutput, lengths: list[int]) -> list[torch.Tensor]:
        """Projector output divided by the embedding multiplier; L_i // 5 rows per sample."""
        projected = self.projector(enc.taps)
        if self.cfg.scale_projected_embeddings:
            projected = projected / self.cfg.text.embedding_multiplier
        projected = projected.to(self.language_model.model.embed_tokens.weight.dtype)
        rate = self.cfg.projector.downsample_rate
        return [projected[i, : length // rate] for i, length in enumerate(lengths)]

    def edit(self, audio: list[torch.Tensor], slots: list[torch.Tensor]) -> list[EditorOutput]:
        """One bidirectional pass over [audio ; slot embeddings] per sample, packed together.

        The LM head runs on the text slots only."""
        embed = self.language_model.model.embed_tokens
        pieces, lengths, text_rows = [], [], []
        offset = 0
        for a, s in zip(audio, slots, strict=True):
            pieces += [a, embed(s)]
            lengths.append(len(a) + len(s))
            text_rows.append(torch.arange(offset + len(a), offset + len(a) + len(s)))
            offset += len(a) + len(s)
        hidden = self.language_model(torch.cat(pieces), lengths)
        rows = torch.cat(text_rows).to(hidden.device)
        logits = self.language_model.logits(hidden[rows]).float()
        best, ids = logits.max(dim=-1)
        probs = torch.exp(best - torch.logsumexp(logits, dim=-1))
        counts = [len(s) for s in slots]
        return [
            EditorOutput(i, p) for i, p in zip(ids.split(counts), probs.split(counts), strict=True)
        ]
