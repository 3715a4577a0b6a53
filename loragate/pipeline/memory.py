"""How much memory a LoRA run will need, from the base model's config.json alone (no weights, no torch).

The peak is the sum of what lives through the whole step and what one micro-batch adds:

- weights: every base parameter at its dtype's size (4-bit NF4: the decoder's linear layers at
  ~0.53 bytes a parameter with double quantization; embeddings, head and norms stay 16-bit);
- the adapter: LoRA parameters in float32 with their gradients and AdamW's two moments (16 bytes each);
- activations kept for the backward pass: per token and layer ``ACT_H * hidden + ACT_I * intermediate``
  values (+ the attention scores where the attention is not fused), or with gradient checkpointing
  one hidden state per token and layer plus one layer recomputed;
- the logits: per token ``vocab`` values at the compute dtype, their float32 copy for the loss and
  the gradients of both;
- a fixed overhead (the CPU process's libraries, or the CUDA context) and a margin on the sum.

The constants were fitted to peaks measured on this machine (bench/train_memory.py prints the
estimate beside each measured peak) and are meant to err high.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

GB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES = 0.53  # 4 bits + absmax per 64 (double-quantized: ~0.127 bits) + padding
ACT_H, ACT_I = 12, 4  # stored activation values per token per layer: x hidden, x intermediate
LOGIT_COPIES_FP32 = 2  # the loss's float32 logits and their gradient
OVERHEAD = {"cpu": 0.9 * GB, "cuda": 1.0 * GB}  # torch + transformers in RSS; the CUDA context and kernels
MARGIN = 1.10  # allocator slack


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory, read from a Llama-like config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, base_dir: str | Path) -> ModelShape:
        path = Path(base_dir) / "config.json"
        try:
            config = json.loads(path.read_text())
            config = config.get("text_config", config)  # multimodal wrappers keep the decoder's sizes there
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                hidden=hidden,
                intermediate=int(config.get("intermediate_size") or 4 * hidden),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab=int(config["vocab_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"base model {base_dir}: cannot read its sizes from config.json: {exc}") from None

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer, by its usual name."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.module_shapes().values())

    @property
    def other_params(self) -> int:
        """Embeddings, the head (unless tied) and the norms."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        shapes = self.module_shapes()
        return self.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)


@dataclass(frozen=True)
class Plan:
    """The options that decide memory."""

    device: str  # "cpu" | "cuda"
    precision: str  # "fp32" | "bf16" | "fp16": the base weights' and the activations' dtype
    quantization: str | None  # None | "nf4"
    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool
    rank: int
    targets: tuple[str, ...]
    fused_attention: bool = True  # sdpa/flash: no seq x seq scores kept


@dataclass(frozen=True)
class Estimate:
    weights: float
    adapter: float  # LoRA params, gradients, AdamW moments
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return (self.weights + self.adapter + self.activations + self.logits + self.overhead) * MARGIN

    def describe(self) -> str:
        parts = (
            ("weights", self.weights),
            ("adapter+optimizer", self.adapter),
            ("activations", self.activations),
            ("logits", self.logits),
            ("runtime", self.overhead),
        )
        return f"{self.total / GB:.1f} GB (" + ", ".join(f"{n} {v / GB:.2f}" for n, v in parts) + f", x{MARGIN} slack)"


def estimate(shape: ModelShape, plan: Plan) -> Estimate:
    size = DTYPE_BYTES[plan.precision]
    if plan.quantization == "nf4":
        weights = shape.linear_params * NF4_BYTES + shape.other_params * size
    else:
        weights = shape.params * size
    adapter = shape.lora_params(plan.rank, plan.targets) * 16
    tokens = plan.micro_batch * plan.seq_len
    per_layer = ACT_H * shape.hidden + ACT_I * shape.intermediate
    scores = 0 if plan.fused_attention else 2 * shape.heads * plan.seq_len
    if plan.gradient_checkpointing:  # layer inputs kept, one layer at a time recomputed
        activations = tokens * size * (shape.layers * shape.hidden + per_layer + scores)
    else:
        activations = tokens * size * shape.layers * (per_layer + scores)
    logits = tokens * shape.vocab * (2 * size + LOGIT_COPIES_FP32 * 4)
    return Estimate(weights, adapter, activations, logits, OVERHEAD[plan.device])


def remedies(shape: ModelShape, plan: Plan, budget: float) -> Plan | None:
    """The least change of options that fits ``budget`` bytes: checkpointing, then smaller micro-batches,
    then (on CUDA) a 16-bit and then a 4-bit base; None if nothing does."""
    steps: list[Plan] = []
    current = plan
    if not current.gradient_checkpointing:
        current = replace(current, gradient_checkpointing=True)
        steps.append(current)
    while current.micro_batch > 1:
        current = replace(current, micro_batch=max(1, current.micro_batch // 2))
        steps.append(current)
    if plan.device == "cuda":
        if current.precision == "fp32":
            current = replace(current, precision="bf16")
            steps.append(current)
        if current.quantization is None:
            current = replace(current, quantization="nf4")
            steps.append(current)
    for candidate in steps:
        if estimate(shape, candidate).total <= budget:
            return candidate
    return None


def flags(old: Plan, new: Plan) -> str:
    """The command-line options that turn ``old`` into ``new``."""
    out = []
    if new.gradient_checkpointing and not old.gradient_checkpointing:
        out.append("--gradient-checkpointing on")
    if new.micro_batch != old.micro_batch:
        out.append(f"--micro-batch-size {new.micro_batch}")
    if new.precision != old.precision:
        out.append(f"--precision {new.precision}")
    if new.quantization != old.quantization:
        out.append(f"--quantization {new.quantization}")
    return " ".join(out)
