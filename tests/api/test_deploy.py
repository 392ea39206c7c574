"""The install manifests (deploy/) against the real API server: accepted, and least privilege."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SA = "system:serviceaccount:kubelvs-system:kubelvs-director"


@pytest.fixture(scope="module")
def installed(kubectl) -> None:  # type: ignore[no-untyped-def]
    kubectl("apply", "-f", str(REPO / "deploy" / "namespace.yaml"))
    kubectl(
        "apply", "--server-side", "-f", str(REPO / "deploy" / "rbac.yaml"), "-f", str(REPO / "deploy" / "director.yaml")
    )


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
