from pathlib import Path

import pytest

from loragate.common.catalog import BASE, CatalogError, CatalogFile, parse_catalog

GOOD = """
routes:
  support:
    base_model: llama
    sticky_key: X-User-Id
    variants:
      - {name: v1, adapter: support-v1, path: /adapters/v1, weight: 90}
      - {name: v2, adapter: support-v2, path: /adapters/v2, weight: 10}
    fallback: [v1, base]
    pricing: {prompt_per_1k: 0.1, completion_per_1k: 0.2, reference_prompt_per_1k: 1, reference_completion_per_1k: 4}
"""


def test_good_catalog_parses_with_implicit_base_variant():
    route = parse_catalog(GOOD).routes["support"]
    assert [v.name for v in route.variants] == ["v1", "v2", BASE]
    assert route.variant(BASE).is_base and route.variant(BASE).weight == 0
    assert route.sticky_key == "x-user-id"
    assert route.upstream_model(route.variant("v2")) == "support-v2"
    assert route.upstream_model(route.variant(BASE)) == "llama"
    assert parse_catalog(GOOD).adapters() == {"support-v1": "/adapters/v1", "support-v2": "/adapters/v2"}


def test_endpoint_variant_names_its_model_and_is_not_base():
    route = parse_catalog("""
routes:
  r:
    variants:
      - {name: v1, adapter: a1, weight: 1}
      - {name: hosted, endpoint: "https://api.example.com/v1", model: gpt-x, api_key_env: HOSTED_KEY}
    fallback: [base, hosted]
""").routes["r"]
    hosted = route.variant("hosted")
    assert not hosted.is_base and route.upstream_model(hosted) == "gpt-x"
    assert [v.name for v in route.fallback_chain(route.variant("v1"))] == ["base", "hosted"]


def test_fallback_chain_skips_the_failed_variant():
    route = parse_catalog(GOOD).routes["support"]
    assert [v.name for v in route.fallback_chain(route.variant("v2"))] == ["v1", BASE]
    assert [v.name for v in route.fallback_chain(route.variant("v1"))] == [BASE]
    assert route.fallback_chain(route.variant(BASE)) == [route.variant("v1")]


def test_pricing_cost_per_1k_tokens():
    pricing = parse_catalog(GOOD).routes["support"].pricing
    assert pricing.cost(1000, 500) == pytest.approx(0.1 + 0.1)
    assert pricing.reference_cost(1000, 500) == pytest.approx(1 + 2)


@pytest.mark.parametrize(
    "text, message",
    [
        ("routes: [", "not valid YAML"),
        ("- a list", "expected a mapping"),
        ("routes: {}", "no routes defined"),
        ("routes: {r: {variants: [{name: a, adapter: x, weight: -1}]}}", "greater than or equal to 0"),
        ("routes: {r: {variants: [{name: a, adapter: x, weight: 0}]}}", "weight above 0"),
        (
            "routes: {r: {variants: [{name: a, adapter: x, weight: 1}, {name: a, adapter: y, weight: 1}]}}",
            "duplicate variant names",
        ),
        ("routes: {r: {variants: [{name: a, adapter: x, weight: 1}], fallback: [zz]}}", "unknown variants"),
        ("routes: {r: {variants: [{name: a, path: /p, weight: 1}]}}", "path but no adapter"),
        ("routes: {r: {variants: [{name: 'bad name', adapter: x, weight: 1}]}}", "must match"),
        ("routes: {'r:x': {variants: [{name: a, adapter: x, weight: 1}]}}", "must match"),
        ("routes: {r: {variants: [{name: a, adapter: x, weight: 1}], colour: red}}", "Extra inputs"),
        ("routes: {r: {variants: [{name: base, adapter: x, weight: 1}]}}", "reserved"),
        ("routes: {r: {variants: [{name: h, endpoint: 'https://api.example/v1', weight: 1}]}}", "needs the `model`"),
        ("routes: {r: {variants: [{name: h, endpoint: 'ftp://x', model: m, weight: 1}]}}", "http(s) URL"),
        (
            "routes: {r: {variants: [{name: h, endpoint: 'https://x/v1', adapter: a, model: m, weight: 1}]}}",
            "not `adapter`",
        ),
        ("routes: {r: {variants: [{name: h, adapter: a, model: m, weight: 1}]}}", "go with an `endpoint`"),
    ],
)
def test_bad_catalogs_are_rejected_with_a_clear_message(text, message):
    with pytest.raises(CatalogError) as info:
        parse_catalog(text, "routes.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("routes.yaml")


def test_catalog_file_reload_keeps_last_good(tmp_path: Path):
    path = tmp_path / "routes.yaml"
    path.write_text(GOOD)
    source = CatalogFile(path)
    assert not source.reload_if_changed()
    path.write_text("routes: [")
    with pytest.raises(CatalogError):
        source.reload_if_changed()
    assert "support" in source.current.routes  # still serving the last good catalog
    path.write_text(GOOD.replace("support:", "sales:"))
    assert source.reload_if_changed()
    assert list(source.current.routes) == ["sales"]


def test_one_adapter_name_cannot_name_two_versions():
    text = """
routes:
  a:
    variants: [{name: v1, adapter: support, path: /adapters/support/1, weight: 1}]
  b:
    variants: [{name: v2, adapter: support, path: /adapters/support/2, weight: 1}]
"""
    with pytest.raises(CatalogError, match="vllm#30931"):
        parse_catalog(text)
    same = text.replace("/adapters/support/2", "/adapters/support/1")
    assert parse_catalog(same).adapters() == {"support": "/adapters/support/1"}
