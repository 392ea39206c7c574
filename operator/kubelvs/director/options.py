"""The director's command-line options and configuration (no heavy imports: ``kubelvs plan``
builds the same parser)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class DirectorConfig:
    node_name: str
    state_dir: Path
    interface: str = "kubelvs0"
    netns: str | None = None  # program IPVS in this named network namespace (tests); default: our own
    resync_seconds: float = 30.0
    coalesce_seconds: float = 0.05
    metrics_port: int = 0  # 0: no metrics or health endpoint
    metrics_address: str = ""  # "": the node's InternalIP (from the Node object), never 0.0.0.0 by default
    api_timeout_seconds: float = 30.0  # every list, patch and event request (a half-open connection ends)
    health_max_sync_age_seconds: float = 0.0  # 0: 3 x resync_seconds
    port_filter: bool = True  # narrow each VIP to its service ports (nftables table inet kubelvs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node-name", default=os.environ.get("NODE_NAME"), help="this node (default: $NODE_NAME)")
    parser.add_argument("--netns", help="program IPVS in this named network namespace (tests)")
    parser.add_argument("--resync-seconds", type=float, default=30.0, help="full resync period")
    parser.add_argument(
        "--metrics-port", type=int, default=9344, help="Prometheus /metrics, /healthz and /readyz port (0: off)"
    )
    parser.add_argument(
        "--metrics-address",
        default=os.environ.get("KUBELVS_METRICS_ADDRESS", ""),
        help="address to serve metrics and health on (default: the node's InternalIP; 0.0.0.0 or :: for all)",
    )
    parser.add_argument("--api-timeout", type=float, default=30.0, help="seconds for each API request")


def config_from(args: argparse.Namespace) -> DirectorConfig:
    return DirectorConfig(
        node_name=args.node_name,
        state_dir=Path(args.state_dir),
        interface=args.interface,
        netns=args.netns,
        resync_seconds=args.resync_seconds,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        api_timeout_seconds=args.api_timeout,
        port_filter=not getattr(args, "no_port_filter", False),
    )
