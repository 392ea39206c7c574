"""Reading Kubernetes manifests (YAML files and directories) for the standalone CLI."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubelvs.core.cluster import Cluster
from kubelvs.core.spec import GROUP, KIND, ObjectRef

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML has it


class ManifestError(ValueError):
    pass


@dataclass(slots=True)
class Manifests:
    virtual_servers: list[dict[str, Any]] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)
    endpoint_slices: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    sources: dict[ObjectRef, str] = field(default_factory=dict)  # VirtualServer -> file it came from

    def cluster(self) -> Cluster:
        return Cluster.build(self.services, self.endpoint_slices, self.nodes)


def _files(paths: Iterable[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml", ".json")))
        elif path.exists():
            found.append(path)
        else:
            raise ManifestError(f"{path}: no such file or directory")
    return found


def load(paths: Iterable[str]) -> Manifests:
    """Load every object of the given files; raise ManifestError naming the file on bad YAML."""
    result = Manifests()
    for path in _files(paths):
        try:
            documents = list(yaml.load_all(path.read_text(), Loader=_LOADER))
        except yaml.YAMLError as error:
            raise ManifestError(f"{path}: not valid YAML: {error}") from None
        for index, doc in enumerate(documents):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise ManifestError(f"{path}: document {index + 1} is not a Kubernetes object")
            items = doc.get("items") if doc.get("kind", "").endswith("List") else [doc]
            for obj in items or []:
                _add(result, obj, path)
    return result


def _add(result: Manifests, obj: dict[str, Any], path: Path) -> None:
    kind = obj.get("kind")
    group = str(obj.get("apiVersion", "")).split("/")[0]
    metadata = obj.setdefault("metadata", {}) or {}
    if not metadata.get("name"):
        raise ManifestError(f"{path}: a {kind or 'document'} without metadata.name")
    metadata.setdefault("namespace", "default")
    if kind == KIND and group == GROUP:
        ref = ObjectRef.of(obj)
        if ref in result.sources:
            raise ManifestError(f"{path}: {KIND} {ref} is also defined in {result.sources[ref]}")
        result.sources[ref] = str(path)
        result.virtual_servers.append(obj)
    elif kind == "Service":
        result.services.append(obj)
    elif kind == "EndpointSlice":
        result.endpoint_slices.append(obj)
    elif kind == "Node":
        result.nodes.append(obj)
