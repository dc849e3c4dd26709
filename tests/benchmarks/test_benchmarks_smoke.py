"""The benchmark scripts run end to end in a tiny configuration and print their JSON keys.

They measure nothing here (a few requests, a few simulated jobs); the figures come from full
runs (README, "Performance").
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from sdcn_p2p.dht import keys, routing, store

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str) -> ModuleType:
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    return load


def run_json(module: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert module.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_overhead(load, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["--requests", "3", "--duration", "0.2", "--concurrency", "4", "--providers", "1"]
    result = run_json(load("overhead"), argv, capsys)
    assert result["gateway_ms_p50"] > 0 and result["direct_ms_p50"] > 0
    assert {"added_ms_p50", "added_ms_p99"} <= result.keys()
    assert result["gateway_rps_c4"] > 0 and result["direct_rps_c4"] > 0
    assert result["metrics"] and result["metrics_jobs_ok"] > 0


def test_metrics_cost(load, capsys) -> None:  # type: ignore[no-untyped-def]
    result = run_json(load("metrics_cost"), ["--jobs", "3", "--rounds", "2"], capsys)
    assert result["cpu_ms_per_request_metrics"] > 0 and result["cpu_ms_per_request_no_metrics"] > 0
    assert len(result["spread_ms"]) == 2 and result["scrape_bytes"] > 1000


def test_scheduling(load, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["--jobs", "6", "--providers", "2", "--burst", "3"]
    result = run_json(load("scheduling"), argv, capsys)
    assert result["p95_ratio_vs_round_robin"] > 0
    assert result["p95_ratio_vs_best_other"] > 0
    assert 0 < result["throughput_at_95"] <= 1
    policies = {"ours", "round-robin", "random", "least-queue"}
    assert all(row.keys() == policies for row in result["cases"].values())
    assert len(result["cases"]) == 5


def test_footprint(load, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["--concurrent", "6", "--providers", "1", "--max-queue", "8", "--idle", "0"]
    result = run_json(load("footprint"), [*argv, "--sim-sizes", "3", "6"], capsys)
    assert 10 < result["provider_idle_rss_mb"] < 1000
    assert result["in_flight"] == 6 and result["answered_early"] == 0
    assert "gateway_rss_growth_mb_1000_concurrent" in result
    assert result["sim_peers_max"] > 6


def test_netsim(load, capsys) -> None:  # type: ignore[no-untyped-def]
    netsim = load("netsim")
    argv = ["--peers", "200", "--duration", "40", "--after", "30", "--lookups", "100"]
    result = run_json(netsim, [*argv, "--adverts", "4"], capsys)
    assert result["peers"] == 200 and 0.4 < result["servers"] / 200 < 0.8
    assert result["hops_p95"] <= 3 and result["lookup_success"] >= 0.95
    assert result["lookup_owner_found"] >= 0.95 and result["lookup_ms_p50"] > 0
    assert 0 < result["propagation_ms_p50"] <= result["propagation_ms_p99"] < 10_000
    assert result["advert_reach"] > 0.9 and result["msgs_per_peer_per_advert"] > 1
    assert result["gossip_bytes_per_peer_s"] > result["gossip_push_bytes_per_peer_s"] > 0
    assert result["after_leave_table_live"] < result["table_live"] <= 1
    assert result["after_leave_lookup_owner_found"] >= 0.9
    assert result["store_records_mean"] > 0 and result["peak_rss_mb"] > 0
    # The key cache and the signature check it swapped out are back in the cores.
    assert routing.node_key_int is keys.node_key_int
    assert store.validate.__module__ == "sdcn_p2p.dht.store"


def test_comfyui_overhead(load, capsys) -> None:  # type: ignore[no-untyped-def]
    result = run_json(load("comfyui_overhead"), ["--jobs", "2", "--batch", "2"], capsys)
    assert result["raw_cpu_ms"] > 0 and result["backend_cpu_ms"] > 0
    assert {"added_cpu_ms", "batch2_cpu_ms_per_image", "capabilities_cpu_ms"} <= result.keys()


def test_trust(load, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["--jobs", "12", "--sybil-jobs", "8", "--warmup", "4", "--swarm", "2", "--honest", "2"]
    result = run_json(load("trust"), argv, capsys)
    keys = {
        "liar_jobs_before_exclusion_max",
        "bad_images_served",
        "extra_compute",
        "honest_excluded",
        "unchecked_jobs",
    }
    assert keys <= result.keys() and keys <= result["sybil"].keys()
    assert len(result["per_kind"]) == 6 and result["liars"] == 6
    assert result["sybil"]["liars"] == 2
    assert result["honest_excluded"] == 0


def test_jobs(load, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["--jobs", "70", "--lag-jobs", "2", "--steps", "3", "--restarts", "1"]
    result = run_json(load("jobs"), argv, capsys)
    assert result["event_lag_samples"] > 0 and result["event_lag_ms_p99"] > 0
    assert result["submit_ms_p50"] > 0 and result["queued_jobs"] == 70
    assert result["sync_job_cpu_ms"] > 0
    assert result["queued_after_restart"] is True
    assert result["restart_s"] > 0 and result["start_empty_s"] > 0
    assert "gateway_rss_growth_mb_queued" in result


def test_fairness(load, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["--providers", "2", "--polite", "2", "--flood", "20", "--seconds", "6"]
    result = run_json(load("fairness"), argv, capsys)
    assert result["polite_p95_ratio"] > 0 and 0 < result["provider_busy_fraction"] <= 1
    assert result["contributor_p95_vs_anonymous"] > 0
    assert result["with_flood"]["flood_done"] > 0
