"""Raw JSON requests to the API server, on the kubernetes client's transport without its typed layer.

kubelvs reads and writes plain JSON everywhere (trimmed informer objects, Lease bodies, status
patches), so the client's typed layer only cost memory and time. Measured natively (kubernetes
37.0.2): ``ApiClient()`` loads the pydantic models, +24 MB RSS; ``CoreV1Api`` is 4.5 MB of source
whose methods pydantic wraps, +21 MB more. Under emulation in the VM that was also seconds of every
director's start. What kubelvs keeps from the client: the ``Configuration`` (in-cluster or
kubeconfig login, a service account token re-read as the kubelet rotates it, client
certificates), its urllib3 pool with the TLS settings (``RESTClientObject``), and ``ApiException``
for refusals, so callers see the same errors as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlencode

import urllib3
from kubernetes.client.configuration import Configuration
from kubernetes.client.exceptions import ApiException
from kubernetes.client.rest import RESTClientObject

from kubelvs import __version__

Timeout = float | tuple[float, float]

# The typed client's keyword arguments of a list call, and the API server's query names: an
# informer's call takes the former (tests/api hands it the typed client's own list functions).
_QUERY_NAMES = {
    "limit": "limit",
    "_continue": "continue",
    "watch": "watch",
    "resource_version": "resourceVersion",
    "allow_watch_bookmarks": "allowWatchBookmarks",
    "timeout_seconds": "timeoutSeconds",
    "label_selector": "labelSelector",
    "field_selector": "fieldSelector",
}


def _query_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def path(*segments: str) -> str:
    """``/a/b/c`` with every segment quoted (names come from the API and from users)."""
    return "".join("/" + quote(segment, safe="") for segment in segments)


class KubeApi:
    """The API server, as raw JSON. ``configuration`` defaults to the one
    :func:`kubelvs.kube.client.load_config` set."""

    def __init__(self, configuration: Configuration | None = None) -> None:
        self.configuration = configuration or Configuration.get_default_copy()
        self.rest_client = RESTClientObject(self.configuration)

    def close(self) -> None:
        self.rest_client.close()

    def __enter__(self) -> KubeApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"kubelvs/{__version__}"}
        if content_type:
            headers["Content-Type"] = content_type
        # The bearer token, when there is one (read again from the file as it rotates); a client
        # certificate is in the pool's TLS settings instead.
        settings: dict[str, Any] = dict(self.configuration.auth_settings())
        for auth in settings.values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[str(auth["key"])] = str(auth["value"])
        return headers

    def open(
        self,
        method: str,
        resource_path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: Timeout | None = None,
    ) -> Any:
        """Send one request and return urllib3's response, its body not read yet (a watch streams
        it). Any non-2xx answer raises ApiException with the status and the server's message.

        Never resent by urllib3: every caller has its own retry (the informers' backoff, the
        status loop, the election's next renewal), and a write whose answer was lost must come
        back to it as a failure, not be sent again behind its back."""
        url = self.configuration.host + resource_path
        if query:
            url += "?" + urlencode({name: _query_value(value) for name, value in query.items()})
        if isinstance(timeout, tuple):
            request_timeout = urllib3.Timeout(connect=timeout[0], read=timeout[1])
        else:
            request_timeout = urllib3.Timeout(total=timeout) if timeout else urllib3.Timeout()
        response = self.rest_client.pool_manager.request(
            method,
            url,
            body=None if body is None else json.dumps(body, separators=(",", ":")),
            headers=self.headers(content_type if body is not None else None),
            timeout=request_timeout,
            retries=False,
            preload_content=False,
        )
        if not 200 <= response.status <= 299:
            try:
                _ = response.data  # read and kept: ApiException takes the server's Status from it
            finally:
                response.release_conn()
            raise ApiException.from_response(http_resp=response, body=None, data=None)  # 409: ConflictException
        return response

    def call(
        self,
        method: str,
        resource_path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: Timeout | None = None,
        missing_ok: bool = False,
        parse: bool = True,
    ) -> Any:
        """One request, the answer parsed; None for a 404 when ``missing_ok``. ``parse=False``: a
        write whose answer is not needed, read to the end and dropped (None). A status write
        answers with the whole object, managedFields and all: at a director's start, 10,000 of
        them were parsed in the writer threads only to be thrown away."""
        try:
            response = self.open(
                method, resource_path, query=query, body=body, content_type=content_type, timeout=timeout
            )
        except ApiException as error:
            if missing_ok and error.status == 404:
                return None
            raise
        try:
            if not parse:
                response.drain_conn()  # read to the end: the connection goes back to the pool
                return None
            data = response.data
        finally:
            response.release_conn()
        return json.loads(data) if data else {}

    def lister(self, resource_path: str, **fixed: Any) -> Callable[..., Any]:
        """A list (and watch) function for :class:`kubelvs.kube.informers.Informer`, with the typed
        client's keywords (``limit``, ``_continue``, ``watch``, ``_request_timeout``...); it
        returns the raw response, as the typed one does with ``_preload_content=False``."""

        def list_or_watch(
            _preload_content: bool = False, _request_timeout: Timeout | None = None, **kwargs: Any
        ) -> Any:
            query = {_QUERY_NAMES[name]: value for name, value in {**fixed, **kwargs}.items() if value is not None}
            response = self.open("GET", resource_path, query=query, timeout=_request_timeout)
            if _preload_content:
                _ = response.data
            return response

        return list_or_watch
