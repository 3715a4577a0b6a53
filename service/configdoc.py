"""The configuration reference (docs/configuration.md), generated from the gateway's Settings.

Each setting's meaning is its ``Field(description=...)``, else the comment lines written directly above
it in service/settings.py. ``loragate config-reference`` prints or writes the reference; a test
fails when a setting has no description or the committed file is stale.
"""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode

from loragate.service.settings import Settings

COMMAND = "loragate config-reference --out docs/configuration.md"


@dataclass(frozen=True)
class Entry:
    variable: str  # LORAGATE_...
    type: str
    default: str
    description: str  # "" when the setting has none


class UndocumentedError(ValueError):
    """Settings without a description."""


def entries(settings_class: type[BaseSettings] = Settings) -> list[Entry]:
    """One entry per setting, in the order of the class."""
    prefix = settings_class.model_config.get("env_prefix", "")
    comments = _comments_above_fields(settings_class)
    return [
        Entry(
            variable=f"{prefix}{name}".upper(),
            type=_type_name(field),
            default=_default(field),
            description=(field.description or comments.get(name, "")).strip(),
        )
        for name, field in settings_class.model_fields.items()
    ]


def render(settings_class: type[BaseSettings] = Settings) -> str:
    """The reference in Markdown; raises UndocumentedError naming every setting without a description."""
    rows = entries(settings_class)
    missing = [e.variable for e in rows if not e.description]
    if missing:
        raise UndocumentedError(
            f"settings without a description (a Field description or a comment above them in "
            f"{inspect.getsourcefile(settings_class)}): {', '.join(missing)}"
        )
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from service/settings.py by `{COMMAND}`; do not edit by hand. -->",
        "",
        "The gateway (`loragate serve`, the `gateway` container) reads these environment variables at start",
        "(the flags of `loragate serve` override ROUTES_FILE, UPSTREAMS, HOST, PORT and WORKERS). Lists are",
        "comma-separated; booleans take `true`/`false` (also `1`/`0`, `on`/`off`, `yes`/`no`); an empty value means",
        "unset where the default is unset. A bad value stops the gateway with",
        "`loragate: bad settings: LORAGATE_<NAME>: <problem>`.",
        "The monitor (`loragate monitor`) is configured by its YAML file instead: [monitoring.md](monitoring.md).",
        "",
        "| variable | default | type | meaning |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{e.variable}` | {e.default} | {e.type} | {_cell(e.description)} |" for e in rows]
    return "\n".join(lines) + "\n"


def write(path: Path, settings_class: type[BaseSettings] = Settings) -> None:
    path.write_text(render(settings_class))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(field: FieldInfo) -> str:
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list | tuple):
        return f"`{','.join(map(str, value))}`" if value else "empty"
    if isinstance(value, Enum):
        value = value.value
    return f"`{value}`"


def _type_name(field: FieldInfo) -> str:
    annotation = field.annotation
    is_list = any(isinstance(m, NoDecode) or m is NoDecode for m in field.metadata)
    name = _annotation_name(annotation)
    bounds = [
        f"{op} {getattr(m, attr)}"
        for m in field.metadata
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if getattr(m, attr, None) is not None
    ]
    if is_list and not name.startswith("list"):
        name = f"list of {name}"
    return name + (f" ({', '.join(bounds)})" if bounds else "")


def _annotation_name(annotation: object) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_annotation_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names)
    if origin is list:
        return f"list of {_annotation_name(args[0])}" if args else "list"
    if origin is typing.Annotated:
        return _annotation_name(args[0])
    if annotation is SecretStr:
        return "secret string"
    if annotation is Path:
        return "path"
    plain = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if annotation in plain:
        return plain[annotation]
    return getattr(annotation, "__name__", str(annotation))


def _comments_above_fields(settings_class: type) -> dict[str, str]:
    """Field name -> the comment lines directly above it in the class's source ("" when none)."""
    source = textwrap.dedent(inspect.getsource(settings_class))
    lines = source.splitlines()
    comment_lines: dict[int, str] = {}  # 1-based line -> text of a comment that is the whole line
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and not lines[token.start[0] - 1][: token.start[1]].strip():
            comment_lines[token.start[0]] = token.string.lstrip("#").strip()
    (class_node,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)]
    out: dict[str, str] = {}
    for node in class_node.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            block: list[str] = []
            line = node.lineno - 1
            while line in comment_lines:
                block.insert(0, comment_lines[line])
                line -= 1
            out[node.target.id] = " ".join(block)
    return out
