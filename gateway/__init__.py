"""The load-aware gateway in front of one PyptoServing's engine pods (no torch)."""
