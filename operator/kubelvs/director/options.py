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
    backend_metrics: bool = True  # the kernel's counters per real server too, not only per virtual service
    api_timeout_seconds: float = 30.0  # every list, patch and event request (a half-open connection ends)
    status_qps: float = 20.0  # status writes and Events per second, at most (0: no limit)
    stall_report_seconds: float = 1.0  # log event-loop stalls this long, with where they were (0: off)
    health_max_sync_age_seconds: float = 0.0  # 0: 3 x resync_seconds
    port_filter: bool = True  # narrow each VIP to its service ports (nftables table inet kubelvs)
    # The per-VIP owner election (Leases in lease_namespace); off: every director answers for
    # every VIP (one director per segment only).
    election: bool = True
    lease_namespace: str = "kubelvs-system"
    lease_duration: float = 2.0
    renew_deadline: float = 1.4
    retry_period: float = 0.5
    handover_delay: float = 2.0
    announce_interface: str = ""
    announce_count: int = 3
    announce_interval: float = 0.2
    announce_refresh: float = 10.0
    peer_port: int = 9345
    peer_address: str = ""  # "": the Node's InternalIP
    follow_backends: bool = True
    # On SIGTERM, hand every VIP to another director and wait (this long at most) until the new
    # owners answer for them; within the pod's terminationGracePeriodSeconds.
    shutdown_handover_seconds: float = 8.0
    # Connection sync (the kernel's IPVS sync daemons, kubelvs.core.syncd): a master and a backup
    # on the interface the directors share, so connections survive a VIP moving either way.
    sync_daemon: bool = True
    sync_interface: str = ""  # "": the announce interface, else the default route's, else the only uplink
    sync_id: int = 0
    sync_refresh_period: int = 1


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
    parser.add_argument(
        "--kernel-metrics",
        choices=("backends", "services"),
        default="backends",
        help="the kernel's counters per virtual service and real server (5 series per service, 8 per real server), "
        "or per virtual service only",
    )
    parser.add_argument("--api-timeout", type=float, default=30.0, help="seconds for each API request")
    parser.add_argument(
        "--status-qps",
        type=float,
        default=20.0,
        help="status writes and Events per second at most, in bursts of 5 seconds' worth (0: no limit); the kernel "
        "is programmed without waiting for them",
    )
    parser.add_argument(
        "--stall-report-seconds",
        type=float,
        default=1.0,
        help="log every stall of the event loop this long or longer, with the stacks sampled while it lasted (0: off)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("KUBELVS_LOG_LEVEL", "INFO"),
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default: $KUBELVS_LOG_LEVEL or INFO)",
    )
    election = parser.add_argument_group("VIP ownership (one director answers for each VIP)")
    election.add_argument(
        "--no-election",
        action="store_true",
        help="every director answers ARP/NDP for every VIP (only for a single director per segment)",
    )
    election.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "kubelvs-system"),
        help="namespace of the heartbeat and claim Leases (default: $POD_NAMESPACE or kubelvs-system)",
    )
    election.add_argument(
        "--lease-duration", type=float, default=2.0, help="a heartbeat unchanged this long means its director is gone"
    )
    election.add_argument(
        "--renew-deadline", type=float, default=1.4, help="an owner that cannot renew this long stops answering"
    )
    election.add_argument("--retry-period", type=float, default=0.5, help="heartbeat renewal period")
    election.add_argument(
        "--handover-delay",
        type=float,
        default=None,
        help="a (re)joining director receives VIPs by handover after being live this long (default: lease duration)",
    )
    election.add_argument(
        "--announce-interface",
        default=os.environ.get("KUBELVS_ANNOUNCE_INTERFACE", ""),
        help="announce VIPs on this interface (default: the one whose subnet contains the VIP)",
    )
    election.add_argument("--announce-count", type=int, default=3, help="gratuitous ARP/NA bursts at a takeover")
    election.add_argument("--announce-interval", type=float, default=0.2, help="seconds between those bursts")
    election.add_argument(
        "--announce-refresh", type=float, default=10.0, help="announce owned VIPs again this often (0: never)"
    )
    election.add_argument(
        "--peer-port", type=int, default=9345, help="UDP port of the direct heartbeat between directors (0: off)"
    )
    election.add_argument(
        "--peer-address",
        default=os.environ.get("KUBELVS_PEER_ADDRESS", ""),
        help="address the other directors send peer beats to (default: the node's InternalIP)",
    )
    election.add_argument(
        "--shutdown-handover-timeout",
        type=float,
        default=8.0,
        help="on SIGTERM, hand the VIPs over and wait this long at most for their new owners to answer "
        "(keep it under the pod's terminationGracePeriodSeconds; 0: exit at once)",
    )
    sync = parser.add_argument_group("connection sync (established connections survive a VIP move)")
    sync.add_argument(
        "--no-sync-daemon",
        action="store_true",
        help="run no IPVS sync daemon (connections through a director are lost when its VIPs move)",
    )
    sync.add_argument(
        "--sync-interface",
        default=os.environ.get("KUBELVS_SYNC_INTERFACE", ""),
        help="interface the directors share for sync multicast (default: --announce-interface, else the "
        "default route's interface, else the only interface with an address)",
    )
    sync.add_argument(
        "--sync-id", type=int, default=0, help="sync id 0..255: one per group of directors on a segment (0: any)"
    )
    sync.add_argument(
        "--sync-refresh-period",
        type=int,
        default=1,
        help="re-send a live connection after this many seconds (a restarted director learns it within "
        "that plus ~2 s; 0: every 50 packets, the kernel's default)",
    )
    election.add_argument(
        "--no-follow-backends",
        action="store_true",
        help="keep a VIP on a director even when it has no ready backend and another director has",
    )


def config_from(args: argparse.Namespace) -> DirectorConfig:
    return DirectorConfig(
        node_name=args.node_name,
        state_dir=Path(args.state_dir),
        interface=args.interface,
        netns=args.netns,
        resync_seconds=args.resync_seconds,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        backend_metrics=getattr(args, "kernel_metrics", "backends") == "backends",
        api_timeout_seconds=args.api_timeout,
        status_qps=args.status_qps,
        stall_report_seconds=getattr(args, "stall_report_seconds", 1.0),
        port_filter=not getattr(args, "no_port_filter", False),
        election=not args.no_election,
        lease_namespace=args.lease_namespace,
        lease_duration=args.lease_duration,
        renew_deadline=args.renew_deadline,
        retry_period=args.retry_period,
        handover_delay=args.lease_duration if args.handover_delay is None else args.handover_delay,
        announce_interface=args.announce_interface,
        announce_count=args.announce_count,
        announce_interval=args.announce_interval,
        announce_refresh=args.announce_refresh,
        peer_port=args.peer_port,
        peer_address=args.peer_address,
        follow_backends=not args.no_follow_backends,
        shutdown_handover_seconds=args.shutdown_handover_timeout,
        sync_daemon=not args.no_sync_daemon,
        sync_interface=args.sync_interface,
        sync_id=args.sync_id,
        sync_refresh_period=args.sync_refresh_period,
    )
