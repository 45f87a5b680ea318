"""The Granite LLM body used bidirectionally as the transcript editor (spec §4).

A batch arrives packed as one sequence of rows (no padding in the linear layers); RoPE positions
restart at 0 for each sample, and attention is block-diagonal: each sample attends only to
itself. Two interchangeable attentions keep samples apart: `PaddedAttention` (the reference) and
`FlexPackedAttention` (the compiled runner's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .config import TextConfig
from .encoder import LayerCall, call_layer
from .transfer import copy_once

# q [N, H, d], k and v [N, KV, d], scale -> [N, H, d], each sample attending to itself only
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def packed_positions(lengths: Sequence[int]) -> np.ndarray:
    """Position of each packed row inside its own sample (RoPE restarts at 0 per sample)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) - starts


class PaddedAttention:
    """The reference: attention over a per-sample padded view with a key-padding mask.

    Its cost grows with the sum of squared sample lengths, never with the square of the packed
    length, but it scatters and gathers every layer's q, k, v and output."""

    def __init__(self, lengths: Sequence[int], layout: dict[str, torch.Tensor]) -> None:
        """`layout`: `PaddedAttention.layout(lengths)` on the device."""
        self.lengths = tuple(lengths)
        self.sample_index, self.position = layout["sample_index"], layout["sample_position"]
        mask = layout.get("key_mask")
        self.key_mask = None if mask is None else mask.bool()[:, None, None, :]

    @staticmethod
    def layout(lengths: Sequence[int]) -> dict[str, np.ndarray]:
        """Where each packed row sits in the padded view (and which keys exist, unless all
        samples are as long), computed on the host."""
        out = {
            "sample_index": np.repeat(np.arange(len(lengths)), lengths),
            "sample_position": packed_positions(lengths),
        }
        if len(set(lengths)) > 1:
            out["key_mask"] = np.arange(max(lengths))[None, :] < np.asarray(lengths)[:, None]
        return out

    @classmethod
    def on(cls, lengths: Sequence[int], device: torch.device) -> PaddedAttention:
        return cls(lengths, copy_once(cls.layout(lengths), device))

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, Lmax, ...]"""
        out = rows.new_zeros(len(self.lengths), max(self.lengths), *rows.shape[1:])
        out[self.sample_index, self.position] = rows
        return out

    def __call__(self, q, k, v, scale: float) -> torch.Tensor:
        """q [N, H, d], k and v [N, KV, d] -> [N, H, d]"""
        q, k, v = (self.pad(t).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.key_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out.transpose(1, 2)[self.sample_index, self.position]


FLEX_BLOCK = 128  # FlexAttention's block: packed batches are padded to a multiple of it


def document_blocks(documents: np.ndarray) -> dict[str, np.ndarray]:
    """The block-sparse layout of "each row attends to its own document", worked out on the
    host from the (non-decreasing) document id of every packed row: per query block, the key
    blocks it fully attends to and those that need the row-level mask. Computing this from a
    mask function on the device would look at all N^2 row pairs."""
    blocks = documents.reshape(-1, FLEX_BLOCK)
    first, last = blocks[:, 0], blocks[:, -1]
    overlap = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    single = first == last
    full = overlap & (single[:, None] & single[None, :]) & (first[:, None] == first[None, :])

    def layout(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # wanted key blocks first, in order (a stable sort of "not wanted")
        return mask.sum(1), np.argsort(~mask, axis=1, kind="stable")

    kv_num, kv_idx = layout(overlap & ~full)
    full_num, full_idx = layout(full)
    return {"kv_num": kv_num, "kv_idx": kv_idx, "full_num": full_num, "full_idx": full_idx}


class FlexPackedAttention:
    """FlexAttention straight on the packed rows, each row attending to its own document
    (sample) only: no padding per sample, no scatter or gather, blocks that cross no document
    skipped, and kernels that stay fused under torch.compile. Rows past the batch (padding to
    a multiple of `FLEX_BLOCK`) form one more document of their own."""

    def __init__(self, documents: torch.Tensor, blocks: dict[str, torch.Tensor]) -> None:
        def same_document(b, h, q_idx, kv_idx):
            return documents[q_idx] == documents[kv_idx]

        def shaped(name: str) -> torch.Tensor:
            return blocks[name].to(torch.int32)[None, None]

        rows = documents.shape[0]
        self.block_mask = BlockMask.from_kv_blocks(
            shaped("kv_num"),
            shaped("kv_idx"),
            shaped("full_num"),
            shaped("full_idx"),
            BLOCK_SIZE=FLEX_BLOCK,
            mask_mod=same_document,
            seq_lengths=(rows, rows),
        )

    def __call__(self, q, k, v, scale: float) -> torch.Tensor:
        # [1, heads, N, d], materialised: the CPU kernel template cannot take a view here
        q, k, v = (t.transpose(0, 1)[None].contiguous() for t in (q, k, v))
        out = flex_attention(
            q, k, v, block_mask=self.block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out[0].transpose(0, 1)


def _inverse_frequencies(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    return 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )


def rotary_tables(
    position: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, head_dim] for the default (NeoX, rotate-half) RoPE, computed in fp32."""
    freqs = position.float()[:, None] * _inverse_frequencies(head_dim, theta, position.device)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, d] rotated by per-row angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        d = cfg.attention_head_dim
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            d,
        )
        self.scale = cfg.attention_multiplier
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.heads * d, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, attend: Attend, rope) -> torch.Tensor:
        n = x.shape[0]
        q = rotate(self.q_proj(x).view(n, self.heads, self.head_dim), *rope)
        k = rotate(self.k_proj(x).view(n, self.kv_heads, self.head_dim), *rope)
        v = self.v_proj(x).view(n, self.kv_heads, self.head_dim)
        return self.o_proj(attend(q, k, v, self.scale).reshape(n, -1))


class GatedMlp(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.residual_multiplier = cfg.residual_multiplier
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMlp(cfg)

    def forward(self, x: torch.Tensor, attend: Attend, rope) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), attend, rope) * self.residual_multiplier
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_multiplier


class GraniteBody(nn.Module):
    """`language_model.model.*`: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GraniteEditor(nn.Module):
    """`language_model.*`; the head is the (tied) embedding unless the config unties it."""

    def __init__(self, cfg: TextConfig, scale_logits: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale_logits = scale_logits
        self.model = GraniteBody(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, embeds: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Packed input embeddings [N, D] (before the x embedding_multiplier) -> final hidden,
        with the reference attention."""
        attend = PaddedAttention.on(lengths, embeds.device)
        return self.run(embeds, attend.position, attend)

    def run(
        self,
        embeds: torch.Tensor,
        position: torch.Tensor,
        attend: Attend,
        call: LayerCall = call_layer,
    ) -> torch.Tensor:
        """The layers over packed rows at `position` inside their samples, `attend` keeping
        the samples apart; `call` runs each layer (see encoder.LayerCall)."""
        x = embeds * self.cfg.embedding_multiplier
        rope = rotary_tables(position, self.cfg.attention_head_dim, self.cfg.rope_theta, x.dtype)
        for layer in self.model.layers:
            x = call(layer, x, attend, rope)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = (
            self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        )
        logits = hidden @ head.T
        return logits / self.cfg.logits_scaling if self.scale_logits else logits
