"""LoRA fine-tuning on chat JSONL, continuing from a parent adapter or fresh; the result is a registry card.

``prepare`` (loragate/pipeline/trainprep.py) checks everything that can be checked cheaply before torch is
imported; ``fit`` (loragate/pipeline/trainloop.py) is the training loop. ``train`` runs it in the version's work
directory inside the registry (``.train-NAME-VERSION``): the same command run again resumes from its last
checkpoint; the result is registered in one rename, and the work directory goes only then.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from loragate.common.adaptercard import TrainingData
from loragate.common.registry import AdapterCard, Registry, RegistryError, new_card, read_card
from loragate.pipeline.chatdata import write_rows
from loragate.pipeline.trainloop import LOSS_LOG_FILE, fit
from loragate.pipeline.trainprep import Prepared, TrainConfig, TrainError, prepare

HELD_OUT_FILE = "heldout.jsonl"


def work_directory(registry: Registry, name: str, version: str) -> Path:
    """Where a version is trained: the same for every attempt of the same command (resume)."""
    return registry.root / f".train-{name}-{version}"


def train(config: TrainConfig) -> tuple[Path, AdapterCard]:
    """Prepare, fit and register; returns the new version's directory and card (state: candidate).

    Every process of a multi-process run calls it; the first one writes and registers."""
    prepared = prepare(config)
    work = work_directory(prepared.registry, config.name, config.version)
    main = prepared.world.main
    with _training_lock(prepared.registry, config.name, config.version, main):
        if not config.resume and main:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(exist_ok=True)
        return _train_in(prepared, work)


@contextlib.contextmanager
def _training_lock(registry: Registry, name: str, version: str, main: bool) -> Iterator[None]:
    """One training of a version at a time (an orphaned run of a killed pipeline would share its checkpoints)."""
    if not main:
        yield
        return
    with open(registry.root / f".train-{name}-{version}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainError(f"another run is training {name}/{version} in {registry.location}") from None
        yield


def _train_in(prepared: Prepared, work: Path) -> tuple[Path, AdapterCard]:
    config, main = prepared.config, prepared.world.main
    try:
        held_sha = write_rows(prepared.held_rows, work / HELD_OUT_FILE) if main else ""
        run = fit(prepared, work, work / LOSS_LOG_FILE)
        if not main:
            return prepared.target, _wait_for_card(prepared.target)
        data = TrainingData(
            location=str(Path(config.dataset).resolve()) if "://" not in config.dataset else config.dataset,
            sha256=prepared.dataset.sha256,
            rows=len(prepared.dataset.rows),
            train_rows=len(prepared.train_rows),
            held_out_rows=len(prepared.held_rows),
            held_out_location=str((prepared.target / HELD_OUT_FILE).resolve()),
            held_out_sha256=held_sha,
            window_start=config.window_start,
            window_end=config.window_end,
            trigger=config.trigger,
        )
        card = new_card(
            config.name, config.version, work, prepared.base, parent=prepared.parent_ref, data=data, training=run
        )
        target = prepared.registry.register(card, work, reason="trained", extra_files=(HELD_OUT_FILE, LOSS_LOG_FILE))
        shutil.rmtree(work, ignore_errors=True)  # registered: the checkpoints are no longer needed
        (prepared.registry.root / f".train-{config.name}-{config.version}.lock").unlink(missing_ok=True)
    except RegistryError as exc:
        raise TrainError(str(exc)) from None
    return target, read_card(target)


def _wait_for_card(target: Path, timeout_s: float = 600) -> AdapterCard:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return read_card(target)
        except RegistryError:
            if time.monotonic() > deadline:
                raise TrainError(f"the first process did not register {target}") from None
            time.sleep(0.5)
