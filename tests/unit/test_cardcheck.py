"""The gateway's catalog against registry cards: verify, serving states, refused edits keep the last good catalog."""

import os

import pytest

from loragate.common import cardcheck
from loragate.common.cardcheck import CardCheck
from loragate.common.catalog import CatalogError, CatalogFile, load_catalog
from loragate.common.registry import BaseModelRef, Registry, base_model_sha256, new_card
from tests.unit.test_registry import adapter_files, base_dir, evaluation


@pytest.fixture
def reg(tmp_path):
    """support/v1 stable, support/v2 a candidate that passed the gate."""
    registry = Registry(tmp_path / "registry")
    base = BaseModelRef(name="base", path=str(base_dir(tmp_path)), sha256=base_model_sha256(base_dir(tmp_path)))
    dirs = {}
    for version, weights in (("v1", b"one" * 50), ("v2", b"two" * 50)):
        card = new_card(
            "support",
            version,
            adapter_files(tmp_path / f"out-{version}", weights),
            base,
            evaluations=[evaluation("pass")],
        )
        dirs[version] = registry.register(
            card, tmp_path / f"out-{version}", state="stable" if version == "v1" else "candidate"
        )
    return registry, dirs


def routes(path, dirs, v2_weight=0, v2_key="card"):
    path.write_text(f"""
routes:
  support:
    variants:
      - {{name: v1, adapter: support-v1, path: "{dirs["v1"]}", weight: {100 - v2_weight}}}
      - {{name: v2, adapter: support-v2, {v2_key}: "{dirs["v2"]}", weight: {v2_weight}}}
""")
    return path


def names(catalog):
    return [v.name for v in catalog.routes["support"].variants]


def test_serving_cards_pass_and_non_serving_weight_zero_variant_is_left_out(reg, tmp_path):
    registry, dirs = reg
    catalog = load_catalog(routes(tmp_path / "r.yaml", dirs), CardCheck())
    assert names(catalog) == ["v1", "base"]  # v2 is a candidate: not routable, not even pinned
    registry.transition(dirs["v2"], "canary")
    catalog = load_catalog(routes(tmp_path / "r.yaml", dirs, v2_weight=10), CardCheck())
    assert names(catalog) == ["v1", "v2", "base"]


def test_non_serving_card_with_traffic_is_refused_naming_the_field(reg, tmp_path):
    _, dirs = reg
    with pytest.raises(
        CatalogError,
        match=r"routes\.support\.variants\.1\.card: variant 'v2' \(support/v2\) "
        r"is candidate, not in a serving state",
    ):
        load_catalog(routes(tmp_path / "r.yaml", dirs, v2_weight=10), CardCheck())


@pytest.mark.parametrize("state", ["rejected", "retired"])
def test_final_states_are_refused_with_traffic(reg, tmp_path, state):
    registry, dirs = reg
    registry.transition(dirs["v2"], "canary")
    registry.transition(dirs["v2"], state)
    with pytest.raises(CatalogError, match=f"is {state}"):
        load_catalog(routes(tmp_path / "r.yaml", dirs, v2_weight=5), CardCheck())
    assert names(load_catalog(routes(tmp_path / "r.yaml", dirs, v2_weight=0), CardCheck())) == ["v1", "base"]


def test_changed_weights_are_refused_even_at_weight_zero(reg, tmp_path):
    _, dirs = reg
    (dirs["v1"] / "adapter_model.safetensors").write_bytes(b"tampered" * 20)
    with pytest.raises(CatalogError, match=r"variants\.0\.path: support/v1: the weights .* changed after registration"):
        load_catalog(routes(tmp_path / "r.yaml", dirs), CardCheck())


def test_missing_card_named_by_the_variant_is_refused(reg, tmp_path):
    _, dirs = reg
    dirs = {**dirs, "v2": tmp_path / "nowhere"}
    with pytest.raises(CatalogError, match=r"variants\.1\.card: no adapter card at"):
        load_catalog(routes(tmp_path / "r.yaml", dirs), CardCheck())


def test_verify_is_cached_by_file_stamp(reg, tmp_path, monkeypatch):
    registry, dirs = reg
    calls = []
    real = cardcheck.verify
    monkeypatch.setattr(cardcheck, "verify", lambda card, where: (calls.append(card.ref), real(card, where)))
    check = CardCheck()
    path = routes(tmp_path / "r.yaml", dirs)
    load_catalog(path, check)
    load_catalog(path, check)
    assert calls == ["support/v1", "support/v2"]  # the second load hashed nothing
    weights = dirs["v1"] / "adapter_model.safetensors"
    weights.write_bytes(b"tampered" * 20)
    with pytest.raises(CatalogError, match="changed after registration"):
        load_catalog(path, check)
    assert calls[-1] == "support/v1"


def test_refused_edit_keeps_the_last_good_catalog(reg, tmp_path):
    registry, dirs = reg
    registry.transition(dirs["v2"], "canary")
    path = routes(tmp_path / "r.yaml", dirs, v2_weight=10)
    catalog = CatalogFile(path)
    assert names(catalog.current) == ["v1", "v2", "base"]
    registry.transition(dirs["v2"], "rejected")
    routes(path, dirs, v2_weight=50)
    os.utime(path, ns=(1, 1))  # a new stamp whatever the clock's resolution
    with pytest.raises(CatalogError, match="is rejected"):
        catalog.reload_if_changed()
    assert catalog.current.routes["support"].variant("v2").weight == 10 and "is rejected" in catalog.last_error


def test_a_card_needs_an_adapter(tmp_path):
    (tmp_path / "r.yaml").write_text("routes:\n  r:\n    variants: [{name: v1, card: /x, weight: 1}]\n")
    with pytest.raises(CatalogError, match="a card goes with an adapter"):
        load_catalog(tmp_path / "r.yaml", CardCheck())


def test_variants_without_cards_are_untouched(tmp_path):
    (tmp_path / "r.yaml").write_text(
        f"routes:\n  r:\n    variants: [{{name: v1, adapter: a1, path: '{tmp_path}', weight: 1}}]\n"
    )
    catalog = load_catalog(tmp_path / "r.yaml", CardCheck())
    assert catalog == load_catalog(tmp_path / "r.yaml")
