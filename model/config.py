"""Model configuration: one dataclass, built from a preset, a Hugging Face config.json or GGUF metadata."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling: long wavelengths are divided by `factor`, short ones kept, a smooth ramp between."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor < 1.0:
            raise ValueError(f"rope_scaling.factor must be >= 1, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError("rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                             f"{self.low_freq_factor} and {self.high_freq_factor}")
        if self.original_max_position_embeddings <= 0:
            raise ValueError("rope_scaling.original_max_position_embeddings must be positive")


@dataclass(frozen=True)
class ModelConfig:
    """Field names follow the Hugging Face `LlamaConfig`, so a checkpoint's config.json maps one to one."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 131_072
    tie_word_embeddings: bool = False
    name: str = field(default="llama", compare=False)

    def __post_init__(self):
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "intermediate_size", "max_position_embeddings"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError("hidden_size must be divisible by num_attention_heads when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("rms_norm_eps and rope_theta must be positive")

    @property
    def num_params(self) -> int:
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * per_layer + h + head

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], name: str = "llama") -> ModelConfig:
        """Build from the dict of a Hugging Face `config.json` (LlamaForCausalLM)."""
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        model_type = hf.get("model_type", "llama")
        if model_type != "llama" or not any(a == "LlamaForCausalLM" for a in archs):
            raise ValueError(f"unsupported architecture {archs} (model_type {model_type!r}): "
                             "only LlamaForCausalLM checkpoints are supported")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("checkpoints with attention or MLP biases are not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}: Llama uses silu")
        # transformers 5 writes `rope_parameters` (theta included); older checkpoints `rope_scaling` + `rope_theta`.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or None
        theta = (rope or {}).get("rope_theta", hf.get("rope_theta", 10_000.0))
        scaling = None
        if rope is not None:
            kind = rope.get("rope_type", rope.get("type"))
            if kind == "llama3":
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                )
            elif kind not in ("default", None):
                raise ValueError(f"unsupported rope_scaling type {kind!r}: only 'llama3' or none")
        try:
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=hf["num_attention_heads"],
                num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                intermediate_size=hf["intermediate_size"],
                head_dim=hf.get("head_dim"),
                rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                name=name,
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The inverse of `from_hf_config`: a dict `transformers.LlamaConfig(**d)` accepts."""
        d = asdict(self)
        d.pop("name")
        scaling = d.pop("rope_scaling")
        d["rope_scaling"] = None if scaling is None else {"rope_type": "llama3", **scaling}
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                 attention_bias=False, mlp_bias=False)
        return d

    @classmethod
    def from_json_file(cls, path: str | Path, name: str | None = None) -> ModelConfig:
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read model config {path}: {e}") from None
        return cls.from_hf_config(hf, name=name or path.parent.name)

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        """A named architecture from `configs/models/NAME.json` (Hugging Face config.json format)."""
        path = PRESETS_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(preset_names())}")
        return cls.from_json_file(path, name=name)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
