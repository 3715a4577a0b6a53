"""Adapter registry: card round trip, sha256 checks, state machine, atomic and refused writes, CLI, metric."""

import json
import os
import subprocess
import sys
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from loragate.common.adaptercard import Evaluation, TrainingData
from loragate.common.registry import (
    CARD_FILE,
    AdapterCard,
    BaseModelRef,
    CardMismatch,
    IllegalTransition,
    Registry,
    RegistryError,
    base_model_sha256,
    new_card,
    read_card,
    verify,
)
from loragate.monitoring.adapterinfo import AdapterInfoCollector
from tests.processes import ROOT


def adapter_files(directory, weights=b"\x00weights-a" * 100, r=8):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_model.safetensors").write_bytes(weights)
    (directory / "adapter_config.json").write_text(
        json.dumps(
            {
                "r": r,
                "lora_alpha": 16,
                "target_modules": ["v_proj", "q_proj"],
                "lora_dropout": 0.0,
                "base_model_name_or_path": "/models/base",
            }
        )
    )
    return directory


def base_dir(tmp_path, vocab=2000):
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    (base / "model.safetensors").write_bytes(b"base weights")
    return base


def evaluation(verdict="pass"):
    return Evaluation(
        at=time.time(),
        baseline="support/v1",
        data="held.jsonl",
        examples=20,
        tokens=900,
        candidate_nll=5.0,
        baseline_nll=7.0,
        delta=-2.0,
        ci_low=-2.2,
        ci_high=-1.8,
        confidence=0.95,
        margin=0.02,
        verdict=verdict,
        reason="x",
    )


@pytest.fixture
def registered(tmp_path):
    registry = Registry(tmp_path / "registry")
    base = BaseModelRef(name="base", path=str(base_dir(tmp_path)), sha256=base_model_sha256(base_dir(tmp_path)))
    card = new_card(
        "support",
        "v2",
        adapter_files(tmp_path / "out"),
        base,
        parent="support/v1",
        data=TrainingData(location="d.jsonl", sha256="ab" * 32, rows=10, train_rows=8, held_out_rows=2),
    )
    directory = registry.register(card, tmp_path / "out")
    return registry, directory


def test_card_round_trip(registered, tmp_path):
    registry, directory = registered
    card = read_card(directory)
    assert (card.name, card.version, card.state, card.parent) == ("support", "v2", "candidate", "support/v1")
    assert card.peft.r == 8 and card.peft.lora_alpha == 16 and card.peft.target_modules == ["q_proj", "v_proj"]
    assert card.artifact.location == str(directory.resolve())
    assert card.artifact.bytes == len(b"\x00weights-a" * 100)
    assert [h.state for h in card.history] == ["candidate"]
    assert card.data.rows == 10
    verify(card)  # the files match
    assert registry.load("support", "v2") == card
    assert [c.ref for c in registry.cards()] == ["support/v2"]
    # the staging directory is gone, the files were copied, nothing else left behind
    assert sorted(p.name for p in directory.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        CARD_FILE,
    ]
    assert [p.name for p in registry.root.iterdir()] == ["support"]
    assert AdapterCard.model_validate_json((directory / CARD_FILE).read_text()) == card


def test_changed_weights_are_refused(registered):
    registry, directory = registered
    weights = directory / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[5] ^= 1
    weights.write_bytes(bytes(data))
    card = read_card(directory)
    with pytest.raises(CardMismatch, match="weights .* changed after registration"):
        verify(card)
    registry.update(directory, lambda c: c.evaluations.append(evaluation("pass")))
    with pytest.raises(CardMismatch):
        registry.transition(directory, "canary")
    assert read_card(directory).state == "candidate"  # the refused change was not written


def test_changed_adapter_config_is_refused(registered):
    _, directory = registered
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 64
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CardMismatch, match="adapter config"):
        verify(read_card(directory))


def test_transitions(registered):
    registry, directory = registered
    with pytest.raises(IllegalTransition, match="gate has not run"):
        registry.transition(directory, "shadow")
    with pytest.raises(IllegalTransition, match="cannot become stable"):
        registry.transition(directory, "stable")  # candidate -> stable skips the rollout
    with pytest.raises(IllegalTransition, match="unknown state"):
        registry.transition(directory, "live")
    registry.update(directory, lambda c: c.evaluations.append(evaluation("pass")))
    registry.transition(directory, "shadow", by="monitor")
    registry.transition(directory, "canary")
    registry.transition(directory, "stable", reason="promoted")
    with pytest.raises(IllegalTransition, match="stable; it cannot become canary"):
        registry.transition(directory, "canary")
    card = registry.transition(directory, "retired", by="alice")
    assert [h.state for h in card.history] == ["candidate", "shadow", "canary", "stable", "retired"]
    assert card.history[1].by == "monitor" and card.history[-1].by == "alice"
    assert all(a.at <= b.at for a, b in zip(card.history, card.history[1:]))
    with pytest.raises(IllegalTransition, match="final"):
        registry.transition(directory, "stable")


def test_rejected_is_final(registered):
    registry, directory = registered
    registry.update(directory, lambda c: c.evaluations.append(evaluation("fail")))
    with pytest.raises(IllegalTransition, match="failed it"):
        registry.transition(directory, "canary")
    with pytest.raises(IllegalTransition, match="failed it"):
        registry.approve(directory, by="alice")
    registry.transition(directory, "rejected", reason="gate")
    # even a later passing evaluation cannot bring it back
    registry.update(directory, lambda c: c.evaluations.append(evaluation("pass")))
    for state in ("shadow", "canary", "stable", "candidate"):
        with pytest.raises(IllegalTransition):
            registry.transition(directory, state)
    assert read_card(directory).state == "rejected"


def test_existing_version_is_never_overwritten(registered, tmp_path):
    registry, directory = registered
    before = (directory / CARD_FILE).read_bytes()
    card = new_card("support", "v2", adapter_files(tmp_path / "other", weights=b"other"), read_card(directory).base)
    with pytest.raises(RegistryError, match="already exists"):
        registry.register(card, tmp_path / "other")
    assert (directory / CARD_FILE).read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_unwritable_location(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        registry = Registry(locked / "registry")
        base = BaseModelRef(name="base", sha256="0" * 64)
        card = new_card("support", "v3", adapter_files(tmp_path / "out"), base)
        with pytest.raises(RegistryError, match="not writable"):
            registry.register(card, tmp_path / "out")
        assert not (locked / "registry").exists()
    finally:
        locked.chmod(0o700)


def test_unwritable_location_as_root_too(tmp_path):
    # A path under a regular file can never be created, whoever runs the test.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    registry = Registry(blocker / "registry")
    with pytest.raises(RegistryError, match="not writable"):
        registry.check_writable()
    with pytest.raises(RegistryError, match="only local directories"):
        Registry("s3://bucket/adapters")


def test_bad_names_and_cards(tmp_path):
    with pytest.raises(RegistryError, match="adapter version"):
        Registry(tmp_path).directory("support", "../escape")
    (tmp_path / "x" / "v1").mkdir(parents=True)
    (tmp_path / "x" / "v1" / CARD_FILE).write_text("{not json")
    with pytest.raises(RegistryError, match="not valid"):
        read_card(tmp_path / "x" / "v1")


def test_base_model_hash_sees_config_and_weights(tmp_path):
    base = base_dir(tmp_path)
    first = base_model_sha256(base)
    (base / "config.json").write_text(json.dumps({"vocab_size": 2001}))
    second = base_model_sha256(base)
    (base / "model.safetensors").write_bytes(b"other weights")
    assert len({first, second, base_model_sha256(base)}) == 3


def test_adapter_info_metric(registered):
    registry, directory = registered
    metrics = CollectorRegistry()
    metrics.register(AdapterInfoCollector(registry))
    text = generate_latest(metrics).decode()
    assert 'loragate_adapter_info{base="base",name="support",state="candidate",version="v2"} 1.0' in text
    registry.transition(directory, "rejected")
    assert 'state="rejected"' in generate_latest(metrics).decode()


def test_adapters_cli(registered):
    registry, directory = registered

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "loragate", "adapters", *args, "--registry", registry.location],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    assert "support" in listed.stdout and "v2" in listed.stdout and "candidate" in listed.stdout
    shown = cli("show", "support/v2")
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["artifact"]["sha256"] == read_card(directory).artifact.sha256
    refused = cli("approve", "support/v2", "--by", "alice")
    assert refused.returncode == 1 and "gate has not run" in refused.stderr and "Traceback" not in refused.stderr
    retired = cli("retire", "support/v2", "--by", "alice", "--reason", "superseded")
    assert retired.returncode == 0, retired.stderr
    card = read_card(directory)
    assert card.state == "retired" and card.history[-1].by == "alice" and card.history[-1].reason == "superseded"
    missing = cli("show", "support/v9")
    assert missing.returncode == 1 and "no adapter card" in missing.stderr


def test_monitor_exposes_adapter_info(registered, tmp_path):
    from loragate.monitoring.config import MonitorConfig
    from loragate.monitoring.service import Monitor

    registry, _ = registered
    monitor = Monitor(
        MonitorConfig(
            request_log=str(tmp_path / "log"),
            state_file=str(tmp_path / "state.json"),
            adapter_registry=registry.location,
        )
    )
    text = generate_latest(monitor.metrics.registry).decode()
    assert 'loragate_adapter_info{base="base",name="support",state="candidate",version="v2"} 1.0' in text
