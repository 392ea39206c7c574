#!/usr/bin/env python3
"""`make demo`, inside the IPVS VM: a client, a director and three web servers in network
namespaces on one bridge; kubelvs programs the director from examples/ with DR, then TUN, and the
client's requests go round the web servers."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "kernel"))

from topology import Topology  # noqa: E402

KUBELVS = str(Path(sys.executable).with_name("kubelvs"))


def banner(text: str) -> None:
    print(f"\n\033[1m=== {text}\033[0m", flush=True)


def kubelvs(topo: Topology, state_dir: str, *args: str) -> None:
    command = [KUBELVS, *args]
    if args[0] != "plan":
        command += ["--state-dir", state_dir]
    print(f"$ kubelvs {' '.join(args)}", flush=True)
    result = topo.exec("dir1", command, check=False)
    sys.stdout.write(result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"kubelvs {args[0]} failed with status {result.returncode}")


def requests(topo: Topology, vip: str, n: int) -> None:
    names = topo.client_get(vip, 80, n)
    print(f"client -> http://{vip}/ x{n}: {' '.join(names)}")
    print(f"  share: {dict(sorted(Counter(names).items()))}", flush=True)
    if any(name.startswith("ERR") for name in names):
        raise SystemExit("some requests failed")


def main() -> int:
    state_dir = tempfile.mkdtemp(prefix="kubelvs-demo-")
    with Topology(real_servers=3, directors=1, index=1, ports=(80,)) as topo:
        dr_vip, tun_vip = "10.77.1.200", "10.77.1.201"
        for rs in topo.real_servers:
            topo.real_server_dr(rs, dr_vip)  # VIP on lo, ARP hidden
            topo.real_server_tun(rs, tun_vip)  # VIP on tunl0, rp_filter off
        banner(f"topology: client {topo.ip4('client')}, director {topo.ip4('dir1')}, "
               f"web servers {', '.join(topo.ip4(r) for r in topo.real_servers)}")

        banner("Direct Routing: a VirtualServer over a Service's EndpointSlice (examples/web-dr.yaml)")
        kubelvs(topo, state_dir, "plan", "-f", "examples/web-dr.yaml")
        kubelvs(topo, state_dir, "apply", "-f", "examples/web-dr.yaml")
        requests(topo, dr_vip, 6)

        banner("IP tunnelling, weighted round robin (examples/web-tun.yaml), next to the DR one")
        kubelvs(topo, state_dir, "apply", "-f", "examples/web-dr.yaml", "-f", "examples/web-tun.yaml")
        requests(topo, tun_vip, 8)
        kubelvs(topo, state_dir, "show")

        banner("the kernel's own view (ipvsadm -Ln) in the director")
        print(topo.exec("dir1", ["ipvsadm", "-Ln"]).stdout)

        banner("kubelvs delete removes exactly what it added")
        kubelvs(topo, state_dir, "delete", "-f", "examples/web-dr.yaml", "-f", "examples/web-tun.yaml")
        left = topo.exec("dir1", ["ipvsadm", "-Sn"]).stdout
        print(f"rules left in the director: {left.strip() or 'none'}")
    subprocess.run(["rm", "-rf", state_dir], check=False)
    banner("demo done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
