"""keepalived (Debian's, 2.2.x) as the VIP-failover reference for bench/ha_bench.py.

One VRRP instance per director namespace of a tests/kernel/ha_topology.HATopology, the VIP as
``virtual_ipaddress`` on the director's uplink (eth0), everything else at keepalived's defaults
(preemption on, ``vrrp_garp_master_delay 5``).  Each instance has its own config file and pid
files (``-f``, ``-p/-r/-c``) under a work directory, and runs in the foreground (``-n``), VRRP
only (``-P``), logging to its console (our log file).

Profiles: ``default`` (VRRPv2, ``advert_int 1``) and ``tuned`` (VRRPv3, ``advert_int 0.1``).

With ``sync_interface`` set, keepalived also runs the kernel's IPVS connection sync
(``lvs_sync_daemon`` in ``global_defs``, tied to the instance): the master daemon while the
instance is MASTER, the backup daemon while it is BACKUP (bench/keepalived_flows.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROFILES: dict[str, dict[str, Any]] = {
    "default": {"advert_int": 1.0, "version": 2},
    "tuned": {"advert_int": 0.1, "version": 3},
}


@dataclass
class Keepalived:
    """keepalived in ``topo``'s namespace of director ``name``, holding ``vip`` as master when it
    has the highest ``priority`` of the instances alive."""

    topo: Any  # HATopology (tests/kernel is not a package)
    name: str
    vip: str
    priority: int
    workdir: Path
    advert_int: float = 1.0
    version: int = 2
    vrid: int = 51
    interface: str = "eth0"
    more_vips: tuple[str, ...] = ()  # further virtual_ipaddress entries of the same instance
    sync_interface: str = ""  # lvs_sync_daemon on this interface ("": none)
    sync_id: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / f"{self.name}.conf"
        self.pid = self.workdir / f"{self.name}.pid"
        self.vrrp_pid = self.workdir / f"{self.name}.vrrp.pid"
        self.checkers_pid = self.workdir / f"{self.name}.checkers.pid"
        self.log = self.workdir / f"{self.name}.log"

    def config(self) -> str:
        addresses = "".join(
            f"    {vip}{'/128' if ':' in vip else '/32'} dev {self.interface}\n" for vip in (self.vip, *self.more_vips)
        )
        sync = f"  lvs_sync_daemon {self.sync_interface} VI_1 id {self.sync_id}\n" if self.sync_interface else ""
        return (
            "global_defs {\n"
            f"  router_id {self.name}\n"
            f"  vrrp_version {self.version}\n"
            f"{sync}"
            "}\n"
            "vrrp_instance VI_1 {\n"
            "  state BACKUP\n"
            f"  interface {self.interface}\n"
            f"  virtual_router_id {self.vrid}\n"
            f"  priority {self.priority}\n"
            f"  advert_int {self.advert_int:g}\n"
            f"  virtual_ipaddress {{\n{addresses}  }}\n"
            "}\n"
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start it and wait until its VRRP child has written its pid file."""
        if self.alive():
            raise RuntimeError(f"keepalived in {self.name} already runs")
        for f in (self.pid, self.vrrp_pid, self.checkers_pid):
            f.unlink(missing_ok=True)
        self.conf.write_text(self.config())
        argv = ["ip", "netns", "exec", self.topo.ns(self.name), "keepalived", "-n", "-P", "-l", "-D", "-G"]
        argv += ["-f", str(self.conf), "-p", str(self.pid), "-r", str(self.vrrp_pid), "-c", str(self.checkers_pid)]
        with open(self.log, "ab") as f:
            f.write(f"\n===== {time.strftime('%H:%M:%S')} start\n".encode())
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not (self.vrrp_pid.exists() and self.vrrp_pid.read_text().strip()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"keepalived in {self.name} exited {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"keepalived in {self.name}: no VRRP pid after {timeout}s: {self.log_tail()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _child(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.vrrp_pid.read_text().strip())
        return None

    def crash(self) -> float:
        """Kill the whole daemon as a crash would (no goodbye advertisement, the VIP left on
        the interface); returns the monotonic time of the VRRP process's death.  The parent
        is frozen first, or it would respawn the VRRP child (and a parent dying first makes
        the child stop gracefully)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        child = self._child()
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        t = time.monotonic()
        self.proc.kill()
        self.proc.wait(timeout=30)
        return t

    def stop(self) -> None:
        """Graceful stop (SIGTERM: priority-0 advertisement, VIP released)."""
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def holds_vip(self) -> bool:
        out = self.topo.exec(self.name, ["ip", "-o", "addr", "show", "dev", self.interface], check=False).stdout
        return f" {self.vip}/" in out

    def drop_vip(self) -> None:
        """Remove the VIPs a crashed instance left behind."""
        for vip in (self.vip, *self.more_vips):
            prefix = "/128" if ":" in vip else "/32"
            self.topo.exec(self.name, ["ip", "addr", "del", f"{vip}{prefix}", "dev", self.interface], check=False)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""
