"""Developer and CI tooling that is not shipped in the package (local Kubernetes substrate, install scripts)."""
