"""``kubelvs``: a static LVS director from manifests (plan, apply, delete, show)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kubelvs import __version__
from kubelvs.core.desired import DesiredState, desired_state
from kubelvs.core.model import Counters, DestCounters
from kubelvs.core.rules import dest_rule, format_rules, service_rule
from kubelvs.manifests import ManifestError, Manifests, load


def _desired(paths: list[str]) -> tuple[Manifests, DesiredState]:
    manifests = load(paths)
    return manifests, desired_state(manifests.virtual_servers, manifests.cluster())


def _report_errors(manifests: Manifests, desired: DesiredState) -> bool:
    for error in desired.errors:
        print(f"error: {manifests.sources.get(error.ref, '?')}: {error}", file=sys.stderr)
    for resolution in desired.resolutions.values():
        if resolution.problem:
            print(
                f"warning: {manifests.sources.get(resolution.ref, '?')}: {resolution.ref}: "
                f"{resolution.problem.message}",
                file=sys.stderr,
            )
    return bool(desired.errors)


def cmd_plan(args: argparse.Namespace) -> int:
    manifests, desired = _desired(args.filename)
    failed = _report_errors(manifests, desired)
    sys.stdout.write(format_rules(desired.services))
    return 1 if failed else 0


def _reconciler(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    # Imported here so that `kubelvs plan` works without pyroute2's kernel access.
    from kubelvs.apply import Reconciler
    from kubelvs.kernel.addresses import VipInterface
    from kubelvs.kernel.ipvs import IPVSClient
    from kubelvs.state.ownership import OwnershipStore

    return Reconciler(IPVSClient(), OwnershipStore(Path(args.state_dir)), VipInterface(args.interface))


def cmd_apply(args: argparse.Namespace) -> int:
    manifests, desired = _desired(args.filename)
    failed = _report_errors(manifests, desired)
    reconciler = _reconciler(args)
    report = reconciler.sync(desired, keep=[e.ref for e in desired.errors])
    return _print_report(report) or (1 if failed else 0)


def cmd_delete(args: argparse.Namespace) -> int:
    manifests = load(args.filename)
    reconciler = _reconciler(args)
    report = reconciler.sync(DesiredState(), only=list(manifests.sources))
    return _print_report(report)


def _print_report(report) -> int:  # type: ignore[no-untyped-def]
    counts = report.plan.counts()
    summary = ", ".join(f"{n} {verb}" for verb, n in sorted(counts.items())) or "no changes"
    print(f"{len(report.plan)} operations ({summary}); {len(report.result.failed)} failed")
    for address in report.vips_added:
        print(f"VIP {address} made local")
    for address in report.vips_removed:
        print(f"VIP {address} removed")
    for key in report.plan.conflicts:
        print(f"error: {key} exists in the kernel and is not owned by kubelvs; left untouched", file=sys.stderr)
    for failure in report.result.failed:
        print(f"error: {failure}", file=sys.stderr)
    for op in report.result.skipped:
        print(f"error: {op}: skipped, its service could not be created", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_show(args: argparse.Namespace) -> int:
    from kubelvs.kernel.ipvs import IPVSClient
    from kubelvs.state.ownership import OwnershipStore

    owned = OwnershipStore(Path(args.state_dir)).load()
    with IPVSClient() as client:
        observed = client.dump(with_counters=True)
    rows: list[tuple[object, ...]] = [("RULE", "CONNS", "INPKTS", "OUTPKTS", "INBYTES", "OUTBYTES", "ACTIVE", "INACT")]
    for key in sorted(k for k in owned.services if k in observed.services):
        service = observed.services[key]
        c = observed.service_counters.get(key, Counters())
        rows.append(
            (
                f"{service_rule(service)}  ({owned.services[key]})",
                c.connections,
                c.packets_in,
                c.packets_out,
                c.bytes_in,
                c.bytes_out,
                "",
                "",
            )
        )
        for dest in service.destinations:
            d = observed.dest_counters.get((key, dest.key), DestCounters())
            rows.append(
                (
                    "  -> " + dest_rule(key, dest).split(" -r ", 1)[1],
                    d.counters.connections,
                    d.counters.packets_in,
                    d.counters.packets_out,
                    d.counters.bytes_in,
                    d.counters.bytes_out,
                    d.active_connections,
                    d.inactive_connections,
                )
            )
    width = max(len(str(r[0])) for r in rows)
    for row in rows:
        print(f"{row[0]!s:<{width}} " + " ".join(f"{v!s:>9}" for v in row[1:]))
    return 0


def cmd_director(args: argparse.Namespace) -> int:
    import logging

    from kubelvs.director.agent import DirectorConfig, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.node_name:
        print("error: --node-name (or NODE_NAME) is required", file=sys.stderr)
        return 2
    config = DirectorConfig(
        node_name=args.node_name,
        state_dir=Path(args.state_dir),
        interface=args.interface,
        netns=args.netns,
        resync_seconds=args.resync_seconds,
        metrics_port=args.metrics_port,
    )
    return run(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubelvs", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kubelvs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_files(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument(
            "-f",
            "--filename",
            action="append",
            required=True,
            help="a YAML file or directory of VirtualServers, Services, EndpointSlices (repeatable)",
        )
        return sub

    def with_state(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        from kubelvs.state.ownership import DEFAULT_STATE_DIR

        sub.add_argument(
            "--state-dir",
            default=str(DEFAULT_STATE_DIR),
            help="where kubelvs records what it owns (default: %(default)s)",
        )
        sub.add_argument("--interface", default="kubelvs0", help="dummy interface that holds the VIPs")
        return sub

    with_files("plan", "print the IPVS rules the manifests yield (ipvsadm -Sn format)").set_defaults(func=cmd_plan)
    with_state(with_files("apply", "program IPVS from the manifests")).set_defaults(func=cmd_apply)
    with_state(with_files("delete", "remove what the manifests' VirtualServers programmed")).set_defaults(
        func=cmd_delete
    )
    with_state(commands.add_parser("show", help="the services kubelvs owns, with live counters")).set_defaults(
        func=cmd_show
    )
    director = with_state(commands.add_parser("director", help="run the director agent (in-cluster)"))
    director.add_argument("--node-name", default=os.environ.get("NODE_NAME"), help="this node (default: $NODE_NAME)")
    director.add_argument("--netns", help="program IPVS in this named network namespace (tests)")
    director.add_argument("--resync-seconds", type=float, default=30.0, help="full resync period")
    director.add_argument("--metrics-port", type=int, default=9344, help="Prometheus /metrics port (0: off)")
    director.set_defaults(func=cmd_director)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
