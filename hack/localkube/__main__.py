"""Command line: ``python -m hack.localkube up|down|status --dir DIR``.

up      start a cluster in DIR (or find it running) and print how to use it
down    stop every process of the cluster in DIR (pods included); --purge also deletes DIR
status  say whether the cluster in DIR runs, with its nodes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hack.localkube.cluster import ClusterConfig, ClusterStartError, LocalCluster
from hack.localkube.tools import MissingToolError


def main(argv: list[str] | None = None) -> int:
    """Run the CLI."""
    parser = argparse.ArgumentParser(prog="python -m hack.localkube", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a cluster in DIR")
    up.add_argument("--dir", required=True, type=Path, help="state, logs and kubeconfig go here")
    up.add_argument("--nodes", type=int, default=2, help="number of local nodes (default 2)")
    up.add_argument("--devices", type=int, default=8, help="devices per node (default 8)")
    up.add_argument("--resource", default="huawei.com/Ascend910", help="device resource name")
    up.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the cluster")
    down = sub.add_parser("down", help="stop the cluster in DIR")
    down.add_argument("--dir", required=True, type=Path)
    down.add_argument("--purge", action="store_true", help="also delete DIR")
    status = sub.add_parser("status", help="is the cluster in DIR running?")
    status.add_argument("--dir", required=True, type=Path)
    args = parser.parse_args(argv)

    if args.command == "up":
        config = ClusterConfig(nodes=args.nodes, devices_per_node=args.devices, device_resource=args.resource)
        cluster = LocalCluster(args.dir, config)
        try:
            cluster.up(timeout=args.timeout)
        except (ClusterStartError, MissingToolError) as exc:
            print(f"localkube: {exc}", file=sys.stderr)
            return 1
        print(f"cluster running: {cluster.server}\n  export KUBECONFIG={cluster.kubeconfig}\n"
              f"  kubectl get nodes\n  logs: {cluster.logs_dir}/ (pods: {cluster.dir}/pods/*/logs/)\n"
              f"  stop: python -m hack.localkube down --dir {cluster.dir}")
        return 0
    cluster = LocalCluster(args.dir)
    if args.command == "down":
        stopped = cluster.down(purge=args.purge)
        suffix = " and deleted it" if args.purge else ""
        print(f"stopped {stopped} processes of the cluster in {cluster.dir}{suffix}")
        return 0
    if cluster.is_running():
        print(f"running at {cluster.server}; KUBECONFIG={cluster.kubeconfig}")
        return 0
    print(f"not running (no live cluster in {cluster.dir})")
    return 3


if __name__ == "__main__":
    sys.exit(main())
