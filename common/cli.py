"""Command-line helpers: flag defaults from a --config file, the --task module."""

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_config_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    """Flag defaults from a YAML/JSON file (a run's config.json: its "args"), never the per-run flags (output
    folder, run name, resume, overwrite). SystemExit names the file and the key: unreadable file, unknown key."""
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


def load_task(path: str | Path) -> ModuleType:
    """Load the task module (`--task FILE`): the one file that knows how to score a reply.

    A task module defines `score_reply(reply: str, record: dict) -> dict[str, float] | None`: the
    scores in [0, 1] of one generated final reply against its record (None: nothing to score).
    evaluate.py also uses its `evaluate_replies`, `extra_prompts`, `prediction_fields` and
    `report_lines` when present (docs/task.md).

    Raises:
        SystemExit: the file is missing or has no `score_reply`, naming the file.
    """
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"task_{path.stem}", path)
    if not path.is_file() or spec is None or spec.loader is None:
        sys.exit(f"error: --task {path}: no such Python file; give the task module's path")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "score_reply", None)):
        sys.exit(f"error: --task {path}: defines no score_reply(reply, record); see docs/task.md")
    return module
