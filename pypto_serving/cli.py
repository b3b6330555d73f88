"""The `pypto-serving` console script: a dispatcher to the subcommands each package owns.

Each subcommand lives in its own package as a module exposing ``main(argv: list[str]) -> int``; it is
imported only when chosen, so `pypto-serving operator` never imports torch.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "engine": ("pypto_serving.engine.cli", "run the serving engine of one DP replica (OpenAI API on :8000)"),
    "gateway": ("pypto_serving.gateway.cli", "run the load-aware gateway in front of the engine pods (:8080)"),
    "operator": ("pypto_serving.operator.cli", "run the kopf operator for PyptoServing resources"),
    "tiny-model": ("pypto_serving.engine.tiny_model", "write a tiny random-weight HF model for tests and demos"),
    "bench": ("pypto_serving.engine.bench", "serving load generator (like `vllm bench serve`)"),
    "crd": ("pypto_serving.operator.crd", "print the PyptoServing CRD generated from the pydantic models"),
}


def usage() -> str:
    """Return the top-level help text."""
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: pypto-serving <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `pypto-serving <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand's ``main``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        from pypto_serving import __version__

        print(f"pypto-serving {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"pypto-serving: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
