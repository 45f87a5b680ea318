"""Conformer CTC encoder with block-local Shaw attention, self-conditioning and the BPE CTC head.

Spec §2. Frames beyond a clip's length (batch padding) are attended and convolved like real
frames, exactly as the reference does; only the padding up to a multiple of the attention block
is masked. A batch padded further, to a fixed bucket of frames so that compiled shapes repeat,
passes `valid` (the batch's real frame count; the blocks see it as the [T] mask `frame_ok`, so
it never specialises a compiled block): frames from there on are masked as keys, zeroed before
each convolution, weigh nothing in the BPE pooling and are zero rows for the projector, so
every earlier frame comes out exactly as without the extra padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig

# How a stack runs each of its layers: `call(layer, *inputs)`; the compiled runner passes one
# compiled function, so one graph serves every layer of a stack (regional compilation).
LayerCall = Callable[..., torch.Tensor]


def call_layer(layer: nn.Module, *inputs) -> torch.Tensor:
    return layer(*inputs)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.up_proj = nn.Linear(dim, dim * mult)
        self.down_proj = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.up_proj(self.pre_norm(x))))


def _relative_distances(context: int, max_pos: int, device: torch.device) -> torch.Tensor:
    """Index into the Shaw table for each (query, key) pair of one block: clamp(i-j) + max_pos."""
    pos = torch.arange(context, device=device)
    return (pos[:, None] - pos[None, :]).clamp(-context, context) + max_pos


class BlockAttention(nn.Module):
    """Self-attention inside non-overlapping `context_size` blocks anchored at frame 0."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        inner = cfg.num_heads * cfg.dim_head
        self.heads = cfg.num_heads
        self.dim_head = cfg.dim_head
        self.context = cfg.context_size
        self.max_pos = cfg.max_pos_emb
        self.pre_norm = nn.LayerNorm(cfg.hidden_dim)
        self.to_q = nn.Linear(cfg.hidden_dim, inner, bias=False)
        self.to_kv = nn.Linear(cfg.hidden_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.hidden_dim)
        self.rel_pos_emb = nn.Embedding(2 * cfg.max_pos_emb + 1, cfg.dim_head)

    def forward(self, x: torch.Tensor, frame_ok: torch.Tensor | None = None) -> torch.Tensor:
        """`frame_ok` [T] bool: keys where it is False are masked (see the module docstring)."""
        batch, frames, _ = x.shape
        c = self.context
        blocks = -(-frames // c)
        rem = frames % c
        x = F.pad(self.pre_norm(x), (0, 0, 0, blocks * c - frames))
        q = self.to_q(x)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        # (batch, block) folded into one batch dim: [B*nb, heads, c, dim_head]
        q, k, v = (
            t.reshape(batch * blocks, c, self.heads, self.dim_head).transpose(1, 2)
            for t in (q, k, v)
        )
        scale = self.dim_head**-0.5
        table = self.rel_pos_emb(_relative_distances(c, self.max_pos, x.device))  # [c, c, d]
        bias = torch.einsum("bhid,ijd->bhij", q, table) * scale
        if frame_ok is not None:
            absent = ~F.pad(frame_ok, (0, blocks * c - frames)).view(1, blocks, 1, 1, c)
            bias = bias.view(batch, blocks, *bias.shape[1:]).masked_fill(
                absent, -torch.finfo(bias.dtype).max
            )
            bias = bias.view(batch * blocks, *bias.shape[2:])
        elif rem:
            masked = torch.ones(c, c, dtype=torch.bool, device=x.device)
            masked[:rem, :rem] = False
            last = bias[blocks - 1 :: blocks]
            bias[blocks - 1 :: blocks] = last.masked_fill(masked, -torch.finfo(bias.dtype).max)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        out = out.transpose(1, 2).reshape(batch, blocks * c, -1)[:, :frames]
        return self.to_out(out)


class DepthwiseConv(nn.Module):
    """Depthwise conv with 'same' zero padding (k//2 left, the rest right)."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.pad = (kernel // 2, kernel // 2 - (kernel + 1) % 2)
        self.conv = nn.Conv1d(channels, channels, kernel, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class ConvModule(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        inner = cfg.hidden_dim * cfg.conv_expansion_factor
        self.norm = nn.LayerNorm(cfg.hidden_dim)
        self.up_conv = nn.Conv1d(cfg.hidden_dim, 2 * inner, 1)
        self.depth_conv = DepthwiseConv(inner, cfg.conv_kernel_size)
        self.batch_norm = nn.BatchNorm1d(inner)
        self.down_conv = nn.Conv1d(inner, cfg.hidden_dim, 1)

    def forward(self, x: torch.Tensor, frame_ok: torch.Tensor | None = None) -> torch.Tensor:
        h = F.glu(self.up_conv(self.norm(x).transpose(1, 2)), dim=1)
        if frame_ok is not None:
            h = h * frame_ok.to(h.dtype)  # as the zero padding of an unbucketed batch
        h = F.silu(self.batch_norm(self.depth_conv(h)))
        return self.down_conv(h).transpose(1, 2)


class ConformerBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.ff1 = FeedForward(cfg.hidden_dim, cfg.feedforward_mult)
        self.attn = BlockAttention(cfg)
        self.conv = ConvModule(cfg)
        self.ff2 = FeedForward(cfg.hidden_dim, cfg.feedforward_mult)
        self.post_norm = nn.LayerNorm(cfg.hidden_dim)

    def forward(self, x: torch.Tensor, frame_ok: torch.Tensor | None = None) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x, frame_ok)
        x = x + self.conv(x, frame_ok)
        x = x + 0.5 * self.ff2(x)
        return self.post_norm(x)


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # [B, T, H] after the last layer
    blank_prob: torch.Tensor  # [B, T] fp32, char-CTC blank posterior at the conditioning layer
    taps: list[torch.Tensor]  # hidden states the projector reads, in `tap_layers` order
    frame_ok: torch.Tensor | None = None  # [T] bool, False from `valid` on; None: all real


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_linear = nn.Linear(cfg.input_dim, cfg.hidden_dim)
        self.layers = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.num_layers))
        self.out = nn.Linear(cfg.hidden_dim, cfg.output_dim)
        self.out_mid = nn.Linear(cfg.output_dim, cfg.hidden_dim)
        self.out_bpe = nn.Linear(cfg.hidden_dim, cfg.bpe_output_dim)

    def forward(
        self,
        features: torch.Tensor,
        tap_layers: tuple[int, ...] = (),
        valid: int | None = None,
        call: LayerCall = call_layer,
    ) -> EncoderOutput:
        """Run all layers; `tap_layers` index hs (0 = input_linear output, i = after layer i,
        -1 = last), taken after the self-conditioning bypass as the NAR model does. `valid`:
        how many leading frames are the batch's own (the rest is bucket padding). `call` runs
        each block (the compiled runner passes a compiled one)."""
        wanted = {i % (self.cfg.num_layers + 1) for i in tap_layers}
        frame_ok = None
        if valid is not None:
            frame_ok = torch.arange(features.shape[1], device=features.device) < valid
        h = self.input_linear(features.to(self.input_linear.weight.dtype))
        kept = {0: h} if 0 in wanted else {}
        blank = None
        for index, layer in enumerate(self.layers, start=1):
            h = call(layer, h, frame_ok)
            if index == self.cfg.conditioning_layer:
                posterior = self.out(h).float().softmax(dim=-1)
                blank = posterior[..., 0]
                h = h + self.out_mid(posterior.to(h.dtype))
            if index in wanted:
                kept[index] = h
        taps = [kept[i % (self.cfg.num_layers + 1)] for i in tap_layers]
        return EncoderOutput(hidden=h, blank_prob=blank, taps=taps, frame_ok=frame_ok)

    def pool_for_bpe(
        self,
        hidden: torch.Tensor,
        blank_prob: torch.Tensor,
        frame_ok: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Posterior-weighted mean over windows of `bpe_pooling_window` frames (fp32, +1e-8).

        Frames that are likely blank count less; the padding to a whole window, and frames
        where `frame_ok` is False, have weight 0."""
        window = self.cfg.bpe_pooling_window
        batch, frames, dim = hidden.shape
        pad = -frames % window
        weight = 1.0 - blank_prob.float()
        if frame_ok is not None:
            weight = weight * frame_ok
        weight = F.pad(weight, (0, pad))
        h = F.pad(hidden.float(), (0, 0, 0, pad))
        weight = weight.view(batch, -1, window)
        h = h.view(batch, -1, window, dim)
        pooled = (h * weight[..., None]).sum(2) / (weight.sum(2)[..., None] + 1e-8)
        return pooled.to(hidden.dtype)
