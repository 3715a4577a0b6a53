"""loragate train's options before any torch: the memory estimate and its refusal, option checks,
the batch plan (resume and data parallel see the same steps), the workers' command line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from loragate.pipeline import memory
from loragate.pipeline.batches import epoch_plan
from loragate.pipeline.commands import _without_processes
from loragate.pipeline.distributed import World
from loragate.pipeline.hardware import GB, Hardware
from tests.processes import ROOT

# Llama-3.1-8B's config.json sizes (public): 8.03 B parameters.
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "model_type": "llama",
}
H100 = Hardware("cuda", "NVIDIA H100 80GB HBM3", 1, 80 * GB, 79 * GB, bf16=True)
CPU = Hardware("cpu", "test CPU", 1, 16 * GB, 12 * GB, bf16=False)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def shape_8b(tmp_path: Path) -> memory.ModelShape:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    return memory.ModelShape.from_config(tmp_path)


def plan(**kw) -> memory.Plan:
    base = dict(
        device="cuda",
        precision="bf16",
        quantization=None,
        micro_batch=8,
        seq_len=2048,
        gradient_checkpointing=False,
        rank=16,
        targets=ATTN,
    )
    return memory.Plan(**{**base, **kw})


def test_parameter_count_and_weights_match_the_published_8b_model(tmp_path):
    shape = shape_8b(tmp_path)
    assert abs(shape.params - 8.03e9) / 8.03e9 < 0.005
    bf16 = memory.estimate(shape, plan())
    assert 14.8 < bf16.weights / GB < 15.1  # 8.03e9 x 2 bytes
    nf4 = memory.estimate(shape, plan(quantization="nf4"))
    assert 5.0 < nf4.weights / GB < 6.0  # 7B linear at ~0.53 B + 1.05 B embeddings/head at 2 B (QLoRA papers: ~5.5)
    fp32 = memory.estimate(shape, plan(precision="fp32"))
    assert fp32.weights == 2 * bf16.weights
    # LoRA r=16 on q,k,v,o: 32 x 16 x (4096+4096 + 4096+1024 + 4096+1024 + 4096+4096) = 13.6 M params, 16 B each
    assert shape.lora_params(16, ATTN) == 32 * 16 * (8192 + 5120 + 5120 + 8192)
    assert bf16.adapter == shape.lora_params(16, ATTN) * 16


def test_each_option_lowers_the_estimate_the_way_it_should(tmp_path):
    shape = shape_8b(tmp_path)
    full = memory.estimate(shape, plan())
    ckpt = memory.estimate(shape, plan(gradient_checkpointing=True))
    small = memory.estimate(shape, plan(micro_batch=1))
    assert ckpt.activations < full.activations / 10  # one hidden state per layer instead of ~28 values
    assert small.activations == pytest.approx(full.activations / 8)
    assert small.logits == pytest.approx(full.logits / 8)
    assert ckpt.weights == full.weights and ckpt.logits == full.logits


def test_remedies_name_the_least_change_that_fits(tmp_path):
    shape = shape_8b(tmp_path)
    p = plan(micro_batch=8)
    need = memory.estimate(shape, p).total
    assert need > 80 * GB  # bf16, micro-batch 8 x 2048 without checkpointing does not fit an H100
    fix = memory.remedies(shape, p, 79 * GB)
    assert fix is not None and fix.gradient_checkpointing and memory.estimate(shape, fix).total <= 79 * GB
    assert memory.flags(p, fix).startswith("--gradient-checkpointing on")
    tiny = memory.remedies(shape, plan(micro_batch=1, gradient_checkpointing=True), 12 * GB)
    assert tiny is not None and tiny.quantization == "nf4"  # only a 4-bit base fits 12 GB
    assert memory.remedies(shape, plan(device="cpu", precision="fp32"), 4 * GB) is None  # nothing on a CPU


def _config(tmp_path: Path, base: Path, **kw):
    from loragate.pipeline.train import TrainConfig

    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"question {i} " * 40},
                        {"role": "assistant", "content": f"answer {i} " * 40},
                    ]
                }
            )
            + "\n"
            for i in range(20)
        )
    )
    return TrainConfig(
        dataset=str(data), base_model=str(base), registry=str(tmp_path / "reg"), name="s", version="v1", **kw
    )


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> Path:
    """A tokenizer directory: the demo model's when one was built, else a tokenizer alone (a few seconds;
    the whole demo model, weights and adapters, takes most of a minute on a fresh checkout)."""
    demo = ROOT / ".cache" / "demo-model" / "base"
    if (demo / "tokenizer.json").is_file():
        return demo
    from loragate.service.demo_model import build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out, vocab_size=2000)
    return out


@pytest.fixture
def base_8b(tmp_path, tokenizer_files):
    """An 8B-shaped base model directory: config and tokenizer only (no weights are read before the estimate)."""
    base = tmp_path / "llama-8b"
    base.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer_files / name).is_file():
            (base / name).write_bytes((tokenizer_files / name).read_bytes())
    (base / "config.json").write_text(json.dumps(LLAMA_8B))
    (base / "model.safetensors").write_bytes(b"not read")
    return base


def test_a_run_that_cannot_fit_is_refused_in_a_second_with_the_numbers_and_the_fix(tmp_path, base_8b):
    from loragate.pipeline.train import TrainError, prepare

    config = _config(
        tmp_path, base_8b, precision="fp32", micro_batch_size=8, gradient_checkpointing="off", memory_limit_gb=30
    )
    started = time.monotonic()
    with pytest.raises(TrainError) as err:
        prepare(config, hardware=H100, world=World())
    assert time.monotonic() - started < 1.0
    message = str(err.value)
    assert "this run needs about" in message and "weights 29.9" in message and "30.0 GB free" in message
    assert "--precision bf16" in message and "would need" in message  # fp32 8B weights alone are 30 GB
    assert "\n" not in message
    assert not (tmp_path / "reg" / "s").exists()

    # auto picks what fits: bf16 on an H100, the largest micro-batch, checkpointing only if needed
    ok = prepare(_config(tmp_path, base_8b, batch_size=16), hardware=H100, world=World())
    assert ok.plan.precision == "bf16" and ok.estimate.total <= H100.memory_free
    assert ok.effective_batch >= 16 and ok.plan.micro_batch * ok.accumulation >= 16
    two = prepare(_config(tmp_path, base_8b, batch_size=16), hardware=H100, world=World(0, 2, 0))
    assert two.plan.micro_batch * two.accumulation * 2 == two.effective_batch >= 16


def test_option_errors_are_one_line_and_qlora_needs_cuda(tmp_path, base_8b):
    from loragate.pipeline.train import TrainError, prepare

    with pytest.raises(TrainError, match=r"^--quantization nf4 \(QLoRA\) needs a CUDA GPU"):
        prepare(_config(tmp_path, base_8b, quantization="nf4"), hardware=CPU, world=World())
    with pytest.raises(TrainError, match="fp16 needs a CUDA GPU"):
        prepare(_config(tmp_path, base_8b, precision="fp16"), hardware=CPU, world=World())
    with pytest.raises(TrainError, match="--precision must be one of"):
        prepare(_config(tmp_path, base_8b, precision="fp8"), hardware=H100, world=World())
    # the CLI: exit 2, one line, no traceback, in well under the time torch takes to import
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loragate",
            "train",
            "--dataset",
            str(tmp_path / "data.jsonl"),
            "--base-model",
            str(base_8b),
            "--registry",
            str(tmp_path / "reg"),
            "--name",
            "s",
            "--version",
            "v1",
            "--quantization",
            "nf4",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "needs a CUDA GPU" in result.stderr
    # deciding takes no torch (checked in a fresh interpreter: other tests in this one may have imported it)
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; import loragate.pipeline.train; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert probe.stdout.strip() == "False", probe.stderr


def test_the_cpu_default_micro_batch_accumulates_to_the_batch(tmp_path, base_8b):
    from loragate.pipeline.train import prepare
    from loragate.pipeline.trainprep import CPU_MICRO_BATCH

    small = dict(
        LLAMA_8B,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=2000,
    )
    (base_8b / "config.json").write_text(json.dumps(small))
    prepared = prepare(_config(tmp_path, base_8b, batch_size=8), hardware=CPU, world=World())
    assert prepared.plan.micro_batch == CPU_MICRO_BATCH and prepared.plan.precision == "fp32"
    assert prepared.plan.micro_batch * prepared.accumulation == 8 and not prepared.plan.gradient_checkpointing
    longest = max(len(e.prompt_ids) + len(e.answer_ids) for e in prepared.train_examples)
    assert prepared.plan.seq_len == longest <= 2048  # from the data, under the cap


def test_batch_plans_are_the_same_for_one_process_or_many_and_for_a_resumed_run():
    lengths = [(i * 37) % 101 + 5 for i in range(203)]
    one = epoch_plan(lengths, seed=3, epoch=1, micro_batch=2, accumulation=4, world=1, group_by_length=True)
    two = epoch_plan(lengths, seed=3, epoch=1, micro_batch=2, accumulation=2, world=2, group_by_length=True)
    assert one == two
    assert one == epoch_plan(lengths, seed=3, epoch=1, micro_batch=2, accumulation=4, world=1, group_by_length=True)
    assert one != epoch_plan(lengths, seed=3, epoch=2, micro_batch=2, accumulation=4, world=1, group_by_length=True)
    rows = [i for s in one for m in s.micro_batches for i in m]
    assert sorted(rows) == list(range(203))  # every row once an epoch
    assert [len(s.for_rank(0, 2)) for s in two[:-1]] == [2] * (len(two) - 1)
    # grouping by length: far less padding than the shuffled order
    plain = epoch_plan(lengths, seed=3, epoch=1, micro_batch=4, accumulation=1, world=1, group_by_length=False)
    grouped = epoch_plan(lengths, seed=3, epoch=1, micro_batch=4, accumulation=1, world=1, group_by_length=True)

    def padded(steps):
        return sum(len(m) * max(lengths[i] for i in m) for s in steps for m in s.micro_batches)

    assert padded(grouped) < 0.75 * padded(plain)
    assert padded(grouped) >= sum(lengths)


def test_workers_run_the_same_command_less_processes():
    argv = ["train", "--dataset", "d", "--processes", "2", "--seed", "1", "--processes=3", "--no-progress"]
    assert _without_processes(argv) == ["train", "--dataset", "d", "--seed", "1", "--no-progress"]


def test_a_plan_is_hashable_and_replace_keeps_the_rest():
    p = plan()
    assert replace(p, micro_batch=1).seq_len == p.seq_len and hash(p)


def test_the_latest_checkpoint_is_the_highest_complete_one(tmp_path):
    from loragate.pipeline import checkpoint

    assert checkpoint.latest(tmp_path) is None
    for name in ("step-0000003", "step-0000012", "step-0000015.partial", "step-x", "other"):
        (tmp_path / checkpoint.DIRECTORY / name).mkdir(parents=True)
    assert checkpoint.latest(tmp_path) == tmp_path / checkpoint.DIRECTORY / "step-0000012"
