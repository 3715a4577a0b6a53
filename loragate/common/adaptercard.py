"""The adapter card: what ``card.json`` holds for one adapter version, as pydantic models.

Lineage (the base model's hash, the parent, the training data and run), the evaluation gate's results, the
approval, the pipeline's events and the version's state with its history. loragate/common/registry.py stores,
verifies and moves them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

SCHEMA_VERSION = 1

State = Literal["candidate", "rejected", "shadow", "canary", "stable", "retired"]


class BaseModelRef(BaseModel):
    name: str
    path: str | None = None
    sha256: str  # over config.json, tokenizer files and weights (see base_model_sha256)


class Artifact(BaseModel):
    location: str
    sha256: str  # adapter_model.safetensors
    config_sha256: str  # adapter_config.json (alpha, rank and modules change what the weights do)
    bytes: int


class PeftInfo(BaseModel):
    r: int
    lora_alpha: float
    target_modules: list[str]
    lora_dropout: float = 0.0


class TrainingData(BaseModel):
    location: str
    sha256: str
    rows: int  # usable rows in the dataset
    train_rows: int
    held_out_rows: int
    held_out_location: str | None = None
    held_out_sha256: str | None = None
    window_start: float | None = None  # unix seconds of the traffic the dataset came from
    window_end: float | None = None
    trigger: dict[str, Any] | None = None  # the drift report / trigger run that caused it


class TrainingRun(BaseModel):
    command: list[str]
    seed: int
    duration_s: float
    backend: str = "torch-loop"
    epochs: int = 0
    steps: int = 0
    tokens: int = 0  # answer tokens the loss was computed on
    tokens_per_s: float = 0.0  # all tokens through the model per second
    loss_first: float | None = None
    loss_last: float | None = None
    loss_min: float | None = None
    loss_log: str | None = None  # JSONL beside the card
    # How the run fitted its hardware (loragate train's options, resolved; absent on older cards).
    precision: str | None = None  # fp32 | bf16 | fp16: the base weights' and the activations' dtype
    quantization: str | None = None  # nf4 (QLoRA: a 4-bit base) or none
    effective_batch: int | None = None  # rows per optimizer step: micro_batch x accumulation x processes
    micro_batch: int | None = None
    accumulation: int | None = None
    processes: int | None = None
    gradient_checkpointing: bool | None = None
    max_len: int | None = None  # the longest row trained on, in tokens (the data's, capped)
    checkpoints_resumed: list[int] = Field(default_factory=list)  # steps of the checkpoints the run continued from
    hardware: str | None = None  # e.g. "2 x NVIDIA H100 80GB HBM3 (80 GB)"
    memory_estimate_gb: float | None = None  # the estimate before loading, one process
    memory_peak_gb: float | None = None  # measured: the GPU's peak allocation, or the process's peak RSS


class Evaluation(BaseModel):
    at: float
    baseline: str  # name/version
    data: str
    data_sha256: str | None = None
    metric: str = "nll_per_token"
    examples: int
    tokens: int
    candidate_nll: float
    baseline_nll: float
    delta: float  # candidate - baseline (lower is better)
    ci_low: float
    ci_high: float
    confidence: float
    margin: float  # non-inferiority: pass when ci_high <= margin
    candidate_f1: float | None = None
    baseline_f1: float | None = None
    regression: dict[str, Any] | None = None  # the same numbers on the fixed regression set
    verdict: Literal["pass", "fail"]
    reason: str


class StateChange(BaseModel):
    state: State
    at: float
    by: str = "loragate"
    reason: str = ""


class Approval(BaseModel):
    by: str
    at: float
    note: str = ""


class Event(BaseModel):
    """A step done for this version outside training and evaluation (the monitor's pipeline action)."""

    step: str  # e.g. pipeline, load, route, rollout
    result: str  # ok, failed, waiting, ...
    at: float
    detail: str = ""


class AdapterCard(BaseModel):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    base: BaseModelRef
    artifact: Artifact
    peft: PeftInfo
    data: TrainingData | None = None
    parent: str | None = None  # name/version, or a path for an unregistered adapter
    training: TrainingRun | None = None
    evaluations: list[Evaluation] = Field(default_factory=list)
    approval: Approval | None = None
    events: list[Event] = Field(default_factory=list)
    state: State = "candidate"
    history: list[StateChange] = Field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def served_name(self) -> str:
        """The adapter's name on the engine (``/v1/load_lora_adapter``)."""
        return f"{self.name}-{self.version}"

    @property
    def verdict(self) -> str | None:
        return self.evaluations[-1].verdict if self.evaluations else None
