"""Where rollout weights are written: the routes YAML the gateways reload, as a file or a ConfigMap.

``set_weights`` changes only the weights of one route's variants and validates the result with the
gateway's own catalog parser; both sources refuse a write when the routes changed since they were read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from loragate.common.atomicio import atomic_write
from loragate.common.catalog import BASE, CatalogError, parse_catalog
from loragate.monitoring import kube
from loragate.monitoring.rollout.config import ConfigMapRef
from loragate.monitoring.rollout.errors import RolloutError, RoutesConflict


@dataclass(frozen=True)
class Snapshot:
    text: str
    version: Any  # what write() checks nothing changed since


class RoutesSource(Protocol):
    def read(self) -> Snapshot: ...
    def write(self, text: str, version: Any) -> None: ...


class RoutesFile:
    """The routes YAML file: replaced atomically (the gateways' watcher sees a new mtime/size)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _version(self) -> tuple[int, int, int]:
        stat = self.path.stat()
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def read(self) -> Snapshot:
        try:
            version = self._version()
            return Snapshot(self.path.read_text(), version)
        except OSError as exc:
            raise RolloutError(f"{self.path}: cannot read: {exc.strerror}") from None

    def write(self, text: str, version: Any) -> None:
        if self._version() != version:
            raise RoutesConflict(f"{self.path} changed since it was read")
        atomic_write(self.path, text)

    def __str__(self) -> str:
        return str(self.path)


class RoutesConfigMap:
    """The routes ConfigMap, through the official client (CoreV1Api or a stand-in with its two methods).

    The patch carries the resourceVersion that was read: Kubernetes refuses it (409) when someone
    else changed the ConfigMap in between. The monitor's Role allows get and patch on it.
    """

    def __init__(self, ref: ConfigMapRef, api: Any = None) -> None:
        self.ref, self._api = ref, api

    def api(self) -> Any:
        if self._api is None:
            self._api = kube.core_v1()
        return self._api

    def read(self) -> Snapshot:
        found = self.api().read_namespaced_config_map(self.ref.name, self.ref.namespace)
        text = (found.data or {}).get(self.ref.key)
        if text is None:
            raise RolloutError(f"configmap {self} has no key {self.ref.key!r}")
        return Snapshot(text, found.metadata.resource_version)

    def write(self, text: str, version: Any) -> None:
        body = {"metadata": {"resourceVersion": version}, "data": {self.ref.key: text}}
        try:
            self.api().patch_namespaced_config_map(self.ref.name, self.ref.namespace, body)
        except Exception as exc:
            if getattr(exc, "status", None) == 409:
                raise RoutesConflict(f"configmap {self} changed since it was read") from None
            raise

    def __str__(self) -> str:
        return f"{self.ref.namespace}/{self.ref.name}"


def _number(weight: float) -> float | int:
    return int(weight) if float(weight).is_integer() else weight


def _header(text: str) -> str:
    """The comment lines at the top of a routes file (PyYAML drops comments; these are kept)."""
    lines = []
    for line in text.splitlines(keepends=True):
        if not line.startswith("#"):
            break
        lines.append(line)
    return "".join(lines)


def set_weights(text: str, route: str, weights: dict[str, float], source: str = "<routes>") -> str:
    """The routes YAML ``text`` with the weights of ``route``'s named variants replaced.

    Every other route, variant and field stays as it was (comments other than the file's header
    are lost: PyYAML does not keep them). The result is validated before it is returned.
    """
    data, body = _route_body(text, route, source)
    variants = body["variants"]
    for name, weight in weights.items():
        entry = next((v for v in variants if isinstance(v, dict) and v.get("name") == name), None)
        if entry is None:
            if name != BASE:
                raise RolloutError(f"{source}: route {route!r} has no variant {name!r}")
            entry = {"name": BASE}
            variants.append(entry)
        entry["weight"] = _number(weight)
    _end_shadow_of_primary(body, variants)
    return _dump_checked(text, data, source, "new weights")


def _route_body(text: str, route: str, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parsed routes YAML and ``route``'s mapping in it, refusing a source that is invalid now."""
    try:
        parse_catalog(text, source)
    except CatalogError as exc:
        raise RolloutError(f"the routes source is invalid now; not touching it: {exc}") from None
    data = yaml.safe_load(text)
    body = data["routes"].get(route)
    if not isinstance(body, dict) or not isinstance(body.get("variants"), list):
        raise RolloutError(f"{source}: no route {route!r}")
    return data, body


def _dump_checked(text: str, data: dict[str, Any], source: str, change: str) -> str:
    """``data`` as routes YAML under ``text``'s header, validated before anyone writes it."""
    new = _header(text) + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)
    try:
        parse_catalog(new, source)
    except CatalogError as exc:
        raise RolloutError(f"{change} would make the routes invalid: {exc}") from None
    return new


def _end_shadow_of_primary(body: dict[str, Any], variants: list[Any]) -> None:
    """A shadow whose variant now has the most weight is serving for real: its dark stage is over."""
    shadow = body.get("shadow")
    if not isinstance(shadow, dict):
        return
    weights = {v.get("name"): float(v.get("weight", 0) or 0) for v in variants if isinstance(v, dict)}
    top = max(weights.values(), default=0.0)
    if top > 0 and weights.get(shadow.get("variant")) == top:
        del body["shadow"]


def add_variant(text: str, route: str, entry: dict[str, Any], source: str = "<routes>") -> str:
    """The routes YAML ``text`` with ``entry`` (a variant mapping, weight 0) added to ``route``.

    Adding a variant that is already there with the same fields is a no-op (a replayed step);
    the same name with other fields is refused. The result is validated before it is returned.
    """
    data, body = _route_body(text, route, source)
    entry = {**entry, "weight": 0}
    found = next((v for v in body["variants"] if isinstance(v, dict) and v.get("name") == entry["name"]), None)
    if found is not None:
        if {k: v for k, v in found.items() if k != "weight"} != {k: v for k, v in entry.items() if k != "weight"}:
            raise RolloutError(f"{source}: route {route!r} already has another variant named {entry['name']!r}")
        return text
    body["variants"].append(entry)
    return _dump_checked(text, data, source, f"adding variant {entry['name']!r}")


def current_weights(text: str, route: str) -> dict[str, float]:
    found = parse_catalog(text).routes.get(route)
    return {v.name: v.weight for v in found.variants} if found else {}
