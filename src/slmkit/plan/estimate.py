"""The planner's cost model: time, throughput, memory and disk of one run on this machine, from its calibration
(machine.py). Every number is a fitted linear model evaluated at the run's shape:

    training step s   = train_fit . [1, layers, tokens*dim*layers, tokens*train FLOPs/token]
    a LoRA step s     = lora_fit  . (the same terms)
    a token, batch 1  = decode_fit . [1, layers, weight bytes]                   (generate_ids: `slm generate`)
    an engine step    = serve_fit . [1, layers, weight bytes, rows, rows*forward FLOPs/token]   (`slm serve`)
    saved activations = activation_fit . [tokens*dim*layers, tokens*hidden*layers, tokens*seq*heads*layers,
                                          tokens*vocab]
    peak memory       = the trainer process's baseline + fp32 weights + gradients + AdamW's two moments (of what
                        trains) + bf16 weight copies under autocast + saved activations + the fp32 logits twice

A LoRA step is its own fit on the same terms (lora_fit, measured on LoRA steps: no base gradients, but the
adapters' small matmuls, dropout and casts per projection); a calibration without it takes train_fit with 4/6 of
the FLOPs (backward through frozen weights costs about 2 of training's 6 FLOPs per weight). Distillation adds the
teacher's forward pass (a third of its training step), its weights, and the loss's own work over the vocabulary
(kd_fit: the teacher's and the student's log-softmax, the divergence and its gradient, in time and peak bytes per
token x vocabulary entry). Time to first token is a batch-1 forward over the prompt (a third of a training step's
cost at that length); serving N clients is an engine step of N rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from slmkit.model.config import ModelConfig
from slmkit.plan.machine import Machine, activation_terms, decode_terms, kd_terms, serve_terms, train_terms


@dataclass
class RunEstimate:
    params: int
    trainable_params: int
    train_tokens_per_s: float
    train_step_s: float
    peak_rss_mb: float
    checkpoint_disk_mb: float
    decode_tokens_per_s: float  # torch backend, fp32, batch 1
    ttft_s: float  # for `prompt_tokens`
    serve_tokens_per_s: float  # all `clients` decoding at once
    clients: int
    prompt_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _dot(coef: list[float], terms: list[float]) -> float:
    return sum(c * t for c, t in zip(coef, terms, strict=True))


def train_step_seconds(m: Machine, cfg: ModelConfig, batch: int, seq: int, lora: bool = False,
                       teacher: ModelConfig | None = None) -> float:
    terms = train_terms(cfg, batch, seq)
    if lora and m.lora_fit:
        seconds = _dot(m.lora_fit, terms)
    elif lora:  # a calibration without LoRA steps: no base gradients, 4 of training's 6 FLOPs per weight
        seconds = _dot(m.train_fit, [*terms[:3], terms[3] * 4 / 6])
    else:
        seconds = _dot(m.train_fit, terms)
    if teacher is not None:
        t = train_terms(teacher, batch, seq)
        seconds += _dot(m.train_fit, [0.0, t[1], t[2] / 3, t[3] / 3])
        seconds += m.kd_fit[0] * kd_terms(batch, seq, teacher.vocab_size)
    return seconds


def activation_bytes(m: Machine, cfg: ModelConfig, batch: int, seq: int) -> float:
    return _dot(m.activation_fit, activation_terms(cfg, batch, seq))


def train_peak_rss_mb(m: Machine, cfg: ModelConfig, batch: int, seq: int, lora_params: int | None = None,
                      teacher: ModelConfig | None = None) -> float:
    params = cfg.num_params()
    trainable = params if lora_params is None else lora_params
    bytes_ = 4 * params + 4 * trainable + 8 * trainable
    if m.precision == "bf16":
        bytes_ += 2 * params  # autocast's bf16 copies of the weights, kept for backward
    bytes_ += activation_bytes(m, cfg, batch, seq) + 2 * 4 * batch * seq * cfg.vocab_size
    if teacher is not None:
        bytes_ += 4 * teacher.num_params() + m.kd_fit[1] * kd_terms(batch, seq, teacher.vocab_size)
    return m.baseline_rss_mb + bytes_ / 2**20


def decode_step_seconds(m: Machine, cfg: ModelConfig, batch: int = 1) -> float:
    """Seconds per token at batch 1 (`slm generate`), or per step of the serving engine with `batch` rows."""
    if batch == 1:
        return _dot(m.decode_fit, decode_terms(cfg))
    return _dot(m.serve_fit, serve_terms(cfg, batch))


def estimate_run(m: Machine, cfg: ModelConfig, batch: int = 16, seq: int = 256, lora_params: int | None = None,
                 teacher: ModelConfig | None = None, clients: int = 16, prompt_tokens: int = 128) -> RunEstimate:
    """The estimate for training `cfg` at `batch` x `seq` (LoRA when `lora_params`: the adapters' size; with a
    `teacher`: distillation) and serving it."""
    step = train_step_seconds(m, cfg, batch, seq, lora=lora_params is not None, teacher=teacher)
    params = cfg.num_params()
    trainable = params if lora_params is None else lora_params
    t = train_terms(cfg, 1, prompt_tokens)
    prefill = _dot(m.train_fit, [1.0, t[1], t[2] / 3, t[3] / 3])  # a forward pass: a third of the step's work
    # checkpoint: the model files and AdamW's moments (+ the final model directory beside it)
    disk = (4 * params + 8 * trainable + 4 * params) / 2**20
    return RunEstimate(
        params=params, trainable_params=trainable, train_tokens_per_s=batch * seq / step, train_step_s=step,
        peak_rss_mb=train_peak_rss_mb(m, cfg, batch, seq, lora_params, teacher), checkpoint_disk_mb=disk,
        decode_tokens_per_s=1 / decode_step_seconds(m, cfg, 1), ttft_s=prefill + decode_step_seconds(m, cfg, 1),
        serve_tokens_per_s=clients / decode_step_seconds(m, cfg, clients), clients=clients,
        prompt_tokens=prompt_tokens)
