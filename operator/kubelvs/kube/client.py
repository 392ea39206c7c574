"""Log-in to the API server: the pod's service account in a cluster, else the kubeconfig."""

from __future__ import annotations

from kubernetes import client as k8s
from kubernetes import config as k8s_config


def load_config() -> None:
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()


def new_api_client() -> k8s.ApiClient:
    return k8s.ApiClient()
