"""Entry point: ``python -m hack.localkube.node --config DIR/node-agent.json`` (started by LocalCluster.up)."""

from __future__ import annotations

import argparse
import sys

from hack.localkube.node.agent import NodeAgent
from hack.localkube.node.config import AgentConfig


def main(argv: list[str] | None = None) -> int:
    """Run the node agent until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m hack.localkube.node", description=__doc__)
    parser.add_argument("--config", required=True, help="JSON file written by LocalCluster")
    args = parser.parse_args(argv)
    NodeAgent(AgentConfig.load(args.config)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
