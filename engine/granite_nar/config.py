"""Typed model configuration parsed from an official `config.json`.

Both checkpoint layouts are accepted: the current one (`text_config`, `rope_parameters`, BPE head
over the LLM vocabulary with blank = `<|end_of_text|>`) and the older snapshot (`model_type "nle"`,
`llm_config`, flat `rope_theta`, a BPE head one wider with blank at channel 0).
Unknown keys are ignored; keys the model needs are required, and a missing one is named.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

CURRENT_LAYOUT = "current"
LEGACY_LAYOUT = "legacy"


class ConfigFormatError(ValueError):
    """config.json lacks keys the model needs, or holds values of the wrong kind."""


@dataclass(frozen=True)
class EncoderConfig:
    input_dim: int
    num_layers: int
    hidden_dim: int
    num_heads: int
    dim_head: int
    feedforward_mult: int
    conv_kernel_size: int
    conv_expansion_factor: int
    context_size: int
    max_pos_emb: int
    output_dim: int
    bpe_output_dim: int
    bpe_pooling_window: int = 4
    self_conditioning_layer: int | None = None

    @property
    def conditioning_layer(self) -> int:
        """1-based layer after which the char-CTC self-conditioning bypass is applied."""
        return self.self_conditioning_layer or self.num_layers // 2


@dataclass(frozen=True)
class ProjectorConfig:
    encoder_dim: int
    num_encoder_layers: int
    hidden_size: int
    num_heads: int
    num_layers: int
    block_size: int
    downsample_rate: int
    mlp_ratio: int
    llm_dim: int
    layernorm_eps: float = 1e-6
    attn_bias: bool = True
    mlp_bias: bool = True

    @property
    def queries_per_block(self) -> int:
        return self.block_size // self.downsample_rate


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    embedding_multiplier: float
    attention_multiplier: float
    residual_multiplier: float
    logits_scaling: float
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    head_dim: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class NarConfig:
    encoder: EncoderConfig
    projector: ProjectorConfig
    text: TextConfig
    blank_token_id: int
    encoder_layer_indices: tuple[int, ...] = (4, 8, 12, -1)
    min_edit_sequence_length: int = 8
    scale_projected_embeddings: bool = True
    layout: str = CURRENT_LAYOUT
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def bpe_blank_index(self) -> int:
        """Channel of the BPE CTC head that means blank."""
        return 0 if self.layout == LEGACY_LAYOUT else self.blank_token_id

    @property
    def bpe_id_offset(self) -> int:
        """Added to a BPE head channel to get a tokenizer id (old snapshot: channel = id + 1)."""
        return -1 if self.layout == LEGACY_LAYOUT else 0

    @property
    def editor_logits_scaled(self) -> bool:
        """The old snapshot did not divide editor logits by `logits_scaling`."""
        return self.layout != LEGACY_LAYOUT

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NarConfig:
        if not isinstance(raw, dict):
            raise ConfigFormatError("config.json must hold a JSON object")
        legacy = raw.get("model_type") == "nle" or (
            "llm_config" in raw and "text_config" not in raw
        )
        text_key = "llm_config" if legacy else "text_config"
        text_raw = dict(_section(raw, text_key))
        rope = text_raw.pop("rope_parameters", None) or {}
        if "rope_theta" in rope and "rope_theta" not in text_raw:
            text_raw["rope_theta"] = rope["rope_theta"]
        text = _build(TextConfig, text_raw, text_key)
        encoder = _build(EncoderConfig, _section(raw, "encoder_config"), "encoder_config")
        projector = _build(ProjectorConfig, _section(raw, "projector_config"), "projector_config")
        blank = raw.get("blank_token_id", encoder_blank(raw, text))
        if blank is None:
            raise ConfigFormatError("config.json: missing key 'blank_token_id'")
        return cls(
            encoder=encoder,
            projector=projector,
            text=text,
            blank_token_id=int(blank),
            encoder_layer_indices=tuple(raw.get("encoder_layer_indices", (4, 8, 12, -1))),
            min_edit_sequence_length=int(raw.get("min_edit_sequence_length", 8)),
            scale_projected_embeddings=bool(raw.get("scale_projected_embeddings", True)),
            layout=LEGACY_LAYOUT if legacy else CURRENT_LAYOUT,
            extra={k: v for k, v in raw.items() if k in ("ctc_tokenizer_config", "audio_token_id")},
        )

    def to_dict(self) -> dict[str, Any]:
        """The current official layout (what `save_pretrained` writes)."""
        text = {k: v for k, v in asdict(self.text).items() if k not in ("rope_theta", "head_dim")}
        if self.text.head_dim is not None:
            text["head_dim"] = self.text.head_dim
        text["rope_parameters"] = {"rope_theta": self.text.rope_theta, "rope_type": "default"}
        text["model_type"] = "granite"
        encoder = asdict(self.encoder)
        encoder["blank_token_id"] = self.blank_token_id
        encoder["model_type"] = "granite_speech_nar_encoder"
        projector = asdict(self.projector)
        projector["model_type"] = "granite_speech_nar_projector"
        out = {
            "architectures": ["GraniteSpeechNarForASR"],
            "model_type": "granite_speech_nar",
            "blank_token_id": self.blank_token_id,
            "encoder_config": encoder,
            "projector_config": projector,
            "text_config": text,
            "encoder_layer_indices": list(self.encoder_layer_indices),
            "min_edit_sequence_length": self.min_edit_sequence_length,
            "scale_projected_embeddings": self.scale_projected_embeddings,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "dtype": "float32",
        }
        out.update(self.extra)
        return out


def encoder_blank(raw: dict[str, Any], text: TextConfig) -> int | None:
    """Older files carry the blank id only inside the encoder config (or as the LLM eos)."""
    enc = raw.get("encoder_config") or {}
    return enc.get("blank_token_id", text.eos_token_id)


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise ConfigFormatError(f"config.json: missing or invalid section {key!r}")
    return value


def _build(kind: type, raw: dict[str, Any], where: str):
    names = {f.name: f for f in fields(kind)}
    required = [
        f.name for f in fields(kind) if f.default is MISSING and f.default_factory is MISSING
    ]
    missing = [name for name in required if name not in raw]
    if missing:
        raise ConfigFormatError(f"config.json: {where} is missing keys: {', '.join(missing)}")
    values = {}
    for name, f in names.items():
        if name not in raw:
            continue
        value = raw[name]
        try:
            values[name] = _coerce(value, f.type)
        except (TypeError, ValueError):
            raise ConfigFormatError(
                f"config.json: {where}.{name} has invalid value {value!r} (expected {f.type})"
            ) from None
    return kind(**values)


def _coerce(value: Any, type_name: str) -> Any:
    if value is None and "None" in type_name:
        return None
    if type_name.startswith("int"):
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(value)
        return int(value)
    if type_name.startswith("float"):
        return float(value)
    if type_name.startswith("bool"):
        if not isinstance(value, bool):
            raise ValueError(value)
        return value
    return value
