"""``kubelvs``: a static LVS director from manifests (plan, apply, delete, show, adopt)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kubelvs import __version__
from kubelvs.collector import paused_collector
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


def real_kernel(args: argparse.Namespace) -> tuple[Any, ...]:
    """The kernel the commands act on: (IPVS client, VIP interface[, VIP port filter]). The seam
    tests replace (a fake returns the first two: no filter)."""
    # Imported here so that `kubelvs plan` works without kernel access.
    from kubelvs.kernel.addresses import VipInterface
    from kubelvs.kernel.ipvs import IPVSClient
    from kubelvs.kernel.vipfilter import VipPortFilter

    netns = getattr(args, "netns", None)
    port_filter = None if getattr(args, "no_port_filter", False) else VipPortFilter(netns)
    return IPVSClient(netns=netns), VipInterface(args.interface, netns=netns), port_filter


KernelFactory = Callable[[argparse.Namespace], tuple[Any, ...]]


def _state_dir(args: argparse.Namespace) -> Path:
    """--state-dir; with --netns and the default directory, one subdirectory per namespace (one
    record per kernel state)."""
    from kubelvs.state.ownership import DEFAULT_STATE_DIR

    state_dir = Path(args.state_dir)
    netns = getattr(args, "netns", None)
    if netns and state_dir == DEFAULT_STATE_DIR:
        state_dir = state_dir / f"netns-{Path(netns).name}"
    return state_dir


@contextlib.contextmanager
def _reconciler(args: argparse.Namespace) -> Iterator[Any]:
    """A Reconciler on the kernel, holding the state directory's lock for the command."""
    from kubelvs.apply import Reconciler
    from kubelvs.state.lock import StateLock
    from kubelvs.state.ownership import OwnershipStore

    state_dir = _state_dir(args)
    with StateLock(state_dir):
        client, vips, *rest = args.kernel(args)
        port_filter = rest[0] if rest else None
        try:
            yield Reconciler(client, OwnershipStore(state_dir, netns=getattr(args, "netns", None)), vips, port_filter)
        finally:
            close = getattr(client, "close", None)
            if close is not None:
                close()


def cmd_apply(args: argparse.Namespace) -> int:
    manifests, desired = _desired(args.filename)
    failed = _report_errors(manifests, desired)
    with _reconciler(args) as reconciler:
        report = reconciler.sync(desired)  # refused VirtualServers keep what they had (kept_origins)
    return _print_report(report) or (1 if failed else 0)


def cmd_delete(args: argparse.Namespace) -> int:
    manifests = load(args.filename)
    with _reconciler(args) as reconciler:
        report = reconciler.sync(DesiredState(), only=list(manifests.sources))
    return _print_report(report)


def cmd_adopt(args: argparse.Namespace) -> int:
    from kubelvs.apply import adopt

    with _reconciler(args) as reconciler:
        adopted = adopt(reconciler.client, reconciler.vips, reconciler.store)
    for address in adopted.addresses:
        print(f"adopted VIP {address}")
    for key in adopted.services:
        print(f"adopted {key}")
    for address in adopted.skipped_addresses:
        print(f"not adopted: VIP {address} on {args.interface} has no kubelvs mark (IFA_PROTO)")
    print(
        f"{len(adopted.addresses)} VIPs and {len(adopted.services)} services adopted into "
        f"{reconciler.store.path}; the next apply fills in their VirtualServers"
    )
    return 0


def cmd_release_node(args: argparse.Namespace) -> int:
    """Uninstall a director node's kernel settings: the claim addresses and the ARP sysctls the
    election set (restored to the values recorded before), the IPVS sync daemons kubelvs started
    and the sync sysctls it set. Refused while kubelvs still owns VIPs
    on this node: with the old ARP settings every director would answer for them."""
    from kubelvs.core.model import AF_INET, AF_INET6
    from kubelvs.kernel.claims import ArpGuard, ClaimAddresses, held_claims
    from kubelvs.kernel.syncdaemon import SyncDaemons
    from kubelvs.state.lock import StateLock
    from kubelvs.state.ownership import OwnershipStore

    state_dir = _state_dir(args)
    netns = getattr(args, "netns", None)
    with StateLock(state_dir):
        owned = OwnershipStore(state_dir, netns=netns).load()
        if owned.addresses:
            print(
                f"error: kubelvs still owns {len(owned.addresses)} VIP(s) here ({', '.join(sorted(owned.addresses))}); "
                "delete their VirtualServers (or stop the director and run `kubelvs delete`) first",
                file=sys.stderr,
            )
            return 1
        for vip, interface in held_claims(netns).items():
            ClaimAddresses(interface, netns).release(vip, AF_INET6 if ":" in vip else AF_INET)
            print(f"claim address {vip} removed from {interface}")
        ArpGuard(state_dir, netns).restore()
        stopped, restored = SyncDaemons(state_dir, netns).release()
        for state in stopped:
            print(f"IPVS {state.label} sync daemon stopped")
        for path, value in sorted(restored.items()):
            print(f"{path.replace('/', '.')} restored to {value}")
    print("ARP and IPVS sync settings restored to what they were before kubelvs")
    return 0


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
    if report.filter_error:
        print(f"warning: {report.filter_error}", file=sys.stderr)
    for failure in report.result.failed:
        print(f"error: {failure}", file=sys.stderr)
    for op in report.result.skipped:
        print(f"error: {op}: skipped, its service could not be created", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_show(args: argparse.Namespace) -> int:
    from kubelvs.state.ownership import OwnershipStore

    owned = OwnershipStore(_state_dir(args), netns=getattr(args, "netns", None)).load()
    client, *_ = args.kernel(args)  # (IPVS client, VIP interface[, port filter])
    try:
        observed = client.dump(with_counters=True)
    finally:
        close = getattr(client, "close", None)
        if close is not None:
            close()
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


def _director_arguments(parser: argparse.ArgumentParser) -> None:
    # The director's own options live with it; kubelvs.director.options imports nothing heavy, so
    # `kubelvs plan` does not load the kubernetes client.
    from kubelvs.director.options import add_arguments

    add_arguments(parser)


def _run_director(args: argparse.Namespace) -> int:
    from kubelvs.director.app import main as director_main

    return director_main(args)


def _run_realserver(args: argparse.Namespace) -> int:
    from kubelvs.realserver.app import main as realserver_main

    return realserver_main(args)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command``: the one about to run, when known. The agents' many options (and
    the modules that define them: 20 ms natively, half a second under emulation) are added only
    for their own command, or when it is not known."""
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
        sub.add_argument(
            "--no-port-filter",
            action="store_true",
            help="do not narrow the VIPs to their service ports (nftables table inet kubelvs)",
        )
        return sub

    def with_netns(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--netns",
            help="act on this named network namespace (default state directory: a subdirectory per namespace)",
        )
        return sub

    with_files("plan", "print the IPVS rules the manifests yield (ipvsadm -Sn format)").set_defaults(func=cmd_plan)
    with_netns(with_state(with_files("apply", "program IPVS from the manifests"))).set_defaults(func=cmd_apply)
    with_netns(with_state(with_files("delete", "remove what the manifests' VirtualServers programmed"))).set_defaults(
        func=cmd_delete
    )
    with_netns(
        with_state(commands.add_parser("show", help="the services kubelvs owns, with live counters"))
    ).set_defaults(func=cmd_show)
    with_netns(
        with_state(
            commands.add_parser(
                "adopt",
                help="rebuild the ownership record from the kernel: kubelvs-marked VIPs on the interface and "
                "the IPVS services on them",
            )
        )
    ).set_defaults(func=cmd_adopt)
    with_netns(
        with_state(
            commands.add_parser(
                "release-node",
                help="uninstall: remove the election's claim addresses, stop kubelvs's IPVS sync daemons and restore "
                "the ARP and sync sysctls it changed",
            )
        )
    ).set_defaults(func=cmd_release_node)
    director = with_state(commands.add_parser("director", help="run the director agent (in-cluster)"))
    director.set_defaults(func=_run_director)
    if command in (None, "director"):
        _director_arguments(director)
    realserver = commands.add_parser(
        "realserver", help="run the real-server agent: prepare this node's DR/TUN backends to receive"
    )
    realserver.set_defaults(func=_run_realserver)
    if command in (None, "realserver"):
        from kubelvs.realserver.options import add_arguments as realserver_arguments

        realserver_arguments(realserver)
    return parser


def main(argv: list[str] | None = None, kernel: KernelFactory | None = None) -> int:
    """Run one command. ``kernel``: what ``apply``, ``delete``, ``adopt`` and ``show`` act on
    (default :func:`real_kernel`)."""
    from kubelvs.state.ownership import OwnershipError

    argv = sys.argv[1:] if argv is None else argv
    # The command is the first word (the only option before it, --version, takes no value).
    args = build_parser(next((word for word in argv if not word.startswith("-")), None)).parse_args(argv)
    args.kernel = kernel or real_kernel
    agent = args.func in (_run_director, _run_realserver)
    try:
        # A one-shot command keeps what it builds to the end: no collection would free any of it.
        with contextlib.nullcontext() if agent else paused_collector():
            return int(args.func(args))
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OwnershipError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
