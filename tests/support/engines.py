"""Shared test fixtures: engines (owned by the engines work; see docs/architecture.md)."""
