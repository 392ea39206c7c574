"""Kernel tests: normal pytest tests that need root and real IPVS.

On the host (no IPVS there) every collected tests/kernel item is replaced by a proxy item with
the same node id and markers.  The first proxy that runs boots ONE VM (hack/vm.py) that runs
pytest on all the selected kernel tests inside; each proxy then reports its test's outcome from
that run (pass / fail with the failure text / skip / xfail).  Results, junit xml and the console
log land in the checkout's VM output directory, run-*/ (shared read-write with the guest): outside
the checkout, which may be under /tmp, where the guest cannot write; ``python hack/vm.py --vmout``
prints it, and <repo>/.vmout links to it.

Inside the VM (KUBELVS_IN_VM=1, set by hack/vm.py) the tests run for real and this conftest
provides the network-namespace fixtures (``topology``, ``make_topology``).

Host knobs: ``--vm-timeout S`` (or KUBELVS_VM_TIMEOUT, default 2400), ``--vm-quiet`` (or
KUBELVS_VM_QUIET=1: do not stream the guest's pytest output), KUBELVS_VM_PYTEST_ARGS (extra
arguments for the inner pytest), KUBELVS_SKIP_KERNEL=1 (skip kernel tests instead of booting),
KUBELVS_KERNEL_NATIVE=1 (run them directly: a host that has IPVS itself, as root).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_VM_TIMEOUT = 2400.0  # test_ha.py alone takes ~8 min in the emulated VM

IN_VM = os.environ.get("KUBELVS_IN_VM") == "1"
NATIVE = os.environ.get("KUBELVS_KERNEL_NATIVE") == "1"
RUN_HERE = IN_VM or NATIVE

sys.path.insert(0, str(HERE))  # `from topology import Topology` in test modules


def pytest_addoption(parser: pytest.Parser) -> None:
    # Only seen when tests/kernel is on the command line (pytest reads options before it
    # discovers this conftest otherwise); the KUBELVS_VM_* variables always work.
    group = parser.getgroup("kubelvs-vm", "kubelvs kernel tests in a VM")
    group.addoption(
        "--vm-timeout",
        type=float,
        default=None,
        help=f"seconds for the one VM run of the kernel tests (default {DEFAULT_VM_TIMEOUT:.0f})",
    )
    group.addoption("--vm-quiet", action="store_true", default=False, help="do not stream the VM's pytest output")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kernel: runs inside the IPVS VM (tests/kernel)")
    config.addinivalue_line("markers", "vm_network: the VM gets qemu user networking (host loopback at 10.0.2.2)")
    config.addinivalue_line(
        "markers",
        "vm_control_plane: the host starts the local control plane (CRDs installed) and passes its "
        "kubeconfig into the VM as KUBELVS_E2E_KUBECONFIG (implies vm_network)",
    )
    config.addinivalue_line(
        "markers",
        "topology(real_servers=2, directors=2, ports=(80,), udp_ports=None): arguments for the `topology` fixture",
    )
    if IN_VM and os.environ.get("KUBELVS_VM_RESULTS"):
        config.pluginmanager.register(_ResultWriter(os.environ["KUBELVS_VM_RESULTS"]), "kubelvs-vm-results")


def _is_kernel_item(item: pytest.Item) -> bool:
    try:
        return Path(str(item.path)).resolve().is_relative_to(HERE)
    except (AttributeError, OSError):
        return False


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    for i, item in enumerate(items):
        if not _is_kernel_item(item) or isinstance(item, VMProxyItem):
            continue
        item.add_marker(pytest.mark.kernel)
        if not RUN_HERE:
            items[i] = VMProxyItem.from_original(item)


# =========================================================================== inside the VM


class _ResultWriter:
    """Inside the VM: one JSON line per test phase, flushed at once (survives a VM crash)."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        rec: dict[str, Any] = {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "duration": report.duration,
            "wasxfail": getattr(report, "wasxfail", None),
            "longrepr": "",
        }
        if report.skipped and isinstance(report.longrepr, tuple):
            rec["longrepr"] = str(report.longrepr[2])
        elif report.longrepr is not None:
            rec["longrepr"] = report.longreprtext
        for name, content in report.sections:
            if report.failed and content.strip():
                rec["longrepr"] += f"\n----- {name} -----\n{content}"
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def pytest_unconfigure(self) -> None:
        self.f.close()


@pytest.fixture(scope="session", autouse=True)
def _kernel_ready() -> None:
    if not RUN_HERE:
        return
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root")
    if not os.path.exists("/proc/net/ip_vs"):
        pytest.fail("/proc/net/ip_vs missing: IPVS is not available in this kernel (modprobe ip_vs failed?)")


def _load_topology_module() -> Any:
    import topology  # tests/kernel is on sys.path

    return topology


@pytest.fixture
def make_topology() -> Iterator[Callable[..., Any]]:
    """Factory: ``make_topology(real_servers=2, directors=2, ports=(80,), udp_ports=None)``
    returns a started tests/kernel/topology.Topology; all are closed at teardown."""
    mod = _load_topology_module()
    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        topo = mod.Topology(**kwargs)
        made.append(topo)
        return topo

    yield make
    for topo in reversed(made):
        topo.close()


@pytest.fixture
def topology(request: pytest.FixtureRequest, make_topology: Callable[..., Any]) -> Any:
    """A Topology: client, dir1, dir2, rs1, rs2, HTTP + UDP name servers on port 80 in each real
    server.  ``@pytest.mark.topology(real_servers=3, ports=(80, 8080))`` changes that."""
    marker = request.node.get_closest_marker("topology")
    kwargs = dict(marker.kwargs) if marker else {}
    return make_topology(**kwargs)


# =========================================================================== on the host


class VMTestFailure(Exception):
    """A kernel test failed (or errored) inside the VM; the text is its report from there."""


class VMProxyItem(pytest.Item):
    """Stands in on the host for one kernel test; its outcome comes from the session's VM run."""

    original: pytest.Item

    @classmethod
    def from_original(cls, item: pytest.Item) -> VMProxyItem:
        assert item.parent is not None
        proxy = cls.from_parent(item.parent, name=item.name)
        proxy.original = item
        proxy.own_markers = list(item.own_markers)
        proxy.keywords.update(item.keywords)
        proxy.extra_keyword_matches.update(item.extra_keyword_matches)
        return proxy

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.original.reportinfo()

    @property
    def location(self) -> tuple[str, int | None, str]:  # type: ignore[override]
        return self.original.location

    def _run(self) -> _VMRun:
        run = _VMRun.for_session(self.session)
        run.ensure_ran(self.config)
        return run

    def setup(self) -> None:
        self._run().report(self.nodeid, "setup")

    def runtest(self) -> None:
        run = self._run()
        if run.cp_error and self.get_closest_marker("vm_control_plane"):
            raise VMTestFailure(run.cp_error)
        run.report(self.nodeid, "call")

    def teardown(self) -> None:
        self._run().report(self.nodeid, "teardown")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, VMTestFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def _repr_failure_py(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        # Used for errors in setup and teardown.
        if isinstance(excinfo.value, VMTestFailure):
            return str(excinfo.value)
        return super()._repr_failure_py(excinfo, style)


def _option(config: pytest.Config, name: str, env: str, default: Any) -> Any:
    try:
        value = config.getoption(name)
    except (ValueError, AttributeError):
        value = None
    if value in (None, False) and os.environ.get(env):
        value = os.environ[env]
    return default if value in (None, False) else value


class _VMRun:
    """The one VM run of a pytest session."""

    KEY = pytest.StashKey["_VMRun"]()

    @classmethod
    def for_session(cls, session: pytest.Session) -> _VMRun:
        run = session.stash.get(cls.KEY, None)
        if run is None:
            run = session.stash[cls.KEY] = cls(session)
        return run

    def __init__(self, session: pytest.Session) -> None:
        self.session = session
        self.ran = False
        self.rc: int | None = None
        self.elapsed = 0.0
        self.outdir = Path()
        self.log = Path("console.log")
        self.results: dict[str, dict[str, Any]] = {}
        self.problem = ""
        self.cp_error = ""

    # ------------------------------------------------------------------ running
    def ensure_ran(self, config: pytest.Config) -> None:
        if self.ran:
            return
        self.ran = True
        if os.environ.get("KUBELVS_SKIP_KERNEL") == "1":
            self.problem = "skip"
            return
        proxies = [it for it in self.session.items if isinstance(it, VMProxyItem)]
        nodeids = [it.nodeid for it in proxies]
        wants_cp = os.environ.get("KUBELVS_VM_CONTROL_PLANE") == "1" or any(
            it.get_closest_marker("vm_control_plane") for it in proxies
        )
        network_user = (
            wants_cp
            or os.environ.get("KUBELVS_VM_NETWORK") == "user"
            or any(it.get_closest_marker("vm_network") for it in proxies)
        )
        timeout = float(_option(config, "vm_timeout", "KUBELVS_VM_TIMEOUT", DEFAULT_VM_TIMEOUT))
        quiet = bool(config.getoption("vm_quiet", default=False)) or os.environ.get("KUBELVS_VM_QUIET") == "1"
        vm = _load_vm_module()
        try:
            vmout = vm.ensure_vmout(REPO)
            self.outdir = _new_outdir(vmout)
        except (vm.VMError, OSError) as exc:
            self.problem = f"no VM output directory: {exc}"
            return
        self.log = self.outdir / "console.log"
        results = self.outdir / "kernel-results.jsonl"
        junit = self.outdir / "kernel-junit.xml"
        inner = [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            "-v",
            "-rfEsxX",
            *shlex.split(os.environ.get("KUBELVS_VM_PYTEST_ARGS", "")),
            *nodeids,
        ]
        tr = config.pluginmanager.get_plugin("terminalreporter")
        capman = config.pluginmanager.get_plugin("capturemanager")

        def say(line: str) -> None:
            if tr is not None:
                tr.write_line(line.rstrip("\n"))
            elif sys.__stdout__ is not None:
                sys.__stdout__.write(line)

        echo: Callable[[str], None] | None = None if quiet else (lambda line: say("[vm] " + line))
        guest_env = {"KUBELVS_VM_RESULTS": str(results)}
        with contextlib.ExitStack() as stack:
            if capman is not None:
                stack.enter_context(capman.global_and_fixture_disabled())
            if wants_cp and not os.environ.get("KUBELVS_E2E_KUBECONFIG"):
                say("\nkubelvs: starting the local control plane for the VM (hack/cluster/controlplane.py)")
                try:
                    cp = _start_control_plane()
                    stack.callback(_stop_control_plane, cp)
                    guest_env["KUBELVS_E2E_KUBECONFIG"] = str(cp.kubeconfig_vm)
                except Exception as exc:
                    self.cp_error = f"the local control plane did not start: {type(exc).__name__}: {exc}"
                    say(f"kubelvs: {self.cp_error}")
            started = time.monotonic()
            say(
                f"\nkubelvs: booting the IPVS VM for {len(nodeids)} kernel test(s); "
                f"log: {_rel(self.log)} (timeout {timeout:.0f} s" + (", network user" if network_user else "") + ")\n"
            )
            self.rc = vm.run_in_vm(
                inner,
                [str(vmout)],
                timeout,
                network_user,
                log_path=self.log,
                on_stdout=echo or (lambda line: None),
                on_stderr=lambda line: None,
                env=guest_env,
                verbose=True,
            )
            self.elapsed = time.monotonic() - started
            say(f"kubelvs: VM run finished with exit status {self.rc} in {self.elapsed:.0f} s\n")
        self.results = _read_results(results)
        if not self.results:
            self.results = _read_junit(junit, nodeids)
        if not self.results:
            self.problem = self._describe_failure(vm, timeout)

    def _describe_failure(self, vm: Any, timeout: float) -> str:
        if self.rc == vm.TIMEOUT_STATUS:
            what = f"the VM run exceeded --vm-timeout={timeout:.0f} s and was killed"
        elif self.rc == vm.NOT_STARTED_STATUS:
            what = "the VM could not be started (vng or the Debian kernel missing?)"
        else:
            what = f"the VM run (exit status {self.rc}) produced no test results"
        return f"{what}\nconsole log: {self.log}\n----- last lines -----\n{_tail(self.log)}"

    # ------------------------------------------------------------------ reporting
    def report(self, nodeid: str, when: str) -> None:
        """Re-raise, in the proxy's ``when`` phase, what that phase did inside the VM."""
        if self.problem == "skip":
            if when == "setup":
                _skip("KUBELVS_SKIP_KERNEL=1")
            return
        phases = self.results.get(nodeid)
        if self.problem or phases is None:
            if when != "call":
                return
            if self.problem:
                raise VMTestFailure(f"kernel test not run: {self.problem}")
            raise VMTestFailure(
                f"no result from the VM for this test (VM exit status {self.rc}: crashed, timed out "
                f"or the test was not collected there)\nconsole log: {self.log}\n"
                f"----- last lines -----\n{_tail(self.log)}"
            )
        rec = phases.get(when)
        if rec is None:
            if when == "call" and phases.get("setup", {}).get("outcome") == "passed":
                raise VMTestFailure(f"the VM reported no call phase for this test; console log: {self.log}")
            return
        if rec["outcome"] == "failed":
            head = "FAILED" if when == "call" else f"ERROR in {when}"
            raise VMTestFailure(
                f"{head} (inside the VM):\n{rec.get('longrepr', '')}"
                f"\n\n[kernel test ran in the VM; console log: {self.log}]"
            )
        if rec["outcome"] == "skipped":
            if rec.get("wasxfail") is not None:
                pytest.xfail(rec["wasxfail"] or rec.get("longrepr", ""))
            _skip(rec.get("longrepr") or "skipped in the VM")


def _skip(reason: str) -> None:
    """Skip, reported at the test's own location rather than this conftest's."""
    prefix = "Skipped: "
    reason = reason[len(prefix) :] if reason.startswith(prefix) else reason
    try:
        exc = pytest.skip.Exception(reason, _use_item_location=True)  # type: ignore[call-arg]
    except TypeError:
        exc = pytest.skip.Exception(reason)
    raise exc


def _start_control_plane() -> Any:
    """etcd + kube-apiserver + kube-controller-manager on the host's loopback, CRDs installed.
    The guest reaches it at 10.0.2.2 (qemu user networking) with ``cp.kubeconfig_vm``; the work
    directory is in the host's /tmp, which the guest sees read-only. Its own, not the API tests'
    (``shared_control_plane``): the directors in the VM watch the whole cluster, and the API
    tests' VirtualServers, still there while their namespaces are deleted, could claim its VIPs."""
    name = "kubelvs_controlplane"  # the module name tests/api/conftest.py uses too
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, REPO / "hack" / "cluster" / "controlplane.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    crds = sorted(p for p in (REPO / "crds").glob("*.y*ml") if p.is_file())
    return mod.start_with_crds(crds, Path(tempfile.mkdtemp(prefix="kubelvs-vm-cp-")))


def _stop_control_plane(cp: Any) -> None:
    with contextlib.suppress(Exception):
        cp.stop()
    if os.environ.get("KUBELVS_API_KEEP") != "1":
        shutil.rmtree(cp.workdir, ignore_errors=True)


def _load_vm_module() -> Any:
    spec = importlib.util.spec_from_file_location("kubelvs_hack_vm", REPO / "hack" / "vm.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("kubelvs_hack_vm", mod)
    spec.loader.exec_module(mod)
    return mod


def _new_outdir(vmout: Path, keep: int = 8, min_age: float = 3 * 3600) -> Path:
    """A fresh <vmout>/run-<time>-<pid>/ (and <vmout>/last -> it).  Old runs beyond the newest
    ``keep`` go, but only once older than ``min_age``: another session may still be writing."""
    vmout.mkdir(parents=True, exist_ok=True)
    runs = sorted(p for p in vmout.glob("run-*") if p.is_dir())
    now = time.time()
    for old in runs[: max(0, len(runs) - (keep - 1))]:
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > min_age:
                shutil.rmtree(old, ignore_errors=True)
    out = vmout / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    out.mkdir()
    last = vmout / "last"
    try:
        if last.is_symlink() or last.exists():
            last.unlink()
        last.symlink_to(out.name)
    except OSError:
        pass
    return out


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text[-lines:]) or "(empty)"


def _read_results(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        out.setdefault(rec["nodeid"], {})[rec["when"]] = rec
    return out


def _junit_address(nodeid: str) -> tuple[str, str]:
    """(classname, name) as pytest's junitxml writes them for ``nodeid``."""
    names = nodeid.split("::")
    names[0] = names[0].replace("/", ".")
    if names[0].endswith(".py"):
        names[0] = names[0][:-3]
    return ".".join(names[:-1]), names[-1]


def _read_junit(path: Path, nodeids: list[str]) -> dict[str, dict[str, Any]]:
    """Fallback when the JSON lines are missing: outcomes from the junit xml."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    cases = {(tc.get("classname", ""), tc.get("name", "")): tc for tc in root.iter("testcase")}
    out: dict[str, dict[str, Any]] = {}
    for nodeid in nodeids:
        tc = cases.get(_junit_address(nodeid))
        if tc is None:
            continue
        rec: dict[str, Any] = {"nodeid": nodeid, "when": "call", "outcome": "passed", "wasxfail": None, "longrepr": ""}
        for child in tc:
            text = (child.get("message", "") + "\n" + (child.text or "")).strip()
            if child.tag in ("failure", "error"):
                rec.update(outcome="failed", longrepr=text)
                if child.tag == "error":
                    rec["when"] = "setup"
            elif child.tag == "skipped":
                rec.update(outcome="skipped", longrepr=child.get("message", ""))
                if child.get("type") == "pytest.xfail":
                    rec["wasxfail"] = child.get("message", "")
        out[nodeid] = {rec["when"]: rec, "call": rec} if rec["when"] != "call" else {"call": rec}
    return out
