#!/usr/bin/env python3
"""A real, local Kubernetes control plane for tests (in the spirit of kubebuilder's envtest).

Runs etcd, kube-apiserver and kube-controller-manager, built from Go modules by
``hack/cluster/build.sh`` into ``$KUBELVS_CACHE/bin``, on 127.0.0.1 with free ports.

* PKI made with ``cryptography``: a CA, an apiserver serving certificate whose SANs include
  127.0.0.1, localhost and 10.0.2.2 (the host's loopback as seen from a qemu user-networking VM),
  an admin client certificate in group ``system:masters``, a client certificate for
  kube-controller-manager, and a service-account signing key.
* kube-apiserver runs with ``--authorization-mode=RBAC``.
* kube-controller-manager runs every default controller except the node-lifecycle and
  taint-eviction ones (there are no kubelets: they would mark pods NotReady and evict them),
  with ``--use-service-account-credentials``: the endpointslice controller turns Running/Ready
  pods with IPs into EndpointSlices, the serviceaccount(-token) controllers make the ``default``
  ServiceAccount, the namespace controller finishes namespace deletion.
* Logs, pid files, the kubeconfig and ``state.json`` go into the work directory.

Library use::

    cp = ControlPlane(workdir)
    cp.start()              # returns when /readyz is ok and the controllers run
    cp.kubeconfig           # path of the admin kubeconfig
    cp.stop()

CLI::

    python hack/cluster/controlplane.py up   [--dir DIR]   # start in the background
    python hack/cluster/controlplane.py down [--dir DIR]   # stop everything
    python hack/cluster/controlplane.py status [--dir DIR]

DIR defaults to ``$KUBELVS_CACHE/cluster``; KUBELVS_CACHE defaults to
``${XDG_CACHE_HOME:-$HOME/.cache}/kubelvs``.

Only the standard library, ``cryptography`` and PyYAML are needed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
BUILD_SH = HERE / "build.sh"

#: IPs and names always in the apiserver serving certificate.
DEFAULT_SANS: tuple[str, ...] = (
    "127.0.0.1",
    "::1",
    "10.0.2.2",  # the host's loopback seen from a VM under qemu user networking (slirp)
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)

#: Controllers of kube-controller-manager. "*" is every controller enabled by default; the
#: node-lifecycle and taint-eviction controllers are off because no kubelet heartbeats: they
#: would mark the test pods NotReady (emptying EndpointSlices) and evict them.
DEFAULT_CONTROLLERS: tuple[str, ...] = ("*", "-node-lifecycle-controller", "-taint-eviction-controller")

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")


def cache_dir() -> Path:
    env = os.environ.get("KUBELVS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kubelvs"


def default_bin_dir() -> Path:
    return cache_dir() / "bin"


def default_workdir() -> Path:
    return cache_dir() / "cluster"


def build(binaries: Sequence[str] = (), *, force: bool = False) -> Path:
    """Run build.sh (quick when everything is current); return the bin directory."""
    cmd = ["bash", str(BUILD_SH), *(["--force"] if force else []), *binaries]
    subprocess.run(cmd, check=True)
    return default_bin_dir()


class ControlPlaneError(RuntimeError):
    pass


class ComponentExited(ControlPlaneError):
    """A component exited while starting (e.g. its port was taken)."""


# --------------------------------------------------------------------------------------------
# PKI
# --------------------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    tmp.replace(path)


def _san_entries(sans: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for s in sans:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            out.append(x509.DNSName(s))
    return out


@dataclass
class PKI:
    """File layout of the certificates and keys under ``<workdir>/pki``."""

    dir: Path

    @property
    def ca_crt(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def apiserver_crt(self) -> Path:
        return self.dir / "apiserver.crt"

    @property
    def apiserver_key(self) -> Path:
        return self.dir / "apiserver.key"

    @property
    def admin_crt(self) -> Path:
        return self.dir / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.dir / "admin.key"

    @property
    def kcm_crt(self) -> Path:
        return self.dir / "kube-controller-manager.crt"

    @property
    def kcm_key(self) -> Path:
        return self.dir / "kube-controller-manager.key"

    @property
    def front_proxy_ca_crt(self) -> Path:
        return self.dir / "front-proxy-ca.crt"

    @property
    def front_proxy_client_crt(self) -> Path:
        return self.dir / "front-proxy-client.crt"

    @property
    def front_proxy_client_key(self) -> Path:
        return self.dir / "front-proxy-client.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    @property
    def meta(self) -> Path:
        return self.dir / "meta.json"

    def ensure(self, sans: Sequence[str], *, days: int = 3650) -> None:
        """Create the PKI unless a valid one for the same SANs is already there."""
        want = {"sans": sorted(set(sans)), "version": 2}
        files = [
            self.ca_crt, self.ca_key, self.apiserver_crt, self.apiserver_key, self.admin_crt,
            self.admin_key, self.kcm_crt, self.kcm_key, self.sa_key, self.sa_pub,
            self.front_proxy_ca_crt, self.front_proxy_client_crt, self.front_proxy_client_key,
        ]  # fmt: skip
        if all(f.exists() for f in files) and self.meta.exists():
            try:
                meta = json.loads(self.meta.read_text())
                cert = x509.load_pem_x509_certificate(self.apiserver_crt.read_bytes())
                if {k: meta.get(k) for k in want} == want and cert.not_valid_after_utc > _now() + dt.timedelta(days=2):
                    return
            except (ValueError, OSError):
                pass
        self.generate(sans, days=days)
        _write(self.meta, json.dumps(want).encode())

    def generate(self, sans: Sequence[str], *, days: int = 3650) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        not_before = _now() - dt.timedelta(hours=1)
        not_after = _now() + dt.timedelta(days=days)

        def key_usage(*, ca: bool) -> x509.KeyUsage:
            return x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                encipher_only=False, decipher_only=False,
            )  # fmt: skip

        def make_ca(cn: str):
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(not_before)
                .not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(key_usage(ca=True), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256())
            )
            return key, cert

        def leaf(ca, cn: str, orgs: Sequence[str] = (), *, server: bool = False, san: Sequence[str] = ()):
            ca_key, ca_cert = ca
            key = ec.generate_private_key(ec.SECP256R1())
            attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
            eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            b = (
                x509.CertificateBuilder()
                .subject_name(x509.Name(attrs))
                .issuer_name(ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(not_before)
                .not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(key_usage(ca=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            )
            if san:
                b = b.add_extension(x509.SubjectAlternativeName(_san_entries(san)), critical=False)
            return key, b.sign(ca_key, hashes.SHA256())

        ca = make_ca("kubelvs-test-ca")
        # The aggregation layer's CA (kube-apiserver --requestheader-client-ca-file), as kubeadm does.
        fp_ca = make_ca("kubelvs-front-proxy-ca")
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pairs = [
            (self.ca_key, self.ca_crt, ca),
            (self.apiserver_key, self.apiserver_crt, leaf(ca, "kube-apiserver", server=True, san=sans)),
            (self.admin_key, self.admin_crt, leaf(ca, "kubelvs-admin", ["system:masters"])),
            (self.kcm_key, self.kcm_crt, leaf(ca, "system:kube-controller-manager")),
            (None, self.front_proxy_ca_crt, fp_ca),
            (self.front_proxy_client_key, self.front_proxy_client_crt, leaf(fp_ca, "front-proxy-client")),
        ]
        for key_path, crt_path, (key, cert) in pairs:
            if key_path is not None:
                _write(key_path, _pem_key(key), 0o600)
            _write(crt_path, _pem_cert(cert))
        _write(self.sa_key, _pem_key(sa_key), 0o600)
        _write(
            self.sa_pub,
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )


def kubeconfig_yaml(server: str, ca: Path, crt: Path, key: Path, user: str, cluster: str = "kubelvs") -> str:
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)}}],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user}}],
        "current-context": cluster,
        "preferences": {},
    }
    return yaml.safe_dump(cfg, sort_keys=False)


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGTERM this child when the process that started it dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pid_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


@dataclass
class Ports:
    etcd_client: int = 0
    etcd_peer: int = 0
    apiserver: int = 0
    controller_manager: int = 0

    def fill(self, host: str) -> None:
        taken: set[int] = set()
        for name in ("etcd_client", "etcd_peer", "apiserver", "controller_manager"):
            if not getattr(self, name):
                p = free_port(host)
                while p in taken:
                    p = free_port(host)
                setattr(self, name, p)
            taken.add(getattr(self, name))


@dataclass
class State:
    """What ``up`` leaves in ``<workdir>/state.json`` for ``down`` and ``status``."""

    workdir: str
    host: str
    ports: dict
    pids: dict = field(default_factory=dict)
    binaries: dict = field(default_factory=dict)
    server: str = ""
    kubeconfig: str = ""


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on 127.0.0.1.

    ``workdir`` holds pki/, etcd data, logs/, *.pid, state.json and the kubeconfigs.
    ``bin_dir`` defaults to ``$KUBELVS_CACHE/bin`` (see build.sh).
    Ports are chosen free at start unless given. ``fresh=True`` wipes the etcd data first.
    ``die_with_parent=True`` makes the components exit if the starting process dies (for
    pytest); the CLI's ``up`` uses False so the components outlive it.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        bin_dir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        ports: Ports | None = None,
        extra_sans: Sequence[str] = (),
        service_cluster_ip_range: str = "10.96.0.0/16",
        controllers: Sequence[str] = DEFAULT_CONTROLLERS,
        fresh: bool = True,
        die_with_parent: bool = False,
        apiserver_args: Sequence[str] = (),
        controller_manager_args: Sequence[str] = (),
        verbosity: int = 1,
    ) -> None:
        self.workdir = Path(workdir or default_workdir()).resolve()
        self.bin_dir = Path(bin_dir or default_bin_dir())
        self.host = host
        self.ports = ports or Ports()
        self.sans = tuple(dict.fromkeys([*DEFAULT_SANS, host, *extra_sans]))
        self.service_cluster_ip_range = service_cluster_ip_range
        self.controllers = tuple(controllers)
        self.fresh = fresh
        self.die_with_parent = die_with_parent
        self.apiserver_args = tuple(apiserver_args)
        self.controller_manager_args = tuple(controller_manager_args)
        self.verbosity = verbosity
        self.pki = PKI(self.workdir / "pki")
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}

    # ---- paths -------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (user in system:masters), server https://127.0.0.1:<port>."""
        return self.workdir / "kubeconfig"

    @property
    def kubeconfig_vm(self) -> Path:
        """Same credentials, server https://10.0.2.2:<port> (from a qemu user-networking VM)."""
        return self.workdir / "kubeconfig.vm"

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.ports.apiserver}"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def state_file(self) -> Path:
        return self.workdir / "state.json"

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    @property
    def kubectl(self) -> Path:
        return self.binary("kubectl")

    def log_file(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    # ---- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 180.0) -> ControlPlane:
        missing = [b for b in (*COMPONENTS, "kubectl") if not self.binary(b).is_file()]
        if missing:
            raise ControlPlaneError(
                f"missing binaries in {self.bin_dir}: {', '.join(missing)}; run hack/cluster/build.sh"
            )
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        # Anything left over from an earlier run in this workdir goes first.
        self._stop_from_state()
        self.pki.ensure(self.sans)
        self.timings["pki"] = time.monotonic() - t0
        auto = {n for n, v in asdict(self.ports).items() if not v}
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            self.ports.fill(self.host)
            try:
                self._start_components(deadline, t0)
                break
            except ComponentExited:
                # Most likely a port picked free was taken meanwhile: retry with new free ports.
                if attempt == 2 or not auto:
                    raise
                for n in auto:
                    setattr(self.ports, n, 0)
        self.timings["total"] = time.monotonic() - t0
        return self

    def _start_components(self, deadline: float, t0: float) -> None:
        if self.fresh:
            shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
        self._write_kubeconfigs()
        try:
            self._start("etcd", self._etcd_cmd())
            self._wait_http(
                f"http://{self.host}:{self.ports.etcd_client}/health", "etcd", deadline, ok=b'"health":"true"'
            )
            self.timings["etcd"] = time.monotonic() - t0
            self._start("kube-apiserver", self._apiserver_cmd())
            self._wait_http(f"{self.server}/readyz", "kube-apiserver", deadline, tls=True)
            self.timings["kube-apiserver"] = time.monotonic() - t0
            self._start("kube-controller-manager", self._controller_manager_cmd())
            self._wait_http(
                f"https://{self.host}:{self.ports.controller_manager}/healthz",
                "kube-controller-manager",
                deadline,
                insecure=True,
            )
            # The serviceaccount controller making default/default proves the controllers run.
            self._wait_http(
                f"{self.server}/api/v1/namespaces/default/serviceaccounts/default",
                "kube-controller-manager",
                deadline,
                tls=True,
            )
            self.timings["kube-controller-manager"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the components (controller-manager, apiserver, etcd); leave nothing running."""
        pids = {name: p.pid for name, p in self.procs.items()}
        for name, pid in self._pids_from_files().items():
            pids.setdefault(name, pid)
        for name in reversed(COMPONENTS):
            target = pids.get(name)
            if target is not None:
                self._terminate(name, target, timeout)
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / f"{name}.pid").unlink()
        for p in self.procs.values():
            with contextlib.suppress(Exception):
                p.wait(timeout=1)
        self.procs.clear()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()

    def running(self) -> dict[str, int]:
        """Components with a live process, from the pid files."""
        return {n: pid for n, pid in self._pids_from_files().items() if self._is_ours(n, pid)}

    def ready(self) -> bool:
        try:
            with self._open(f"{self.server}/readyz", tls=True, timeout=3) as r:
                return r.status == 200
        except (OSError, ValueError):
            return False

    @classmethod
    def from_state(cls, workdir: str | os.PathLike[str] | None = None) -> ControlPlane:
        """A handle on a control plane started by ``up`` (for ``down``/``status``)."""
        wd = Path(workdir or default_workdir()).resolve()
        st = json.loads((wd / "state.json").read_text())
        cp = cls(wd, bin_dir=Path(st["binaries"]["etcd"]).parent, host=st["host"], ports=Ports(**st["ports"]))
        return cp

    # ---- commands ----------------------------------------------------------------------------

    def _etcd_cmd(self) -> list[str]:
        h, p = self.host, self.ports
        peer = f"http://{h}:{p.etcd_peer}"
        return [
            str(self.binary("etcd")),
            "--name=kubelvs",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls=http://{h}:{p.etcd_client}",
            f"--advertise-client-urls=http://{h}:{p.etcd_client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=kubelvs={peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def _apiserver_cmd(self) -> list[str]:
        k, p = self.pki, self.ports
        return [
            str(self.binary("kube-apiserver")),
            f"--etcd-servers=http://{self.host}:{p.etcd_client}",
            f"--bind-address={self.host}",
            f"--advertise-address={self.host}",
            f"--secure-port={p.apiserver}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={k.apiserver_crt}",
            f"--tls-private-key-file={k.apiserver_key}",
            f"--client-ca-file={k.ca_crt}",
            f"--requestheader-client-ca-file={k.front_proxy_ca_crt}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={k.front_proxy_client_crt}",
            f"--proxy-client-key-file={k.front_proxy_client_key}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={self.service_cluster_ip_range}",
            "--allow-privileged=true",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={k.sa_pub}",
            f"--service-account-signing-key-file={k.sa_key}",
            # A loopback advertise address cannot be an endpoint of the default/kubernetes Service.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            f"--v={self.verbosity}",
            *self.apiserver_args,
        ]

    def _controller_manager_cmd(self) -> list[str]:
        k, p = self.pki, self.ports
        kc = self.workdir / "kube-controller-manager.kubeconfig"
        return [
            str(self.binary("kube-controller-manager")),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            f"--bind-address={self.host}",
            f"--secure-port={p.controller_manager}",
            f"--cert-dir={self.workdir / 'kcm-certs'}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={k.sa_key}",
            f"--root-ca-file={k.ca_crt}",
            f"--cluster-signing-cert-file={k.ca_crt}",
            f"--cluster-signing-key-file={k.ca_key}",
            f"--service-cluster-ip-range={self.service_cluster_ip_range}",
            f"--controllers={','.join(self.controllers)}",
            "--profiling=false",
            f"--v={self.verbosity}",
            *self.controller_manager_args,
        ]

    # ---- helpers -----------------------------------------------------------------------------

    def _write_kubeconfigs(self) -> None:
        k, port = self.pki, self.ports.apiserver
        _write(
            self.kubeconfig,
            kubeconfig_yaml(self.server, k.ca_crt, k.admin_crt, k.admin_key, "kubelvs-admin").encode(),
            0o600,
        )
        _write(
            self.kubeconfig_vm,
            kubeconfig_yaml(f"https://10.0.2.2:{port}", k.ca_crt, k.admin_crt, k.admin_key, "kubelvs-admin").encode(),
            0o600,
        )
        _write(
            self.workdir / "kube-controller-manager.kubeconfig",
            kubeconfig_yaml(self.server, k.ca_crt, k.kcm_crt, k.kcm_key, "system:kube-controller-manager").encode(),
            0o600,
        )

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.log_file(name), "ab")  # noqa: SIM115 - the child keeps it
        log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=_set_pdeathsig if self.die_with_parent else None,
            )
        finally:
            log.close()
        self.procs[name] = proc
        _write(self.workdir / f"{name}.pid", f"{proc.pid}\n".encode())
        self._save_state()

    def _save_state(self) -> None:
        st = State(
            workdir=str(self.workdir),
            host=self.host,
            ports=asdict(self.ports),
            pids={n: p.pid for n, p in self.procs.items()},
            binaries={n: str(self.binary(n)) for n in (*COMPONENTS, "kubectl")},
            server=self.server,
            kubeconfig=str(self.kubeconfig),
        )
        _write(self.state_file, json.dumps(asdict(st), indent=2).encode())

    def _pids_from_files(self) -> dict[str, int]:
        out = {}
        for name in COMPONENTS:
            f = self.workdir / f"{name}.pid"
            with contextlib.suppress(OSError, ValueError):
                out[name] = int(f.read_text().strip())
        return out

    def _is_ours(self, name: str, pid: int) -> bool:
        """Live, and really our binary (not a recycled pid)."""
        if not _pid_alive(pid):
            return False
        argv = _pid_cmdline(pid)
        return bool(argv) and os.path.basename(argv[0]) == name and str(self.workdir) in " ".join(argv)

    def _terminate(self, name: str, pid: int, timeout: float) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.pid == pid:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            return
        if not self._is_ours(name, pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while time.monotonic() < end and _pid_alive(pid):
            time.sleep(0.1)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            end = time.monotonic() + 10
            while time.monotonic() < end and _pid_alive(pid):
                time.sleep(0.1)

    def _stop_from_state(self) -> None:
        for name, pid in self._pids_from_files().items():
            if self._is_ours(name, pid):
                self._terminate(name, pid, 20.0)
        for name in COMPONENTS:
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / f"{name}.pid").unlink()

    def _ssl_context(self, *, insecure: bool = False) -> ssl.SSLContext:
        if insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        ctx.load_cert_chain(str(self.pki.admin_crt), str(self.pki.admin_key))
        return ctx

    def _open(self, url: str, *, tls: bool = False, insecure: bool = False, timeout: float = 5):
        ctx = self._ssl_context(insecure=insecure) if (tls or insecure) else None
        return urllib.request.urlopen(url, timeout=timeout, context=ctx)

    def _wait_http(
        self,
        url: str,
        component: str,
        deadline: float,
        *,
        tls: bool = False,
        insecure: bool = False,
        ok: bytes | None = None,
    ) -> None:
        last = ""
        while True:
            proc = self.procs.get(component)
            if proc is not None and proc.poll() is not None:
                raise ComponentExited(
                    f"{component} exited with status {proc.returncode}; log tail:\n{self._tail(component)}"
                )
            try:
                with self._open(url, tls=tls, insecure=insecure, timeout=5) as r:
                    body = r.read()
                    if r.status == 200 and (ok is None or ok in body.replace(b" ", b"")):
                        return
                    last = f"HTTP {r.status}: {body[:200]!r}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:300]!r}"
            except (OSError, ValueError) as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"timed out waiting for {url} ({component}): {last}; log tail:\n{self._tail(component)}"
                )
            time.sleep(0.2)

    def _tail(self, component: str, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file(component).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    wd = Path(args.dir or default_workdir()).resolve()
    if (wd / "state.json").exists():
        with contextlib.suppress(Exception):
            cp = ControlPlane.from_state(wd)
            if len(cp.running()) == len(COMPONENTS) and cp.ready():
                print(f"already running: {cp.server}\nexport KUBECONFIG={cp.kubeconfig}")
                return 0
    if args.build:
        build()
    ports = Ports(apiserver=args.port or 0)
    cp = ControlPlane(
        wd,
        bin_dir=args.bin_dir,
        ports=ports,
        extra_sans=args.san or (),
        fresh=not args.keep_data,
        verbosity=args.v,
    )
    t0 = time.monotonic()
    cp.start(timeout=args.timeout)
    took = time.monotonic() - t0
    print(
        f"control plane up in {took:.1f} s (apiserver ready after {cp.timings['kube-apiserver']:.1f} s): "
        f"{cp.server}\n"
        f"  pids: {', '.join(f'{n}={p.pid}' for n, p in cp.procs.items())}\n"
        f"  logs: {cp.log_dir}\n"
        f"  VM kubeconfig (server 10.0.2.2): {cp.kubeconfig_vm}\n"
        f"export KUBECONFIG={cp.kubeconfig}"
    )
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    wd = Path(args.dir or default_workdir()).resolve()
    cp = ControlPlane(wd)
    before = cp.running()
    cp.stop()
    left = cp.running()
    if left:
        print(f"still running: {left}", file=sys.stderr)
        return 1
    print(f"stopped: {', '.join(before) if before else 'nothing was running'}")
    if args.purge:
        shutil.rmtree(wd, ignore_errors=True)
        print(f"removed {wd}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    wd = Path(args.dir or default_workdir()).resolve()
    try:
        cp = ControlPlane.from_state(wd)
    except (OSError, ValueError, KeyError):
        print("not running")
        return 1
    running = cp.running()
    ready = cp.ready()
    print(json.dumps({"server": cp.server, "ready": ready, "running": running, "kubeconfig": str(cp.kubeconfig)}))
    return 0 if ready and len(running) == len(COMPONENTS) else 1


def start_with_crds(crds: Sequence[Path], workdir: Path, *, die_with_parent: bool = True) -> ControlPlane:
    """Build if needed, start in ``workdir``, apply the CRDs in ``crds`` and wait until they are
    established (the kernel suite's and ``make demo``'s control plane: the guest reaches it at
    10.0.2.2 with ``kubeconfig_vm``)."""
    build()
    cp = ControlPlane(workdir, die_with_parent=die_with_parent)
    cp.start()
    try:
        kubectl = [str(cp.kubectl), f"--kubeconfig={cp.kubeconfig}"]
        names = []
        for f in crds:
            subprocess.run([*kubectl, "apply", "--server-side", "--force-conflicts", "-f", str(f)],
                           check=True, capture_output=True, text=True, timeout=120)  # fmt: skip
            docs = [d for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict)]
            names += [d["metadata"]["name"] for d in docs if d.get("kind") == "CustomResourceDefinition"]
        if names:
            subprocess.run([*kubectl, "wait", "--for=condition=Established", "--timeout=60s",
                            *[f"crd/{n}" for n in names]],
                           check=True, capture_output=True, text=True, timeout=90)  # fmt: skip
    except BaseException:
        with contextlib.suppress(Exception):
            cp.stop()
        raise
    return cp


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Local Kubernetes control plane for kubelvs tests")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start in the background; returns when /readyz is ok")
    up.add_argument("--dir", help="work directory (default: $KUBELVS_CACHE/cluster)")
    up.add_argument("--bin-dir", help="binaries (default: $KUBELVS_CACHE/bin)")
    up.add_argument("--port", type=int, default=int(os.environ.get("KUBELVS_APISERVER_PORT", "0")),
                    help="kube-apiserver port (default: a free one; env KUBELVS_APISERVER_PORT)")  # fmt: skip
    up.add_argument("--san", action="append", help="extra SAN for the serving certificate (repeatable)")
    up.add_argument("--keep-data", action="store_true", help="keep the etcd data of an earlier run")
    up.add_argument("--build", action="store_true", help="run build.sh first")
    up.add_argument("--timeout", type=float, default=180.0)
    up.add_argument("-v", type=int, default=1, help="log verbosity of the Kubernetes components")
    down = sub.add_parser("down", help="stop everything started by up")
    down.add_argument("--dir")
    down.add_argument("--purge", action="store_true", help="also remove the work directory")
    st = sub.add_parser("status", help="print state; exit 0 when running and ready")
    st.add_argument("--dir")
    args = ap.parse_args(argv)
    try:
        return {"up": _cmd_up, "down": _cmd_down, "status": _cmd_status}[args.cmd](args)
    except ControlPlaneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
