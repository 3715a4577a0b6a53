"""The monitor's one Kubernetes client setup: in-cluster config (the monitor's service account), else the
kubeconfig (``loragate rollout`` run from a workstation). The official client is imported only here, when used."""

from __future__ import annotations

from typing import Any


def load_config() -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def core_v1() -> Any:
    """A CoreV1Api (ConfigMaps: the routes source)."""
    from kubernetes import client

    load_config()
    return client.CoreV1Api()


def batch_v1() -> Any:
    """A BatchV1Api (Jobs: the retraining trigger)."""
    from kubernetes import client

    load_config()
    return client.BatchV1Api()
