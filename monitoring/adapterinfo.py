"""``loragate_adapter_info``: the adapter registry's versions as a Prometheus series on the monitor's /metrics."""

from __future__ import annotations

from typing import Any, Iterator

from loragate.common.registry import Registry, RegistryError


class AdapterInfoCollector:
    """``loragate_adapter_info{name,version,state,base}`` = 1 for every card, read at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def describe(self) -> list:
        return []  # read at scrape time only (the registry may not exist yet at start)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "loragate_adapter_info",
            "Adapter versions in the registry, by state.",
            labels=["name", "version", "state", "base"],
        )
        try:
            cards = self.registry.cards()
        except RegistryError:
            cards = []
        for card in cards:
            family.add_metric([card.name, card.version, card.state, card.base.name], 1.0)
        yield family
