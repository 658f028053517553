"""The operators' kit (ops/): the alert rules are valid Prometheus rules that fire on what they claim,
and every metric the dashboard and the rules name is one a Parley service exports (or redis_exporter's)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import REGISTRY

import command_api.metrics
import projector.metrics
import realtime_fanout.metrics
import servicekit.looplag
import servicekit.metrics
from realtime_fanout.closecodes import SLOW_CONSUMER
from servicekit.memstats import register_memory_collector
from tests.test_http_edge import Services, services  # noqa: F401  (the three services, as real processes)

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "ops" / "prometheus" / "alerts.yml"
RULES_TEST = ROOT / "ops" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "parley.json"
REDIS_EXPORTER = frozenset({"redis_memory_used_bytes", "redis_memory_max_bytes"})
"""redis_exporter's standard names for Redis `INFO memory` `used_memory` and `maxmemory`."""
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
METRIC = re.compile(r"\b(?:parley|redis)_[a-z0-9_]+")
MODULES = (
    command_api.metrics,
    projector.metrics,
    realtime_fanout.metrics,
    servicekit.metrics,
    servicekit.looplag,
)


def exported() -> set[str]:
    """Every series name the services' metric modules register on the default registry."""
    assert MODULES
    register_memory_collector()  # the fanout's heap gauges, computed at scrape time
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("parley_"):
            names |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
    return names


def rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in doc["panels"] for target in panel["targets"]]


def test_promtool_checks_the_rules_and_their_unit_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (Debian: apt-get install prometheus); the parse tests still run")
    for command in (["check", "rules", str(RULES)], ["test", "rules", str(RULES_TEST)]):
        done = subprocess.run([promtool, *command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_rule_is_an_alert_with_a_summary_and_a_severity() -> None:
    doc = yaml.safe_load(RULES.read_text())
    seen = set()
    for group in doc["groups"]:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"].startswith("Parley") and rule["alert"] not in seen
            seen.add(rule["alert"])
            assert rule["labels"]["severity"] in {"page", "warn"}
            assert rule["annotations"]["summary"]
    assert len(seen) >= 10


def test_every_metric_the_kit_names_is_exported() -> None:
    known = exported() | REDIS_EXPORTER
    for where, exprs in (("alerts.yml", rule_exprs()), ("parley.json", dashboard_exprs())):
        named = {name for expr in exprs for name in METRIC.findall(expr)}
        assert named, where
        assert named <= known, f"{where} names metrics nobody exports: {sorted(named - known)}"


def test_the_kit_covers_what_an_operator_must_see() -> None:
    """Lag, stopped partitions, dead letters, slow consumers, resyncs, 5xx/503, append latency, Redis memory."""
    must = {
        "parley_projector_lag_seconds", "parley_projector_partition_stopped",
        "parley_projector_dead_letters_total", "parley_fanout_closes_total", "parley_fanout_resyncs_total",
        "parley_http_responses_total", "parley_append_seconds_bucket", "redis_memory_used_bytes",
    }  # fmt: skip
    for exprs in (rule_exprs(), dashboard_exprs()):
        named = {name for expr in exprs for name in METRIC.findall(expr)}
        assert must <= named, sorted(must - named)
    assert any(f'code="{SLOW_CONSUMER}"' in expr for expr in rule_exprs())
    assert "parley_retention_stream_entries" in " ".join(dashboard_exprs())


async def test_every_service_serves_the_kit_metrics_its_heap_and_counts_answers_by_status(
    services: Services,  # noqa: F811
) -> None:
    known = exported()
    async with httpx.AsyncClient() as http:
        for name, port in services.http_ports.items():
            assert (await http.get(f"http://127.0.0.1:{port}/no-such-route")).status_code == 404
            scraped = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            assert re.search(r'^parley_http_responses_total\{code="404"\} [1-9]', scraped, re.M), name
            series = {line.split("{")[0].split(" ")[0] for line in scraped.splitlines() if line[:1] != "#"}
            ours = {s for s in series if s.startswith("parley_")}
            assert ours <= known, f"{name} serves metrics the test does not know: {sorted(ours - known)}"
            assert "parley_python_allocated_blocks" in ours, f"{name} does not serve its heap gauges"
