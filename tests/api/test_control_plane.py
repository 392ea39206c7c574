"""The local control plane is a real Kubernetes 1.34 one: real apiserver, RBAC, controllers."""

from __future__ import annotations

import socket
import ssl
import time
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

POD_IP = "10.244.7.9"  # only data in the pod's status: nothing is ever sent to it


def _wait(pred, timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def test_server_version_is_1_34(api_client, kubectl):
    info = client.VersionApi(api_client).get_code()
    assert info.git_version.startswith("v1.34."), info.git_version
    assert (info.major, info.minor) == ("1", "34")
    v = kubectl.json("version")
    assert v["serverVersion"]["gitVersion"] == info.git_version
    assert v["clientVersion"]["gitVersion"].startswith("v1.34.")


def test_kubectl_get_ns(kubectl, namespace):
    out = kubectl("get", "ns").stdout
    for ns in ("default", "kube-system", "kube-public", namespace):
        assert ns in out.split(), out
    names = {i["metadata"]["name"] for i in kubectl.json("get", "ns")["items"]}
    assert namespace in names


def test_serving_cert_verifies_for_vm_address(control_plane):
    """10.0.2.2 (host loopback seen from a qemu user-net VM) is in the serving cert's SANs.

    The TLS handshake goes to 127.0.0.1 but is verified as if the server were 10.0.2.2.
    """
    ctx = ssl.create_default_context(cafile=str(control_plane.pki.ca_crt))
    for name in ("10.0.2.2", "127.0.0.1", "localhost"):
        with (
            socket.create_connection(("127.0.0.1", control_plane.ports.apiserver), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=name) as tls,
        ):
            assert tls.getpeercert()
    with (
        socket.create_connection(("127.0.0.1", control_plane.ports.apiserver), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ctx.wrap_socket(raw, server_hostname="10.9.9.9")


def test_service_gets_endpointslice_from_controller_manager(api_client, namespace):
    core = client.CoreV1Api(api_client)
    disc = client.DiscoveryV1Api(api_client)
    node_name = f"node-{uuid.uuid4().hex[:8]}"
    core.create_node(
        client.V1Node(
            metadata=client.V1ObjectMeta(name=node_name, labels={"kubernetes.io/hostname": node_name}),
        )
    )
    try:
        core.create_namespaced_service(
            namespace,
            client.V1Service(
                metadata=client.V1ObjectMeta(name="web"),
                spec=client.V1ServiceSpec(
                    selector={"app": "web"},
                    ports=[client.V1ServicePort(name="http", port=80, target_port=8080, protocol="TCP")],
                ),
            ),
        )
        core.create_namespaced_pod(
            namespace,
            client.V1Pod(
                metadata=client.V1ObjectMeta(name="web-0", labels={"app": "web"}),
                spec=client.V1PodSpec(
                    node_name=node_name,
                    containers=[
                        client.V1Container(
                            name="web",
                            image="registry.invalid/never-pulled:1",
                            ports=[client.V1ContainerPort(container_port=8080, name="http")],
                        )
                    ],
                ),
            ),
        )
        # Play the kubelet: the pod is Running and Ready with an IP.
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        conds = [
            {"type": t, "status": "True", "lastTransitionTime": now}
            for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
        ]
        core.patch_namespaced_pod_status(
            "web-0",
            namespace,
            {
                "status": {
                    "phase": "Running",
                    "conditions": conds,
                    "hostIP": "192.0.2.10",
                    "podIP": POD_IP,
                    "podIPs": [{"ip": POD_IP}],
                    "startTime": now,
                }
            },
        )

        def slice_with_ip():
            slices = disc.list_namespaced_endpoint_slice(
                namespace, label_selector="kubernetes.io/service-name=web"
            ).items
            for s in slices:
                for ep in s.endpoints or []:
                    if POD_IP in ep.addresses and ep.conditions and ep.conditions.ready:
                        return s, ep
            return None

        s, ep = _wait(slice_with_ip, timeout=60, what="an EndpointSlice with the pod's IP")
        assert s.address_type == "IPv4"
        assert s.metadata.labels["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
        assert ep.node_name == node_name
        assert ep.target_ref.name == "web-0"
        assert [(p.name, p.port, p.protocol) for p in s.ports] == [("http", 8080, "TCP")]

        # Not ready any more -> the controller marks the endpoint not ready.
        conds[-1]["status"] = "False"
        conds[-2]["status"] = "False"
        core.patch_namespaced_pod_status("web-0", namespace, {"status": {"conditions": conds}})

        def endpoint_not_ready():
            for s in disc.list_namespaced_endpoint_slice(
                namespace, label_selector="kubernetes.io/service-name=web"
            ).items:
                for ep in s.endpoints or []:
                    if POD_IP in ep.addresses and ep.conditions.ready is False:
                        return True
            return False

        _wait(endpoint_not_ready, timeout=60, what="the endpoint to turn not ready")
    finally:
        core.delete_node(node_name)


def test_rbac_denies_unprivileged_service_account(api_client, kubectl, namespace):
    core = client.CoreV1Api(api_client)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="nobody"))
    )
    user = f"system:serviceaccount:{namespace}:nobody"

    # Impersonation through kubectl.
    res = kubectl("--as", user, "get", "pods", "-n", namespace, check=False)
    assert res.returncode != 0
    assert "forbidden" in res.stderr.lower(), res.stderr
    assert kubectl("auth", "can-i", "list", "pods", "-n", namespace, "--as", user, check=False).stdout.strip() == "no"

    # A real token for that ServiceAccount (TokenRequest, signed by the apiserver's key).
    tr = core.create_namespaced_service_account_token(
        "nobody", namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    )
    cfg = client.Configuration()
    cfg.host = api_client.configuration.host
    cfg.ssl_ca_cert = api_client.configuration.ssl_ca_cert
    cfg.api_key = {"authorization": tr.status.token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    with client.ApiClient(cfg) as sa_client:
        review = client.AuthenticationV1Api(sa_client).create_self_subject_review(client.V1SelfSubjectReview())
        assert review.status.user_info.username == user
        with pytest.raises(ApiException) as exc:
            client.CoreV1Api(sa_client).list_namespaced_pod(namespace)
        assert exc.value.status == 403

        # RBAC really evaluates: a Role + RoleBinding grants exactly that access.
        rbac = client.RbacAuthorizationV1Api(api_client)
        rbac.create_namespaced_role(
            namespace,
            client.V1Role(
                metadata=client.V1ObjectMeta(name="pod-reader"),
                rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list"])],
            ),
        )
        rbac.create_namespaced_role_binding(
            namespace,
            client.V1RoleBinding(
                metadata=client.V1ObjectMeta(name="nobody-reads-pods"),
                role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"),
                subjects=[client.RbacV1Subject(kind="ServiceAccount", name="nobody", namespace=namespace)],
            ),
        )
        _wait(
            lambda: (
                kubectl("auth", "can-i", "list", "pods", "-n", namespace, "--as", user, check=False).stdout.strip()
                == "yes"
            ),
            timeout=30,
            what="the RoleBinding to take effect",
        )
        assert client.CoreV1Api(sa_client).list_namespaced_pod(namespace).items == []
        with pytest.raises(ApiException) as exc:
            client.CoreV1Api(sa_client).list_namespaced_secret(namespace)
        assert exc.value.status == 403


def test_namespace_deletion_completes(api_client):
    core = client.CoreV1Api(api_client)
    name = f"t-del-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    core.create_namespaced_config_map(name, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c"), data={"k": "v"}))
    core.delete_namespace(name)

    def gone():
        try:
            core.read_namespace(name)
        except ApiException as e:
            return e.status == 404
        return False

    # The namespace controller empties it and removes the "kubernetes" finalizer.
    _wait(gone, timeout=90, what=f"namespace {name} to be deleted")
