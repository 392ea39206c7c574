"""Directors and agents in the VM log in as they do in a pod: a ServiceAccount's token and the
cluster's CA (kubelvs.kube.client.load_config's in-cluster path), not the admin kubeconfig.

That is the production path, and it is lighter: the kubeconfig loader imports requests, oauthlib,
google-auth and yaml, which cost each director seconds of its start under emulation. The account is
bound to cluster-admin: these tests exercise the data path and the election, while least-privilege
RBAC is tested against the real API server in tests/api/test_deploy.py and test_leases.py.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlsplit

NAMESPACE = "default"
ACCOUNT = "kubelvs-e2e"
_cache: dict[str, dict[str, str]] = {}


def pod_login_env(kubeconfig: str, base: Path = Path("/run/kubelvs-e2e-login")) -> dict[str, str]:
    """Environment for a kubelvs process: KUBERNETES_SERVICE_HOST/PORT and the account's directory
    (token and CA, under ``base``)."""
    if kubeconfig in _cache:
        return _cache[kubeconfig]
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    # The kubeconfig as the client reads it: the server, and the CA (written to a file by the loader).
    api = config.new_client_from_config(config_file=kubeconfig)
    server = urlsplit(api.configuration.host)
    ca = Path(api.configuration.ssl_ca_cert).read_bytes()
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    try:
        core.create_namespaced_service_account(NAMESPACE, {"metadata": {"name": ACCOUNT}})
    except ApiException as error:
        if error.status != 409:
            raise
    binding = {
        "metadata": {"name": ACCOUNT},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": NAMESPACE}],
    }
    try:
        rbac.create_cluster_role_binding(binding)
    except ApiException as error:
        if error.status != 409:
            raise
    token = core.create_namespaced_service_account_token(
        ACCOUNT, NAMESPACE, {"spec": {"expirationSeconds": 6 * 3600}}
    ).status.token
    api.close()

    directory = base / hashlib.sha256(kubeconfig.encode()).hexdigest()[:12]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_bytes(ca)
    (directory / "token").write_text(token)
    os.chmod(directory / "token", 0o600)
    _cache[kubeconfig] = {
        "KUBERNETES_SERVICE_HOST": server.hostname or "",
        "KUBERNETES_SERVICE_PORT": str(server.port or 443),
        "KUBELVS_SERVICE_ACCOUNT_DIR": str(directory),
    }
    return _cache[kubeconfig]
