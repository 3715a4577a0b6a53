"""Chat JSONL (what the dataset trigger exports) -> usable rows -> a seeded split -> token ids.

One row is ``{"messages": [{"role", "content"}, ...]}`` whose last message is the assistant's
answer. Training and evaluation encode a row the same way (``Encoder``): the prompt is the
model's chat template over every message but the last, with the generation prompt; the answer
is the rest of the rendered conversation, then the end-of-sequence token. Only the answer's
tokens are scored (trained on, or measured). Light: ``tokenizers`` and ``jinja2``, no torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from loragate.common.atomicio import atomic_write

ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class Row:
    messages: tuple[tuple[str, str], ...]  # (role, content); the last one is the assistant's answer
    line: int
    raw: str  # the JSON line as read, written back unchanged into the split files

    @property
    def prompt_key(self) -> str:
        return json.dumps(self.messages[:-1])

    @property
    def answer(self) -> str:
        return self.messages[-1][1]


@dataclass
class Dataset:
    rows: list[Row]
    skipped: int  # lines that were not usable rows
    sha256: str
    location: str


def usable(record) -> tuple[tuple[str, str], ...] | None:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or len(messages) < 2:
        return None
    turns = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return None
        turns.append((m["role"], m["content"]))
    if turns[-1][0] != "assistant" or not turns[-1][1].strip():
        return None
    if not any(role == "user" and content.strip() for role, content in turns[:-1]):
        return None
    return tuple(turns)


def read_dataset(location: str | Path) -> Dataset:
    path = Path(str(location).removeprefix("file://"))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"dataset {location}: {exc.strerror or exc}") from None
    rows, skipped = [], 0
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            turns = usable(json.loads(line))
        except ValueError:
            turns = None
        if turns is None:
            skipped += 1
        else:
            rows.append(Row(turns, number, line))
    return Dataset(rows, skipped, hashlib.sha256(data).hexdigest(), str(location))


def split(rows: list[Row], held_out_share: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Seeded split by prompt: rows with the same prompt land on the same side (no leak)."""
    if not 0 < held_out_share < 1:
        raise DatasetError(f"held-out share must be between 0 and 1, not {held_out_share}")
    keys = sorted({r.prompt_key for r in rows}, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())
    if len(keys) < 2:
        raise DatasetError(
            f"{len(rows)} usable row(s) with {len(keys)} distinct prompt(s): "
            "need at least 2 prompts to keep a held-out split"
        )
    n_held = min(len(keys) - 1, max(1, round(len(keys) * held_out_share)))
    held_keys = set(keys[:n_held])
    return [r for r in rows if r.prompt_key not in held_keys], [r for r in rows if r.prompt_key in held_keys]


def write_rows(rows: list[Row], path: Path) -> str:
    data = "".join(r.raw.rstrip("\n") + "\n" for r in rows).encode()
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    answer_ids: list[int]


class Encoder:
    """The base model's tokenizer and chat template, read from its directory."""

    def __init__(self, base_dir: str | Path, max_len: int = 256) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        base = Path(base_dir)
        try:
            self.tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
            config = json.loads((base / "tokenizer_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"base model {base}: cannot read its tokenizer: {exc}") from None
        template = config.get("chat_template")
        if not template and (base / "chat_template.jinja").is_file():
            template = (base / "chat_template.jinja").read_text()
        if not template:
            raise DatasetError(f"base model {base} has no chat template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
        self.template = env.from_string(template)
        self.special = {k: config.get(k) for k in ("bos_token", "eos_token", "pad_token")}
        eos_id = self.tokenizer.token_to_id(self._token("eos_token") or "")
        if eos_id is None:
            raise DatasetError(f"base model {base}: no end-of-sequence token")
        self.eos_id: int = eos_id
        self.pad_id: int = self.tokenizer.token_to_id(self._token("pad_token") or "") or eos_id
        self.max_len = max_len

    def _token(self, key: str) -> str | None:
        value = self.special.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def render(self, messages, add_generation_prompt: bool) -> str:
        return self.template.render(
            messages=[{"role": r, "content": c} for r, c in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token("bos_token") or "",
            eos_token=self._token("eos_token") or "",
        )

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, row: Row) -> Example | None:
        """Token ids of the prompt and of the answer (+ eos), cut to ``max_len``; None if nothing fits."""
        prompt = self.render(row.messages[:-1], add_generation_prompt=True)
        full = self.render(row.messages, add_generation_prompt=False)
        answer = full[len(prompt) :] if full.startswith(prompt) else row.answer
        prompt_ids, answer_ids = self.ids(prompt), self.ids(answer) + [self.eos_id]
        prompt_ids = prompt_ids[-(self.max_len // 2) :]  # keep the end of a long prompt
        answer_ids = answer_ids[: self.max_len - len(prompt_ids)]
        return Example(prompt_ids, answer_ids) if answer_ids else None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)
