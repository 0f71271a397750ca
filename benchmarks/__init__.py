"""Benchmarks: convo against a hand-written floor on SQLite and PostgreSQL (`python -m benchmarks`)."""
