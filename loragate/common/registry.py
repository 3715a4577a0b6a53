"""The adapter registry: one card per adapter version, stored as ``card.json`` beside its files.

Layout: ``LOCATION/NAME/VERSION/`` holds what vLLM loads (``adapter_config.json``,
``adapter_model.safetensors``) and the card: lineage (base model hash, parent, training data,
training run), the evaluation gate's results and the version's state with its history.

The card pins the sha256 of the weights and of the adapter config; ``verify`` recomputes them
and refuses a mismatch, so an adapter changed after registration is never promoted or served.
State changes follow ``TRANSITIONS``; a rejected version never moves again. Writes are atomic
(loragate.common.atomicio) and read-modify-write is serialised by a lock file per version.

Local directories only for now (``file://`` accepted); ``s3://`` is refused with a clear error.
The card's fields are loragate/common/adaptercard.py's; the monitor's ``loragate_adapter_info`` is
monitoring/adapterinfo.py's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from loragate.common.adaptercard import AdapterCard, Approval, Artifact, BaseModelRef, Event, PeftInfo, StateChange
from loragate.common.atomicio import atomic_write, fsync_dir

CARD_FILE = "card.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"

TRANSITIONS: dict[str, frozenset[str]] = {
    "candidate": frozenset({"rejected", "shadow", "canary", "retired"}),
    "shadow": frozenset({"canary", "rejected", "retired"}),
    "canary": frozenset({"stable", "rejected", "retired"}),
    "stable": frozenset({"retired"}),
    "rejected": frozenset(),
    "retired": frozenset(),
}
SERVING_STATES = frozenset({"shadow", "canary", "stable"})  # states that get traffic: need a passed gate
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RegistryError(Exception):
    """A registry operation that cannot be done; the message says why."""


class CardMismatch(RegistryError):
    """The files on disk are not the ones the card was written for."""


class IllegalTransition(RegistryError):
    pass


# --- hashing -----------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_model_sha256(base_dir: str | Path) -> str:
    """One hash for a base model directory: its config, tokenizer files and weights, by name."""
    base = Path(base_dir)
    names = ["config.json", "tokenizer.json", "tokenizer_config.json"]
    files = [base / n for n in names if (base / n).is_file()]
    files += sorted(p for p in base.glob("*.safetensors") if p.is_file())
    files += sorted(p for p in base.glob("*.bin") if p.is_file())
    if not (base / "config.json").is_file():
        raise RegistryError(f"{base} is not a model directory (no config.json)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def base_model_ref(base_dir: str | Path) -> BaseModelRef:
    base = Path(base_dir).resolve()
    config = json.loads((base / "config.json").read_text()) if (base / "config.json").is_file() else {}
    name = config.get("_name_or_path") or base.name
    return BaseModelRef(name=str(name), path=str(base), sha256=base_model_sha256(base))


def read_peft(adapter_dir: str | Path) -> PeftInfo:
    path = Path(adapter_dir) / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read {path}: {exc}") from None
    modules = cfg.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else sorted(modules)
    return PeftInfo(
        r=int(cfg.get("r", 0)),
        lora_alpha=float(cfg.get("lora_alpha", 0)),
        target_modules=modules,
        lora_dropout=float(cfg.get("lora_dropout") or 0.0),
    )


def artifact_of(adapter_dir: str | Path) -> Artifact:
    directory = Path(adapter_dir).resolve()
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise RegistryError(f"{directory} holds no {WEIGHTS_FILE}")
    return Artifact(
        location=str(directory),
        sha256=file_sha256(weights),
        config_sha256=file_sha256(directory / CONFIG_FILE),
        bytes=weights.stat().st_size,
    )


def new_card(name: str, version: str, adapter_dir: str | Path, base: BaseModelRef, **fields: Any) -> AdapterCard:
    """A card for the adapter files in ``adapter_dir`` (hashes and PEFT config read from them)."""
    return AdapterCard(
        name=check_name("name", name),
        version=check_name("version", version),
        base=base,
        artifact=artifact_of(adapter_dir),
        peft=read_peft(adapter_dir),
        **fields,
    )


def verify(card: AdapterCard, directory: str | Path | None = None) -> None:
    """Recompute the sha256 of the weights and the adapter config; raise CardMismatch if either differs."""
    where = Path(directory or card.artifact.location)
    for label, name, expected in (
        ("weights", WEIGHTS_FILE, card.artifact.sha256),
        ("adapter config", CONFIG_FILE, card.artifact.config_sha256),
    ):
        path = where / name
        try:
            actual = file_sha256(path)
        except OSError as exc:
            raise CardMismatch(f"{card.ref}: cannot read {path}: {exc.strerror or exc}") from None
        if actual != expected:
            raise CardMismatch(
                f"{card.ref}: the {label} at {path} have sha256 {actual[:16]}..., the card says "
                f"{expected[:16]}...: changed after registration; refusing to use it"
            )


def card_json(card: AdapterCard) -> bytes:
    return (json.dumps(card.model_dump(mode="json"), indent=2, allow_nan=False) + "\n").encode()


def read_card(directory: str | Path) -> AdapterCard:
    path = Path(directory) / CARD_FILE
    try:
        return AdapterCard.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise RegistryError(f"no adapter card at {path}") from None
    except ValueError as exc:
        raise RegistryError(f"adapter card {path} is not valid: {exc}") from None


def write_card(directory: str | Path, card: AdapterCard) -> None:
    atomic_write(Path(directory) / CARD_FILE, card_json(card))


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".card.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- state -------------------------------------------------------------------------------------


def check_transition(card: AdapterCard, to: str) -> None:
    if to not in TRANSITIONS:
        raise IllegalTransition(f"unknown state {to!r}; states: {', '.join(TRANSITIONS)}")
    if to not in TRANSITIONS[card.state]:
        allowed = ", ".join(sorted(TRANSITIONS[card.state])) or "none: it is final"
        raise IllegalTransition(f"{card.ref} is {card.state}; it cannot become {to} (allowed: {allowed})")
    if to in SERVING_STATES and card.verdict != "pass":
        raise IllegalTransition(
            f"{card.ref} cannot become {to}: the evaluation gate has "
            f"{'not run' if card.verdict is None else 'failed it'}"
        )


def apply_transition(
    card: AdapterCard, to: str, *, by: str = "loragate", reason: str = "", now: float | None = None
) -> AdapterCard:
    check_transition(card, to)
    card.state = to  # type: ignore[assignment]
    card.history.append(StateChange(state=to, at=time.time() if now is None else now, by=by, reason=reason))
    return card


# --- the registry --------------------------------------------------------------------------------


def local_path(location: str | Path) -> Path:
    text = str(location)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    elif "://" in text:
        raise RegistryError(
            f"registry location {text}: only local directories are supported for now "
            "(s3:// needs loragate.common.objectstore)"
        )
    return Path(text)


def check_name(kind: str, value: str) -> str:
    if not _NAME.match(value or ""):
        raise RegistryError(f"adapter {kind} {value!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return value


class Registry:
    """The cards under one location: ``LOCATION/NAME/VERSION/card.json``."""

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        self.root = local_path(location)

    def directory(self, name: str, version: str) -> Path:
        return self.root / check_name("name", name) / check_name("version", version)

    def resolve(self, ref: str) -> Path:
        """``NAME/VERSION`` under this registry, or a directory holding a card."""
        if "/" in ref and ref.count("/") == 1 and not Path(ref).is_dir():
            name, version = ref.split("/")
            return self.directory(name, version)
        return Path(ref)

    def cards(self) -> list[AdapterCard]:
        if not self.root.is_dir():
            raise RegistryError(f"registry {self.location} does not exist")
        found = []
        for path in sorted(self.root.glob(f"*/*/{CARD_FILE}")):
            found.append(read_card(path.parent))
        return found

    def load(self, name: str, version: str) -> AdapterCard:
        return read_card(self.directory(name, version))

    def check_writable(self) -> None:
        """Fail early (before a long training run) when cards cannot be written here."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as exc:
            raise RegistryError(f"registry {self.location} is not writable: {exc.strerror or exc}") from None

    def register(
        self,
        card: AdapterCard,
        files_from: str | Path,
        *,
        state: str = "candidate",
        by: str = "loragate",
        reason: str = "registered",
        extra_files: tuple[str, ...] = (),
    ) -> Path:
        """Move a finished adapter directory into the registry as NAME/VERSION, with its card.

        The card and the files are written into a staging directory first and renamed into
        place in one step: a reader sees the whole version or nothing. An existing version is
        never overwritten.
        """
        target = self.directory(card.name, card.version)
        if target.exists():
            raise RegistryError(f"{card.ref} already exists in {self.location}")
        self.check_writable()
        source = Path(files_from)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".staging-{card.name}-{card.version}-"))
        try:
            staging.chmod(0o755)  # mkdtemp's 0o700 would hide the adapter from an engine running as another user
            for name in (CONFIG_FILE, WEIGHTS_FILE, *extra_files):
                if (source / name).is_file():
                    (staging / name).write_bytes((source / name).read_bytes())
            copied = artifact_of(staging)
            if (copied.sha256, copied.config_sha256) != (card.artifact.sha256, card.artifact.config_sha256):
                raise CardMismatch(f"{card.ref}: the files in {source} changed while they were registered")
            card.artifact = copied
            card.artifact.location = str(target.resolve())
            card.state = state  # type: ignore[assignment]
            card.history = [StateChange(state=state, at=time.time(), by=by, reason=reason)]
            write_card(staging, card)
            for path in staging.iterdir():
                _fsync_file(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, target)  # atomic; fails if a concurrent writer won the name
            fsync_dir(target.parent)
        except BaseException:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def update(self, directory: str | Path, change: Callable[[AdapterCard], None]) -> AdapterCard:
        """Read the card, apply ``change(card)`` under the version's lock, write it back atomically."""
        directory = Path(directory)
        with _locked(directory):
            card = read_card(directory)
            change(card)
            write_card(directory, card)
        return card

    def transition(self, directory: str | Path, to: str, *, by: str = "loragate", reason: str = "") -> AdapterCard:
        """Move a version to another state; serving states need a passed gate and matching weights."""

        def change(card: AdapterCard) -> None:
            check_transition(card, to)
            if to in SERVING_STATES:
                verify(card, directory)
            apply_transition(card, to, by=by, reason=reason)

        return self.update(directory, change)

    def record(self, directory: str | Path, step: str, result: str, detail: str = "") -> AdapterCard:
        """Append an event (a deployment step) to the version's card."""
        return self.update(
            directory,
            lambda card: card.events.append(Event(step=step, result=result, at=time.time(), detail=detail[:500])),
        )

    def approve(self, directory: str | Path, *, by: str, note: str = "") -> AdapterCard:
        def change(card: AdapterCard) -> None:
            if card.state in ("rejected", "retired"):
                raise IllegalTransition(f"{card.ref} is {card.state}; it cannot be approved")
            if card.verdict != "pass":
                raise IllegalTransition(
                    f"{card.ref} cannot be approved: the evaluation gate has "
                    f"{'not run' if card.verdict is None else 'failed it'}"
                )
            verify(card, directory)
            card.approval = Approval(by=by, at=time.time(), note=note)

        return self.update(directory, change)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
