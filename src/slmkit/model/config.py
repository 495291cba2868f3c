"""Model configuration: a Llama-family shape, named presets, overrides, size and cost.

A `ModelConfig` maps one-to-one onto the fields of a Hugging Face `LlamaConfig`, so a model directory's
`config.json` is both ours and transformers'.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    dim: int = 256  # hidden_size
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 4  # grouped-query attention: n_heads must be a multiple of this
    hidden_dim: int = 688  # SwiGLU inner width (intermediate_size)
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # unknown HF fields we round-trip untouched

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
                raise ValueError(f"{name}={value!r}: must be a positive number")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r}: must be a token id (an integer >= 0) or none")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    # ---- size and cost -------------------------------------------------------------------------

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameters of the model: every weight, or with include_embeddings=False the non-embedding count of
        Kaplan et al. (2020), without the token embedding and an untied LM head (a tied head is the embedding).
        The norm weights count in both."""
        d, h, kv = self.dim, self.head_dim, self.n_kv_heads
        attn = d * d * 2 + d * kv * h * 2  # q, o and k, v
        mlp = 3 * d * self.hidden_dim
        per_layer = attn + mlp + 2 * d  # + two RMSNorm weights
        non_embedding = self.n_layers * per_layer + d  # + final norm
        if not include_embeddings:
            return non_embedding
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return non_embedding + self.vocab_size * d + head

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6·(N + V·d) + 12·L·d·T.

        N is the non-embedding count; V·d is the LM head, a real matmul per token whether or not it is tied to the
        embedding (whose lookup costs nothing), counted as Chinchilla (Hoffmann et al. 2022) does. 12·L·d·T is
        attention's scores and weighted sum at context T, the full square like PaLM's (the causal half is masked,
        not skipped). The norm weights in N add 6 FLOPs each that no matmul spends: a rounding error.
        """
        t = seq_len or self.max_seq_len
        return 6 * (self.num_params(include_embeddings=False) + self.vocab_size * self.dim) \
            + 12 * self.n_layers * self.dim * t

    # ---- HF LlamaConfig mapping ----------------------------------------------------------------

    def to_hf(self) -> dict:
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "use_cache": True,
        }
        return {**self.extra, **cfg}

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        arch = cfg.get("model_type", "llama")
        if arch not in ("llama", "mistral", "qwen2") and "LlamaForCausalLM" not in cfg.get("architectures", []):
            raise ValueError(f"config.json: model_type {arch!r} is not a Llama-family decoder")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("config.json: attention_bias/mlp_bias models are not supported yet")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (slmkit's MLP is SwiGLU)")
        rope_scaling = cfg.get("rope_scaling") or {}
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ValueError(f"config.json: rope_scaling {rope_scaling} is not supported yet")
        n_heads = cfg["num_attention_heads"]
        dim = cfg["hidden_size"]
        if cfg.get("head_dim") not in (None, dim // n_heads):
            raise ValueError("config.json: head_dim != hidden_size / num_attention_heads is not supported")
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None:  # transformers 5 may nest it in rope_parameters
            rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        known = set(cls().to_hf())
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            hidden_dim=cfg["intermediate_size"],
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            rope_theta=float(rope_theta),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=cfg.get("pad_token_id"),
            extra={k: v for k, v in cfg.items() if k not in known and k != "rope_parameters"},
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Named shapes. nano/micro are sized for CPU training in minutes; the rest are the published shapes
# of llama2.c's TinyStories models, SmolLM2-135M, LiteLlama-460M and TinyLlama-1.1B.
PRESETS: dict[str, dict] = {
    "nano": dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=384,
                 max_seq_len=256),
    "micro": dict(vocab_size=8192, dim=256, n_layers=6, n_heads=8, n_kv_heads=4, hidden_dim=688,
                  max_seq_len=512),
    "stories15m": dict(vocab_size=32000, dim=288, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=768,
                       max_seq_len=256),
    "stories42m": dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, hidden_dim=1376,
                       max_seq_len=1024),
    "stories110m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=2048,
                        max_seq_len=1024),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                         max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True),
    # LiteLlama: GPT-2 vocabulary (padded to 50304); tied embeddings give the 454M that its name rounds to 460M.
    "litellama-460m": dict(vocab_size=50304, dim=1024, n_layers=24, n_heads=32, n_kv_heads=32,
                           hidden_dim=4096, max_seq_len=1024, tie_embeddings=True),
    "tinyllama-1.1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                           max_seq_len=2048, tie_embeddings=False),
}


def _coerce(name: str, value):
    """Turn a command-line string into the type of ModelConfig's field `name`."""
    return coerce_field(name, value, ModelConfig)


def coerce_field(name: str, value, config=ModelConfig):
    """Turn a command-line string into the type of the field `name` of the config dataclass `config`
    (ModelConfig, or the encoder's EncoderConfig)."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    if name not in fields or name == "extra":
        raise ValueError(f"unknown model field {name!r}; known: {', '.join(sorted(set(fields) - {'extra'}))}")
    if not isinstance(value, str):
        return value
    default = getattr(config(), name)
    if isinstance(default, str):
        return value
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{name}={value!r}: expected true or false")
        return value.lower() in ("true", "1")
    try:
        if isinstance(default, float):
            return float(value)
        if value.lower() == "none":
            return None
        return int(value)
    except ValueError:
        kind = "a number" if isinstance(default, float) else "an integer"
        raise ValueError(f"{name}={value!r}: expected {kind}") from None


def parse_overrides(items: list[str] | None, config=ModelConfig) -> dict:
    """`["dim=128", "n_layers=2"]` -> {"dim": 128, "n_layers": 2}, typed and validated against the fields of
    `config` (ModelConfig, or EncoderConfig for an encoder)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like field=value, e.g. n_layers=4")
        k, v = item.split("=", 1)
        out[k.strip()] = coerce_field(k.strip(), v.strip(), config)
    return out


def model_config(preset: str = "micro", **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    fields = {**PRESETS[preset]}
    for k, v in overrides.items():
        fields[k] = _coerce(k, v)
    return ModelConfig(**fields)


def load_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # valid JSON that Python refuses (huge integers, deep nesting)
        raise ValueError(f"{path}: JSON Python cannot read ({str(e).split(':')[0] or 'nested too deeply'})") from None
