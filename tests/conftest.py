"""Fixtures for tests against a real local Kubernetes control plane (tests/api, and the host side
of the kernel suite, whose director end-to-end tests reach it from the VM).

The control plane (etcd + kube-apiserver + kube-controller-manager, Kubernetes 1.34) is built
from Go modules by hack/cluster/build.sh and run by hack/cluster/controlplane.py.

Fixtures:
  control_plane  (session)  the running ControlPlane; every CRD in crds/ installed and Established;
                            KUBECONFIG set to its admin kubeconfig for the whole session
  kubeconfig     (session)  path (str) of the admin kubeconfig (user in system:masters)
  kubectl        (session)  Kubectl helper: kubectl("get", "ns") -> CompletedProcess (text),
                            kubectl.json("get", "ns") -> parsed JSON, kubectl.path -> the binary
  api_client     (session)  kubernetes.client.ApiClient configured from that kubeconfig
  namespace      (function) name of a fresh namespace (its default ServiceAccount exists);
                            deleted after the test

Environment:
  KUBELVS_CACHE             where binaries (bin/) and Go caches live (default ~/.cache/kubelvs)
  KUBELVS_API_WORKDIR       work directory of the session's control plane (default: a temp dir)
  KUBELVS_API_KEEP=1        keep the work directory (logs) after the session
  KUBELVS_CRDS_DIR          CRD manifests to install (default: the repo's crds/)
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRDS_DIR = Path(os.environ.get("KUBELVS_CRDS_DIR") or REPO / "crds")
_CP_PATH = REPO / "hack" / "cluster" / "controlplane.py"


def _load_controlplane():
    name = "kubelvs_controlplane"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _CP_PATH)
    assert spec is not None and spec.loader is not None, _CP_PATH
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


controlplane = _load_controlplane()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent / "api"
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.api)


class Kubectl:
    """Runs the built kubectl against the session's kubeconfig."""

    def __init__(self, path: Path, kubeconfig: Path) -> None:
        self.path = Path(path)
        self.kubeconfig = Path(kubeconfig)

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        cmd = [str(self.path), f"--kubeconfig={self.kubeconfig}", *map(str, args)]
        res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(map(str, args))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
        return res

    def json(self, *args: str, **kw):
        return json.loads(self(*args, "-o", "json", **kw).stdout)

    def apply(self, manifest: str | dict | list, namespace: str | None = None) -> subprocess.CompletedProcess:
        if isinstance(manifest, str):
            text = manifest
        else:
            text = yaml.safe_dump_all(manifest if isinstance(manifest, list) else [manifest])
        ns = ["-n", namespace] if namespace else []
        return self("apply", *ns, "-f", "-", input=text)


def _crd_files() -> list[Path]:
    if not CRDS_DIR.is_dir():
        return []
    return sorted(p for p in CRDS_DIR.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _install_crds(kubectl: Kubectl, timeout: float = 60) -> list[str]:
    names: list[str] = []
    for f in _crd_files():
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d]
        crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
        if not crds:
            continue
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(f))
        names += [d["metadata"]["name"] for d in crds]
    if names:
        kubectl(
            "wait", "--for=condition=Established", f"--timeout={int(timeout)}s",
            *[f"crd/{n}" for n in names], timeout=timeout + 10,
        )  # fmt: skip
    return names


def shared_control_plane(config: pytest.Config):
    """The session's control plane, started on first use and stopped when pytest ends.

    Used by the API tests (the ``control_plane`` fixture). The kernel suite starts its own
    (``tests/kernel/conftest.py``): the directors there watch the whole cluster, and
    VirtualServers the API tests leave behind while their namespaces are being deleted could
    claim the same VIPs.
    """
    cp = getattr(config, "_kubelvs_control_plane", None)
    if cp is not None:
        return cp
    controlplane.build()  # builds only what is missing or stale (seconds when everything is built)
    wd_env = os.environ.get("KUBELVS_API_WORKDIR")
    workdir = Path(wd_env) if wd_env else Path(tempfile.mkdtemp(prefix="kubelvs-api-"))
    cp = controlplane.ControlPlane(workdir, die_with_parent=True)
    cp.start()
    old_kc = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(cp.kubeconfig)

    def stop() -> None:
        if old_kc is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old_kc
        cp.stop()
        if not wd_env and os.environ.get("KUBELVS_API_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)

    config.add_cleanup(stop)
    try:
        cp.crds = _install_crds(Kubectl(cp.kubectl, cp.kubeconfig))
    except BaseException:
        stop()
        raise
    config._kubelvs_control_plane = cp  # type: ignore[attr-defined]
    return cp


@pytest.fixture(scope="session")
def control_plane(pytestconfig: pytest.Config):
    return shared_control_plane(pytestconfig)


@pytest.fixture(scope="session")
def kubeconfig(control_plane) -> str:
    return str(control_plane.kubeconfig)


@pytest.fixture(scope="session")
def kubectl(control_plane) -> Kubectl:
    return Kubectl(control_plane.kubectl, control_plane.kubeconfig)


@pytest.fixture(scope="session")
def api_client(control_plane):
    from kubernetes import config

    client = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    yield client
    with contextlib.suppress(Exception):
        client.close()


def _ns_name(nodeid: str) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", nodeid.split("::")[-1].lower()).strip("-")[:40].strip("-")
    return f"t-{base}-{uuid.uuid4().hex[:6]}" if base else f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def namespace(request, api_client) -> Iterator[str]:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(api_client)
    name = _ns_name(request.node.nodeid)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"kubelvs-test": "1"})))
    # The ServiceAccount admission plugin refuses pods until the controller made "default".
    deadline = time.monotonic() + 30
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except ApiException as e:
            if e.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield name
    with contextlib.suppress(ApiException):
        core.delete_namespace(name)
