"""`python -m benchmarks --quick` runs to the end on SQLite and PostgreSQL with every correctness
check passing. Timings are not asserted: they belong to the full run, not to a test suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.mark.slow
def test_quick_benchmark_checks_pass_on_both_engines(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {
        **os.environ,
        "CONVO_BENCH_POSTGRES_URL": os.environ.get(
            "CONVO_TEST_POSTGRES_URL", PG_DEFAULT
        ),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert str(out) in proc.stdout
    assert "| resume | n=10 |" in proc.stdout

    report = json.loads(out.read_text())
    assert report["all_checks_passed"] is True
    failed = [c for c in report["checks"] if not c["ok"]]
    assert failed == []

    engines = {"sqlite", "postgresql"}
    names = {(c["engine"], c["name"].split(":")[0]) for c in report["checks"]}
    for engine in engines:
        for n in (10, 100):
            for what in ("resume", "append", "fork", "edit", "checkout"):
                assert (engine, f"{what} n={n}") in names, (engine, what, n)
        assert (engine, "audit 50x10") in names
        assert (engine, "images") in names

    measured = {(r["engine"], r["measure"]) for r in report["results"]}
    for engine in engines:
        for measure in (
            "resume",
            "append",
            "append growth",
            "append growth, own time",
            "fork",
            "edit",
            "checkout",
            "audit",
            "size",
        ):
            assert (engine, measure) in measured, (engine, measure)
    # Growth is judged on the ratio to the floor: the largest n's against the smallest's.
    for engine in engines:
        appends = [r for r in report["results"] if (r["engine"], r["measure"]) == (engine, "append")]
        (growth,) = [r for r in report["results"] if (r["engine"], r["measure"]) == (engine, "append growth")]
        assert growth["ratio"] == pytest.approx(appends[-1]["ratio"] / appends[0]["ratio"])
        assert growth["passed"] == (growth["ratio"] <= 1.3)
    # Raw samples are kept for every timed measure.
    resume = [r for r in report["results"] if r["measure"] == "resume"]
    assert all(r["convo_samples"] and r["floor_samples"] for r in resume)
