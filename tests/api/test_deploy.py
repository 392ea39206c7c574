"""The install manifests (deploy/) against the real API server: accepted, least privilege, and a
migration in place to Helm (the chart adopts the running objects; nothing is deleted)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from helm_tools import CHART, Helm, ensure_tools

REPO = Path(__file__).resolve().parents[2]
SA = "system:serviceaccount:kubelvs-system:kubelvs-director"
NAMESPACE = "kubelvs-system"
# realserver.yaml: the real-server agent, when its template is in the chart.
DEPLOY_FILES = [
    REPO / "deploy" / name
    for name in ("namespace.yaml", "rbac.yaml", "director.yaml", "realserver.yaml")
    if (REPO / "deploy" / name).exists()
]


@pytest.fixture(scope="module")
def installed(kubectl) -> None:  # type: ignore[no-untyped-def]
    """deploy/ applied as the README says."""
    kubectl("apply", "--server-side", *(f"-f={path}" for path in DEPLOY_FILES))


@pytest.fixture(scope="module")
def helm(control_plane, kubeconfig: str, tmp_path_factory) -> Helm:  # type: ignore[no-untyped-def]
    tools = ensure_tools(Path(control_plane.kubectl).parent)
    return Helm(tools["helm"], kubeconfig, tmp_path_factory.mktemp("helm-home"))


def can(kubectl, verb: str, resource: str) -> bool:  # type: ignore[no-untyped-def]
    resource, _, subresource = resource.partition("/")
    extra = ["--subresource", subresource] if subresource else []
    result = kubectl("auth", "can-i", verb, resource, *extra, "--as", SA, "--all-namespaces", check=False)
    return result.stdout.strip() == "yes"


def test_daemonset_is_accepted_with_only_net_capabilities(installed, kubectl) -> None:  # type: ignore[no-untyped-def]
    ds = kubectl.json("get", "daemonset", "kubelvs-director", "-n", "kubelvs-system")
    container = ds["spec"]["template"]["spec"]["containers"][0]
    security = container["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("verb", ["get", "list", "watch", "create", "update", "delete"])
def test_director_may_run_the_election_in_its_namespace(installed, kubectl, verb: str) -> None:  # type: ignore[no-untyped-def]
    lease = "leases.coordination.k8s.io"
    result = kubectl("auth", "can-i", verb, lease, "--as", SA, "-n", "kubelvs-system", check=False)
    assert result.stdout.strip() == "yes"


@pytest.mark.parametrize("verb", ["patch", "update"])
def test_director_leases_only_in_its_namespace(installed, kubectl, verb: str) -> None:  # type: ignore[no-untyped-def]
    result = kubectl("auth", "can-i", verb, "leases.coordination.k8s.io", "--as", SA, "-n", "kube-system", check=False)
    assert result.stdout.strip() == "no"


@pytest.mark.parametrize(
    ("verb", "resource"),
    [
        ("watch", "virtualservers.kubelvs.io"),
        ("patch", "virtualservers.kubelvs.io/status"),
        ("list", "endpointslices.discovery.k8s.io"),
        ("watch", "services"),
        ("list", "nodes"),
        ("create", "events"),
    ],
)
def test_director_may_do_what_it_needs(installed, kubectl, verb: str, resource: str) -> None:  # type: ignore[no-untyped-def]
    assert can(kubectl, verb, resource)


@pytest.mark.parametrize(
    ("verb", "resource"),
    [
        ("patch", "virtualservers.kubelvs.io"),  # the spec is the user's
        ("delete", "virtualservers.kubelvs.io"),
        ("get", "secrets"),
        ("list", "pods"),
        ("update", "nodes"),
        ("create", "services"),
    ],
)
def test_director_may_do_nothing_else(installed, kubectl, verb: str, resource: str) -> None:  # type: ignore[no-untyped-def]
    assert not can(kubectl, verb, resource)


def deploy_objects() -> list[tuple[str, str, str]]:
    """(kind, namespace or "", name) of every object in deploy/."""
    docs = [d for path in DEPLOY_FILES for d in yaml.safe_load_all(path.read_text()) if d]
    return [(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in docs]


def uids(kubectl) -> dict[tuple[str, str, str], str]:  # type: ignore[no-untyped-def]
    found = {}
    for kind, namespace, name in deploy_objects():
        where = ["-n", namespace] if namespace else []
        found[(kind, namespace, name)] = kubectl.json("get", kind, name, *where)["metadata"]["uid"]
    return found


def left_behind(kubectl, objects: list[tuple[str, str, str]]) -> list[str]:  # type: ignore[no-untyped-def]
    """Which of ``objects`` still exist, polled until none does or a deadline passes."""
    deadline = time.monotonic() + 120
    left: list[str] = []
    while time.monotonic() < deadline:
        left = [
            f"{kind}/{name}"
            for kind, namespace, name in objects
            if kubectl("get", kind, name, *(["-n", namespace] if namespace else []), check=False).returncode == 0
        ]
        if not left:
            break
        time.sleep(0.5)
    return left


def uninstall_and_wait(helm: Helm, kubectl) -> None:  # type: ignore[no-untyped-def]
    """helm uninstall leaves the CRD and the namespace (kept: Helm's release record is in it), nothing
    else; then the namespace is deleted as the README says."""
    helm("uninstall", "kubelvs", "-n", NAMESPACE, "--wait", "--timeout", "120s")
    release = [o for o in deploy_objects() if o[0] != "Namespace"]
    assert not left_behind(kubectl, release), "left behind by helm uninstall"
    assert kubectl("get", "crd", "virtualservers.kubelvs.io", check=False).returncode == 0
    assert kubectl("get", "namespace", NAMESPACE, check=False).returncode == 0
    kubectl("delete", "namespace", NAMESPACE, "--wait=false")
    assert not left_behind(kubectl, [("Namespace", "", NAMESPACE)])


def test_helm_adopts_a_kubectl_install_in_place_upgrades_and_uninstalls(installed, kubectl, helm) -> None:  # type: ignore[no-untyped-def]
    before = uids(kubectl)
    helm("install", "kubelvs", str(CHART), "-n", NAMESPACE)
    assert uids(kubectl) == before  # adopted, not recreated
    generation = kubectl.json("get", "daemonset", "kubelvs-director", "-n", NAMESPACE)["metadata"]["generation"]
    helm("upgrade", "kubelvs", str(CHART), "-n", NAMESPACE, "--set", "director.logLevel=DEBUG")
    ds = kubectl.json("get", "daemonset", "kubelvs-director", "-n", NAMESPACE)
    assert ds["metadata"]["generation"] == generation + 1
    assert "--log-level=DEBUG" in ds["spec"]["template"]["spec"]["containers"][0]["args"]
    assert uids(kubectl) == before
    uninstall_and_wait(helm, kubectl)


def test_helm_takes_over_manifests_without_its_metadata_only_when_told(kubectl, helm) -> None:  # type: ignore[no-untyped-def]
    """Manifests applied before deploy/ carried Helm's metadata: refused, then adopted with --take-ownership."""
    docs = [d for path in DEPLOY_FILES for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        doc["metadata"].pop("annotations", None)
        doc["metadata"]["labels"].pop("app.kubernetes.io/managed-by", None)
    kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))
    before = uids(kubectl)
    refused = helm("install", "kubelvs", str(CHART), "-n", NAMESPACE, check=False)
    assert refused.returncode != 0 and "invalid ownership metadata" in refused.stderr, refused.stderr
    helm("install", "kubelvs", str(CHART), "-n", NAMESPACE, "--take-ownership")
    assert uids(kubectl) == before
    uninstall_and_wait(helm, kubectl)
