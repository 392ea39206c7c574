"""The director and the agent import only the parts of the kubernetes client and pyroute2 they use
(kubelvs.lazypackages), and whoever wants the whole package still gets it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# What the eager __init__s brought and a director in a pod never uses.
HEAVY = ["kubernetes.config.kube_config", "oauthlib", "requests", "google.auth", "yaml", "pyroute2.ndb"]


def _fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.parametrize("role", ["kubelvs.director.app", "kubelvs.realserver.app"])
def test_a_role_imports_no_heavy_part(role: str) -> None:
    seen = _fresh(
        f"import json, sys; import {role}; import kubelvs.kube.client\n"
        f"print(json.dumps({{'heavy': [m for m in {HEAVY!r} if m in sys.modules], 'count': len(sys.modules)}}))"
    )
    assert seen["heavy"] == [], seen
    assert seen["count"] < 500, seen  # 839 with the eager __init__s


def test_the_whole_package_is_still_there_for_who_asks() -> None:
    seen = _fresh(
        "import json; import kubelvs.kube, kubelvs.kernel\n"
        "from pyroute2 import NetNS\n"
        "from kubernetes import config, watch\n"
        "import kubernetes, pyroute2\n"
        "from kubelvs.lazypackages import is_deferred\n"
        "deferred_before = is_deferred(config)\n"
        "loader = config.load_kube_config\n"
        "print(json.dumps({'netns': NetNS.__name__, 'loader': loader.__name__, 'watch': watch.Watch.__name__,\n"
        "  'version': kubernetes.__version__, 'deferred_before': deferred_before,\n"
        "  'deferred_after': is_deferred(config) or is_deferred(pyroute2)}))"
    )
    assert seen == {
        "netns": "NetNS",
        "loader": "load_kube_config",
        "watch": "Watch",
        "version": seen["version"],
        "deferred_before": True,
        "deferred_after": False,
    }
    assert seen["version"]


def test_a_missing_attribute_is_still_an_attribute_error() -> None:
    seen = _fresh(
        "import json; import kubelvs.kernel, pyroute2\n"
        "try:\n    pyroute2.NoSuchThing\nexcept AttributeError as e:\n    print(json.dumps(str(e)))"
    )
    assert "NoSuchThing" in seen


def test_the_static_commands_do_not_build_the_agents_options() -> None:
    """``kubelvs apply`` parses only its own options: the agents' (and kubelvs.core.receive,
    13 ms natively to import, half a second under emulation) are built for their own command."""
    seen = _fresh(
        "import json, sys; from kubelvs.cli import build_parser\n"
        "args = build_parser('apply').parse_args(['apply', '-f', 'x.yaml'])\n"
        "agents = [m for m in ('kubelvs.director.options', 'kubelvs.realserver.options', 'kubelvs.core.receive')"
        " if m in sys.modules]\n"
        "director = build_parser('director').parse_args(['director', '--node-name', 'n1'])\n"
        "print(json.dumps({'agents': agents, 'command': args.command, 'retry': director.retry_period}))"
    )
    assert seen == {"agents": [], "command": "apply", "retry": 0.5}
