"""Log-in to the API server: the pod's service account in a cluster, else the kubeconfig."""

from __future__ import annotations

import os
from pathlib import Path

from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import SERVICE_CERT_FILENAME, SERVICE_TOKEN_FILENAME, InClusterConfigLoader

from kubelvs.kube.rest import KubeApi

# A service account's token and CA from another directory than the pod's mount: a director run
# outside a pod as a pod would be (the benchmarks and the VM tests, with a TokenRequest token).
SERVICE_ACCOUNT_DIR_ENV = "KUBELVS_SERVICE_ACCOUNT_DIR"


def load_config() -> None:
    """In a pod (KUBERNETES_SERVICE_HOST set) the service account, as client-go's rest.InClusterConfig
    does, token re-read as the kubelet rotates it; otherwise the kubeconfig. The kubeconfig loader is
    imported only then: it brings requests, oauthlib, google-auth and yaml (about 18 MB, and seconds
    of a director's start in the emulated VM), which a director in a pod never uses."""
    account_dir = os.environ.get(SERVICE_ACCOUNT_DIR_ENV)
    token, ca = (
        (str(Path(account_dir, "token")), str(Path(account_dir, "ca.crt")))
        if account_dir
        else (SERVICE_TOKEN_FILENAME, SERVICE_CERT_FILENAME)
    )
    try:
        InClusterConfigLoader(token_filename=token, cert_filename=ca).load_and_set()
    except ConfigException:
        from kubernetes.config.kube_config import load_kube_config

        load_kube_config()


def new_api_client() -> KubeApi:
    return KubeApi()
