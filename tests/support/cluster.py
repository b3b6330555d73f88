"""Shared test fixtures: cluster (owned by the cluster work; see docs/architecture.md)."""
