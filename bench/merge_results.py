#!/usr/bin/env python3
"""Merge one benchmark's JSON into bench/results.json (each benchmark owns its top-level keys)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(new_file: str, results_file: str) -> int:
    results_path = Path(results_file)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.update(json.loads(Path(new_file).read_text()))
    results_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"updated {results_path}: {', '.join(sorted(results))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
