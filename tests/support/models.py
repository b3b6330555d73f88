"""Shared test fixtures: models (owned by the models work; see docs/architecture.md)."""
