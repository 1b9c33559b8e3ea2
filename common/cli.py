"""Command-line helpers of train.py: flag defaults from a --config file, the test-only --fault-inject."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def load_config_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read flag defaults from a YAML/JSON file; a run's config.json contributes its "args" section.

    Per-run flags (output folder, run name, resume, overwrite) are never taken from the file.

    Raises:
        SystemExit: unreadable file or an unknown key, naming the file and the key.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        sys.exit(f"error: --config {path}: cannot read it ({err})")
    data = data.get("args", data) if isinstance(data, dict) else None
    if not isinstance(data, dict):
        sys.exit(f"error: --config {path}: expected a mapping of flag names to values")
    known = {action.dest for action in parser._actions}
    defaults = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest not in known:
            sys.exit(f"error: --config {path}: unknown key '{key}'; see --help for the flags")
        if dest not in ("config", "resume_from", "output_dir", "run_name", "overwrite"):
            defaults[dest] = value
    return defaults


def parse_fault_injection(spec: str) -> dict[str, set[int]]:
    """Parse the test-only `--fault-inject` flag: "loss:3,grad:5,stop:11" -> {"loss": {3}, "grad": {5}, "stop": {11}}.

    loss:N / grad:N make optimizer step N's loss NaN / gradients inf; stop:N exits abruptly right
    after micro-batch N (nothing saved), as a crash would.

    Raises:
        SystemExit: on a malformed item.
    """
    faults = {"loss": set(), "grad": set(), "stop": set()}
    for item in filter(None, spec.split(",")):
        kind, _, step = item.partition(":")
        if kind not in faults or not step.isdigit():
            sys.exit(f"error: --fault-inject item '{item}' must look like loss:3, grad:5 or stop:11")
        faults[kind].add(int(step))
    return faults
