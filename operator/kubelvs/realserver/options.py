"""The real-server agent's command-line options (no heavy imports: ``kubelvs plan`` builds the
same parser)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from kubelvs.core.receive import PATH_MTU

DEFAULT_STATE_DIR = "/run/kubelvs-realserver"


@dataclass
class RealServerConfig:
    node_name: str
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    proc: str = "/proc"  # where the host's procfs is (sysctls are written under it)
    resync_seconds: float = 30.0
    retry_seconds: float = 1.0  # while a target is not prepared (its namespace not there yet)
    metrics_port: int = 9346  # 0: no metrics or health endpoint
    metrics_address: str = ""
    api_timeout_seconds: float = 30.0
    tunnel_path_mtu: int = PATH_MTU  # between the directors and the real servers: TUN's MSS clamp


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node-name", default=os.environ.get("NODE_NAME"), help="this node (default: $NODE_NAME)")
    parser.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        help="where the agent records what it set in each namespace (default: %(default)s)",
    )
    parser.add_argument(
        "--proc",
        default=os.environ.get("KUBELVS_PROC", "/proc"),
        help="the host's procfs, for sysctls: a container's own /proc/sys is read-only "
        "(default: $KUBELVS_PROC or /proc)",
    )
    parser.add_argument("--resync-seconds", type=float, default=30.0, help="full resync period")
    parser.add_argument(
        "--metrics-port", type=int, default=9346, help="Prometheus /metrics, /healthz and /readyz port (0: off)"
    )
    parser.add_argument(
        "--metrics-address",
        default=os.environ.get("KUBELVS_METRICS_ADDRESS", ""),
        help="address to serve metrics and health on (default: $KUBELVS_METRICS_ADDRESS, else all addresses)",
    )
    parser.add_argument("--api-timeout", type=float, default=30.0, help="seconds for each API request")
    parser.add_argument(
        "--tunnel-path-mtu",
        type=int,
        default=PATH_MTU,
        help="MTU of the path from the directors to the real servers: TUN backends offer an MSS that fits "
        "it once encapsulated (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("KUBELVS_LOG_LEVEL", "INFO"),
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default: $KUBELVS_LOG_LEVEL or INFO)",
    )
    pod = parser.add_argument_group("init-container mode (no node agent: prepare this pod's own namespace, then exit)")
    pod.add_argument("--pod", action="store_true", help="prepare the namespace this process runs in, and exit")
    pod.add_argument("--vip", action="append", default=[], help="a VIP this pod receives (repeatable)")
    pod.add_argument("--method", choices=["DR", "TUN"], default="DR", help="forwarding method (default: DR)")
    pod.add_argument("--tunnel", choices=["ipip", "gue", "gre"], default="ipip", help="TUN encapsulation")
    pod.add_argument("--tunnel-port", type=int, default=None, help="GUE's UDP port")


def config_from(args: argparse.Namespace) -> RealServerConfig:
    return RealServerConfig(
        node_name=args.node_name,
        state_dir=Path(args.state_dir),
        proc=args.proc,
        resync_seconds=args.resync_seconds,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        api_timeout_seconds=args.api_timeout,
        tunnel_path_mtu=args.tunnel_path_mtu,
    )
