"""JSON schemas for kubeconform from a live API server's OpenAPI v3 (offline validation: no download).

    python hack/install/openapi_schemas.py --out DIR [--kubeconfig FILE] [--kubectl BIN]

Writes kubeconform's layout, ``DIR/v<version>-standalone[-strict]/<kind><suffix>.json``, one file per
group-version-kind the server serves (CRDs installed in it included), then prints the
``-schema-location`` template. Each file holds the kind's schema with the definitions it reaches
(``$ref`` rewritten to them), ``nullable`` turned into a ``null`` type, and, in the strict variant,
``additionalProperties: false`` on every object that lists its properties and does not preserve
unknown fields.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

REF_PREFIX = "#/components/schemas/"


def fetch(kubectl: list[str], path: str) -> dict[str, Any]:
    result = subprocess.run([*kubectl, "get", "--raw", path], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def rewrite(node: Any, strict: bool) -> Any:
    """The schema with local refs, null types and (strict) closed objects."""
    if isinstance(node, list):
        return [rewrite(item, strict) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: rewrite(value, strict) for key, value in node.items()}
    ref = out.get("$ref")
    if isinstance(ref, str) and ref.startswith(REF_PREFIX):
        out["$ref"] = "#/definitions/" + ref[len(REF_PREFIX) :]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        strict
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def reachable(name: str, schemas: dict[str, Any]) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen or current not in schemas:
            continue
        seen.add(current)
        stack: list[Any] = [schemas[current]]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                ref = node.get("$ref")
                if isinstance(ref, str) and ref.startswith(REF_PREFIX):
                    todo.append(ref[len(REF_PREFIX) :])
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    return seen


def kind_suffix(group: str, version: str) -> str:
    """kubeconform's: "-<first label of the group>-<version>", or "-<version>" for the core group."""
    return f"-{group.split('.')[0].lower()}-{version.lower()}" if group else f"-{version.lower()}"


def generate(kubectl: list[str], out: Path) -> str:
    version = fetch(kubectl, "/version")["gitVersion"].split("+")[0]  # v1.34.12
    index = fetch(kubectl, "/openapi/v3")["paths"]
    written: set[tuple[str, str]] = set()
    for path, entry in sorted(index.items()):
        if not (path == "api/v1" or path.startswith("apis/")) or path.count("/") not in (1, 2):
            continue
        schemas = fetch(kubectl, entry["serverRelativeURL"]).get("components", {}).get("schemas", {})
        for name, schema in schemas.items():
            for gvk in schema.get("x-kubernetes-group-version-kind") or []:
                file_name = f"{gvk['kind'].lower()}{kind_suffix(gvk['group'], gvk['version'])}.json"
                # a kind is served by its own group-version's document (others embed it, e.g. WatchEvent)
                if (gvk["group"] and not path.startswith(f"apis/{gvk['group']}/")) or (
                    not gvk["group"] and path != "api/v1"
                ):
                    continue
                for strict in (False, True):
                    if (file_name, str(strict)) in written:
                        continue
                    written.add((file_name, str(strict)))
                    standalone = rewrite(copy.deepcopy(schema), strict)
                    standalone["definitions"] = {
                        other: rewrite(schemas[other], strict) for other in sorted(reachable(name, schemas))
                    }
                    directory = out / f"{version}-standalone{'-strict' if strict else ''}"
                    directory.mkdir(parents=True, exist_ok=True)
                    (directory / file_name).write_text(json.dumps(standalone))
    return (
        str(out)
        + "/{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    parser.add_argument("--kubectl", default="kubectl")
    args = parser.parse_args()
    kubectl = [args.kubectl] + ([f"--kubeconfig={args.kubeconfig}"] if args.kubeconfig else [])
    print(generate(kubectl, args.out))


if __name__ == "__main__":
    main()
