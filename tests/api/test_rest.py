"""kubelvs's raw JSON client (kubelvs.kube.rest.KubeApi) against a real kube-apiserver: requests,
refusals as ApiException with the server's Status, query parameters, and the list/watch function
the informers take."""

from __future__ import annotations

import json

import pytest
from kubelvs.kube.rest import KubeApi, path
from kubernetes.client.exceptions import ApiException


def _configmap(name: str, labels: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}


def test_a_refusal_is_an_api_exception_with_the_servers_status(api_client, namespace) -> None:
    with KubeApi(api_client.configuration) as api:
        collection = path("api", "v1", "namespaces", namespace, "configmaps")
        with pytest.raises(ApiException) as refused:
            api.call("POST", collection, body=_configmap("Not_A_Name", {}), timeout=(5, 10))
        assert refused.value.status == 422
        assert json.loads(refused.value.body)["reason"] == "Invalid"
        missing = collection + "/nothing-here"
        assert api.call("GET", missing, missing_ok=True) is None
        with pytest.raises(ApiException) as gone:
            api.call("GET", missing)
        assert gone.value.status == 404


def test_queries_and_the_informers_list_function(api_client, namespace) -> None:
    with KubeApi(api_client.configuration) as api:
        collection = path("api", "v1", "namespaces", namespace, "configmaps")
        for i in range(3):
            api.call("POST", collection, body=_configmap(f"c{i}", {"pick": "yes" if i else "no"}))
        picked = api.call("GET", collection, query={"labelSelector": "pick=yes"})
        assert sorted(o["metadata"]["name"] for o in picked["items"]) == ["c1", "c2"]
        # The informers' function: the typed client's keywords, a raw response.
        listing = api.lister(collection, label_selector="pick=yes")
        first = json.loads(listing(limit=1, _request_timeout=(5, 10)).data)
        assert len(first["items"]) == 1 and first["metadata"]["continue"]
        rest = json.loads(listing(limit=1, _continue=first["metadata"]["continue"]).data)
        assert [o["metadata"]["name"] for o in first["items"] + rest["items"]] == ["c1", "c2"]
        patched = api.call(
            "PATCH",
            collection + "/c1",
            body=[{"op": "replace", "path": "/data/k", "value": "w"}],
            content_type="application/json-patch+json",
        )
        assert patched["data"] == {"k": "w"}


def test_a_write_whose_answer_is_dropped(api_client, namespace) -> None:
    """``parse=False``: the status writer's calls (the answer, a whole object, is read but not parsed)."""
    with KubeApi(api_client.configuration) as api:
        collection = path("api", "v1", "namespaces", namespace, "configmaps")
        api.call("POST", collection, body=_configmap("sent", {}))
        for value in ("a", "b", "c"):  # the connection goes back to the pool each time
            patch = [{"op": "replace", "path": "/data/k", "value": value}]
            kind = "application/json-patch+json"
            assert api.call("PATCH", collection + "/sent", body=patch, content_type=kind, parse=False) is None
        assert api.call("GET", collection + "/sent")["data"] == {"k": "c"}
        with pytest.raises(ApiException) as refused:
            api.call("POST", collection, body=_configmap("Not_A_Name", {}), parse=False)
        assert refused.value.status == 422
