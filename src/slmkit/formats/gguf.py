"""GGUF, llama.cpp's single-file format, both ways: read any llama-architecture GGUF into slmkit, write one.

Three things differ between a GGUF and a Hugging Face / slmkit model directory:

1. Tensor names (`blk.0.attn_q.weight` for `layers.0.self_attn.q_proj.weight`), see `_NAMES`.
2. The rows of q_proj and k_proj. HF's RoPE rotates the two halves of each head ("rotate half"); llama.cpp
   rotates adjacent pairs. llama.cpp's converter reorders the rows of each head from [x0..x(d/2-1), y0..]
   to [x0, y0, x1, y1, ...] so that both compute the same attention; `_to_pairs` / `_to_halves` do that.
3. The tokenizer lives in metadata: token strings, types, BPE merges and a named pre-tokenizer
   (`tokenizer.ggml.pre`) that selects llama.cpp's built-in splitting regex. slmkit's byte-level BPE and
   GPT-2's split like llama.cpp's "gpt-2"; SmolLM2's splits digits first, like its "smollm".

Reading dequantizes every tensor (F32/F16/BF16/Q8_0/Q4_0/Q4_1/K-quants, via the `gguf` package) to float.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from slmkit.formats.hf_dir import load_dir, model_from_state_dict
from slmkit.model.config import ModelConfig

# slmkit name (inside layers.N. for per-layer tensors) -> GGUF name
_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
_BLOCK_QUANTS = {"q8_0": "Q8_0", "q5_1": "Q5_1", "q5_0": "Q5_0", "q4_1": "Q4_1", "q4_0": "Q4_0"}

# How llama.cpp names the pre-tokenizers slmkit can reproduce exactly (see `_pre_tokenizer_name`).
PRE_GPT2, PRE_SMOLLM = "gpt-2", "smollm"


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF support needs the `gguf` package: pip install gguf") from e
    return gguf


def gguf_name(name: str) -> str:
    if name in _NAMES:
        return _NAMES[name]
    _, layer, rest = name.split(".", 2)  # layers.N.rest
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def slmkit_name(name: str) -> str | None:
    for ours, theirs in _NAMES.items():
        if name == theirs:
            return ours
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        for ours, theirs in _LAYER_NAMES.items():
            if rest == theirs:
                return f"layers.{layer}.{ours}"
    return None


def _to_pairs(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved pairs, per head (what convert_hf_to_gguf does)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `_to_pairs`."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- reading ----------------------------------------------------------------------------------------------

def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_context_length(path: str | Path) -> int:
    """The context a GGUF's model was trained for (`{architecture}.context_length`; 2048 when absent)."""
    reader = _gguf().GGUFReader(str(path))
    arch = _field(reader, "general.architecture", "llama")
    return int(_field(reader, f"{arch}.context_length", 2048))


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(ModelConfig, slmkit state dict, Tokenizer) of a llama-architecture GGUF file, dequantized to `dtype`."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueErrors/struct errors on a damaged file
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (slmkit reads llama-architecture GGUF: "
                         "Llama, SmolLM, TinyLlama, Mistral-style models)")
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: RoPE scaling {scaling!r} is not supported by slmkit's model")

    tokenizer = read_gguf_tokenizer(reader, path)
    n_heads = int(_field(reader, "llama.attention.head_count"))
    dim = int(_field(reader, "llama.embedding_length"))
    tensors = {}
    for t in reader.tensors:
        name = slmkit_name(t.name)
        if name is None:
            if t.name == "rope_freqs.weight":
                raise ValueError(f"{path}: rope_freqs (Llama-3 RoPE scaling) is not supported")
            raise ValueError(f"{path}: unexpected tensor {t.name!r} for a llama model")
        # The reader's array is in PyTorch's (out, in) order; quantized blocks expand along the last axis.
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[name] = torch.from_numpy(np.array(array, dtype=np.float32)).to(dtype)

    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_field(reader, "llama.rope.dimension_count", dim // n_heads))
    if head_dim * n_heads != dim:
        raise ValueError(f"{path}: head size {head_dim} x {n_heads} heads != embedding length {dim}; "
                         "slmkit's model needs dim == n_heads * head_dim")
    for name in list(tensors):
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = n_heads if name.endswith("q_proj.weight") else n_kv
            tensors[name] = torch.from_numpy(_to_halves(tensors[name].float().numpy(), heads)).to(dtype)

    embed = tensors["embed_tokens.weight"]
    cfg = ModelConfig(
        vocab_size=embed.shape[0], dim=dim, n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads, n_kv_heads=n_kv, hidden_dim=int(_field(reader, "llama.feed_forward_length")),
        max_seq_len=int(_field(reader, "llama.context_length", 2048)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="lm_head.weight" not in tensors,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
    )
    return cfg, tensors, tokenizer


def load_gguf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a GGUF file, dequantized to `dtype`."""
    cfg, tensors, tokenizer = read_gguf(path)
    return model_from_state_dict(cfg, tensors, device, dtype, source=str(path)), tokenizer


def read_gguf_tokenizer(reader, path: Path):
    """Rebuild the Hugging Face tokenizer a GGUF's metadata describes (byte-level BPE only)."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    from slmkit.tokenizer import Tokenizer

    gguf = _gguf()
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported (slmkit reads byte-level BPE, "
                         "tokenizer.ggml.model = 'gpt2'; SentencePiece 'llama' vocabularies are not yet)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    pre = _field(reader, "tokenizer.ggml.pre", "default")

    vocab = {tok: i for i, tok in enumerate(tokens)}
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (PRE_GPT2, "default"):
        hf.pre_tokenizer = byte_level
    elif pre == PRE_SMOLLM:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported (slmkit reproduces llama.cpp's "
                         f"{PRE_GPT2!r} and {PRE_SMOLLM!r})")
    hf.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=types[i] == gguf.TokenType.CONTROL, normalized=False)
             for i in range(len(tokens)) if types[i] in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    hf.add_tokens(added)

    def token(key):
        i = _field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos, pad = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"), \
        token("tokenizer.ggml.padding_token_id")
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    return Tokenizer(hf, bos_token=bos, eos_token=eos, pad_token=pad,
                     chat_template=_field(reader, "tokenizer.chat_template"),
                     add_bos=bool(add_bos) if add_bos is not None else None)


def precision_rank(path: str | Path) -> int:
    """0 for an all-F32 file, then F16, BF16, Q8_0, anything else: lower is closer to the original weights."""
    reader = _gguf().GGUFReader(str(path))
    file_type = _field(reader, "general.file_type")
    return {0: 0, 1: 1, 32: 2, 7: 3}.get(None if file_type is None else int(file_type), 4)


# --- writing ----------------------------------------------------------------------------------------------

def _pre_tokenizer_name(hf_json: dict) -> str:
    """llama.cpp's name for a tokenizer's pre-tokenizer, when its splitting is exactly one llama.cpp knows."""
    pre = hf_json.get("pre_tokenizer") or {}

    def is_byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    if is_byte_level(pre):
        return PRE_GPT2
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and is_byte_level(parts[1])):
            return PRE_SMOLLM
    raise ValueError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) has no exact llama.cpp "
                     f"equivalent; GGUF export supports byte-level BPE split like {PRE_GPT2!r} or {PRE_SMOLLM!r}")


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """tokens, token types, merges, pre-tokenizer name of `tokenizer`, padded to the model's `vocab_size`."""
    gguf = _gguf()
    hf_json = json.loads(tokenizer.hf.to_str())
    model = hf_json["model"]
    if model.get("type") != "BPE" or (hf_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError("GGUF export supports byte-level BPE tokenizers only")
    pre = _pre_tokenizer_name(hf_json)
    n = tokenizer.vocab_size
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model only {vocab_size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for tok, i in model["vocab"].items():
        tokens[i], types[i] = tok, gguf.TokenType.NORMAL
    for i, added in tokenizer.hf.get_added_tokens_decoder().items():
        tokens[i] = added.content
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"pre": pre, "tokens": tokens, "types": [int(t) for t in types], "merges": merges}


def _tensor_for(name: str, w: np.ndarray, quant: str, gguf):
    """(data, raw_dtype) for one tensor in the requested precision; 1-D norms always stay F32."""
    Q = gguf.GGMLQuantizationType
    if w.ndim == 1 or quant == "f32":
        return w.astype(np.float32), None
    if quant == "f16":
        return w.astype(np.float16), None
    if quant == "bf16":
        return gguf.quants.quantize(w.astype(np.float32), Q.BF16), Q.BF16
    if quant in _BLOCK_QUANTS:
        if w.shape[-1] % 32:  # blocks are 32 values along a row; llama.cpp falls back to f16 the same way
            return w.astype(np.float16), None
        qtype = Q[_BLOCK_QUANTS[quant]]
        return gguf.quants.quantize(w.astype(np.float32), qtype), qtype
    raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")


def write_gguf(model_dir: str | Path, out: str | Path, quant: str = "f32", name: str | None = None) -> Path:
    """Write the model directory (or run directory, or GGUF file) `model_dir` as a llama-architecture GGUF."""
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    if Path(model_dir).suffix.lower() == ".gguf":
        model, tokenizer = load_gguf(model_dir)
    else:
        model, tokenizer = load_dir(model_dir)
    return write_model_gguf(model, tokenizer, out, quant, name or Path(model_dir).resolve().name)


def write_model_gguf(model, tokenizer, out: str | Path, quant: str = "f32", name: str = "slmkit model") -> Path:
    """Write a loaded slmkit model and its tokenizer as a GGUF file `out` (atomically)."""
    from slmkit.files import atomic_path

    gguf = _gguf()
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    cfg = model.cfg
    meta = tokenizer_metadata(tokenizer, cfg.vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16}
    file_type = file_types[quant] if quant in file_types else gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"]

    out = Path(out)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(name)
        w.add_block_count(cfg.n_layers)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(file_type)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(meta["pre"])
        w.add_token_list(meta["tokens"])
        w.add_token_types(meta["types"])
        w.add_token_merges(meta["merges"])
        for add, token_id in [(w.add_bos_token_id, tokenizer.bos_id), (w.add_eos_token_id, tokenizer.eos_id),
                              (w.add_pad_token_id, tokenizer.pad_id)]:
            if token_id is not None:
                add(token_id)
        w.add_add_bos_token(bool(tokenizer.add_bos))
        w.add_add_eos_token(False)
        if tokenizer.chat_template:
            w.add_chat_template(tokenizer.chat_template)

        for slm_name, t in model.state_dict().items():
            if slm_name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # llama.cpp reuses token_embd when output.weight is absent
            if slm_name.startswith("rope_"):
                continue
            a = t.detach().float().cpu().numpy()
            if slm_name.endswith("q_proj.weight"):
                a = _to_pairs(a, cfg.n_heads)
            elif slm_name.endswith("k_proj.weight"):
                a = _to_pairs(a, cfg.n_kv_heads)
            data, raw_dtype = _tensor_for(slm_name, a, quant, gguf)
            # Quantized data is a uint8 array of blocks; the writer derives the element shape from it.
            w.add_tensor(gguf_name(slm_name), data, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out



# --- LoRA adapters ----------------------------------------------------------------------------------------

def _base_config(base: str | Path) -> ModelConfig:
    """The shape of the base model a LoRA GGUF is written for: a model/run directory or a GGUF file."""
    from slmkit.formats.hf_dir import find_model_dir
    from slmkit.model.config import load_json
    base = Path(base)
    if base.suffix.lower() != ".gguf":
        return ModelConfig.from_hf(load_json(find_model_dir(base) / "config.json"))
    if not base.is_file():
        raise FileNotFoundError(f"{base}: no such GGUF file")
    reader = _gguf().GGUFReader(str(base))
    n_heads = int(_field(reader, "llama.attention.head_count"))
    vocab = next((int(t.shape[1]) for t in reader.tensors if t.name == "token_embd.weight"), 0)
    return ModelConfig(vocab_size=vocab, dim=int(_field(reader, "llama.embedding_length")),
                       n_layers=int(_field(reader, "llama.block_count")), n_heads=n_heads,
                       n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
                       hidden_dim=int(_field(reader, "llama.feed_forward_length")))


def _projection_shape(cfg: ModelConfig, projection: str) -> tuple[int, int]:
    """(out, in) of one of a layer's projections (q_proj, ..., down_proj) in a model of shape `cfg`."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"q_proj": (q, cfg.dim), "k_proj": (kv, cfg.dim), "v_proj": (kv, cfg.dim), "o_proj": (cfg.dim, q),
            "gate_proj": (cfg.hidden_dim, cfg.dim), "up_proj": (cfg.hidden_dim, cfg.dim),
            "down_proj": (cfg.dim, cfg.hidden_dim)}[projection]


def write_lora_gguf(adapter: str | Path, base: str | Path, out: str | Path, name: str | None = None) -> Path:
    """Write a LoRA adapter (PEFT format, or a LoRA run) as llama.cpp's LoRA GGUF for the base model `base`
    (a model/run directory or a GGUF: its head counts order the rows, its shapes are checked), atomically.

    llama.cpp applies it unmerged, on any base precision: `llama-server --lora FILE`, llama-cpp-python's
    `Llama(lora_path=FILE)`. The file holds, per adapted weight W (`blk.N.attn_q.weight`), W.lora_a = A (r × in)
    and W.lora_b = B (out × r) in f32, and `adapter.lora.alpha`; llama.cpp scales B A x by alpha / r as PEFT does.
    B's rows of q_proj and k_proj are reordered per head like the base weights' (`_to_pairs`), so that
    B A adds to the weight llama.cpp holds, not to HF's row order.
    """
    from slmkit.files import atomic_path
    from slmkit.model.lora import find_adapter_dir, read_adapter_config, read_adapter_weights

    gguf = _gguf()
    adapter = find_adapter_dir(adapter)
    lora_cfg = read_adapter_config(adapter)
    cfg = _base_config(base)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, t in read_adapter_weights(adapter).items():  # layers.N.self_attn.q_proj.lora_A.weight
        module, _, part = key.rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ValueError(f"{adapter}: unexpected tensor {key!r} in the adapter (LoRA A/B matrices only)")
        pairs.setdefault(module, {})[part[0]] = t.detach().float().cpu().numpy()
    if not pairs:
        raise ValueError(f"{adapter}: the adapter has no LoRA matrices")

    out = Path(out)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_type("adapter")
        w.add_name(name or adapter.resolve().name)
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(lora_cfg.alpha))
        for module in sorted(pairs, key=_layer_order):
            ab = pairs[module]
            if set(ab) != {"A", "B"}:
                raise ValueError(f"{adapter}: {module} has lora_{''.join(ab)} without its pair")
            parts = module.split(".")  # layers, N, self_attn|mlp, q_proj
            if len(parts) != 4 or parts[0] != "layers" or int(parts[1]) >= cfg.n_layers:
                raise ValueError(f"{adapter}: {module} is not a layer of the base ({cfg.n_layers} layers); was the "
                                 f"adapter made for {base}?")
            a, b = ab["A"], ab["B"]
            want = _projection_shape(cfg, parts[3])
            if (b.shape[0], a.shape[1]) != want or a.shape[0] != b.shape[1]:
                raise ValueError(f"{adapter}: {module} adapts a {b.shape[0]} x {a.shape[1]} weight, the base {base} "
                                 f"has {want[0]} x {want[1]}: the adapter was made for another base model")
            if parts[3] in ("q_proj", "k_proj"):
                b = _to_pairs(b, cfg.n_heads if parts[3] == "q_proj" else cfg.n_kv_heads)
            target = gguf_name(f"{module}.weight")
            w.add_tensor(f"{target}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
            w.add_tensor(f"{target}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def _layer_order(module: str) -> tuple:
    parts = module.split(".")
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1, module)


def is_lora_gguf(path: str | Path) -> bool:
    """True for a GGUF that holds a LoRA adapter (general.type "adapter") rather than a model."""
    path = Path(path)
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return False
    return _field(_gguf().GGUFReader(str(path)), "general.type") == "adapter"
