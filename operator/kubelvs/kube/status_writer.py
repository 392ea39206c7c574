"""VirtualServer status and Events: the requests, each with a timeout, and their outcome.

Nothing here decides what to write (that is :mod:`kubelvs.core.status`); it only says whether
the write landed, so that a failed write is retried and never recorded as written.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubelvs.core.spec import GROUP, PLURAL, VERSION, ObjectRef
from kubelvs.kube.rest import KubeApi, path

log = logging.getLogger("kubelvs.kube.status")


class Written(enum.Enum):
    OK = "ok"
    GONE = "gone"  # the VirtualServer was deleted meanwhile: nothing to report on
    FAILED = "failed"  # 429, 5xx, a timeout, a refused connection: retry later


class StatusWriter:
    def __init__(self, api: KubeApi, timeout_seconds: float = 30.0) -> None:
        self.api = api
        self.timeout = (min(10.0, timeout_seconds), timeout_seconds)  # (connect, read)

    @staticmethod
    def _status_path(ref: ObjectRef) -> str:
        return path("apis", GROUP, VERSION, "namespaces", ref.namespace, PLURAL, ref.name, "status")

    def apply_status(self, ref: ObjectRef, status: dict[str, Any], manager: str) -> Written:
        """Server-side apply of ``status`` as field manager ``manager``."""
        patch = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "VirtualServer",
            "metadata": {"name": ref.name, "namespace": ref.namespace},
            "status": status,
        }
        try:
            self.api.call(
                "PATCH",
                self._status_path(ref),
                query={"fieldManager": manager, "force": True},
                body=patch,  # JSON is YAML
                content_type="application/apply-patch+yaml",
                timeout=self.timeout,
                parse=False,
            )
        except ApiException as error:
            if error.status == 404:
                return Written.GONE
            log.warning("status of %s not written: %s %s", ref, error.status, error.reason)
            return Written.FAILED
        except Exception as error:  # urllib3: timeouts, refused or reset connections
            log.warning("status of %s not written: %s", ref, error)
            return Written.FAILED
        return Written.OK

    def remove_directors(self, ref: ObjectRef, directors: list[dict[str, Any]], gone: set[str]) -> Written:
        """Drop the ``status.directors`` entries of directors that are gone (no live heartbeat).

        Those entries belong to the dead directors' field managers, which will never apply again,
        so server-side apply cannot remove them: a JSON patch does, each removal guarded by a
        test of the entry's node (the list may have changed since it was read)."""
        ops: list[dict[str, Any]] = []
        for index in range(len(directors) - 1, -1, -1):
            node = directors[index].get("node")
            if node in gone:
                ops.append({"op": "test", "path": f"/status/directors/{index}/node", "value": node})
                ops.append({"op": "remove", "path": f"/status/directors/{index}"})
        if not ops:
            return Written.OK
        try:
            self.api.call(
                "PATCH",
                self._status_path(ref),
                body=ops,
                content_type="application/json-patch+json",
                timeout=self.timeout,
                parse=False,
            )
        except ApiException as error:
            if error.status == 404:
                return Written.GONE
            log.info("entries of gone directors %s on %s not removed: %s %s", gone, ref, error.status, error.reason)
            return Written.FAILED  # 422: a test failed (the list changed): retried from a fresh view
        except Exception as error:
            log.warning("entries of gone directors on %s not removed: %s", ref, error)
            return Written.FAILED
        return Written.OK

    def post_event(self, namespace: str, event: dict[str, Any]) -> bool:
        try:
            self.api.call(
                "POST",
                path("api", "v1", "namespaces", namespace, "events"),
                body=event,
                timeout=self.timeout,
                parse=False,
            )
        except Exception as error:  # events are best effort
            log.debug("event not posted: %s", error)
            return False
        return True
