"""Average LoRA adapters trained on the same base: one adapter whose weight update is the mean of theirs.

    python average_adapters.py --adapters runs/seed1234/best runs/seed4321/best --output runs/soup/best
    python evaluate.py --adapter runs/soup/best --split validation --own-history --no-base

Each input's update of a layer is s * B_i @ A_i (s = alpha / r). Adapters from different seeds have unrelated
factors, so averaging the A's and the B's apart is not an average of the updates. The output stacks the ranks
instead, A = [A_1; ...; A_k] and B = [B_1 ... B_k] / k, with alpha k times larger so s is unchanged: its update is
exactly (1/k) * sum_i s * B_i @ A_i, at rank k * r (a "model soup" of the adapters, Wortsman et al. 2022). The
folder is an ordinary PEFT adapter (evaluate.py, export.py and merge_and_load.py read it) with
`averaged_from.json` naming the inputs and their sha256; tokenizer and run config come from the first input.

Measured (docs/results.md, session 29): the demo recipe's two training seeds averaged decided validation 0.92
and stress 0.85, against 0.83 / 0.95 and 0.71 / 0.77 for the two adapters alone.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.artifacts import open_adapter
from common.checkpoint import COMPLETE_MARKER, CheckpointError, publish_folder, sha256_of
from common.jsonio import write_json

SAME_FIELDS = ("base_model_name_or_path", "r", "lora_alpha", "target_modules", "peft_type")
NOT_COPIED = {
    "adapter_model.safetensors",
    "adapter_config.json",
    COMPLETE_MARKER,
    "metrics.json",
    "trainer_state.json",
    "README.md",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", nargs="+", type=Path, required=True, help="two or more adapter folders")
    parser.add_argument("--output", type=Path, required=True, help="the averaged adapter's folder")
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)
    if len(args.adapters) < 2:
        parser.error("--adapters needs two or more folders")
    if args.output.exists() and not args.force:
        parser.error(f"{args.output} exists; pass --force to replace it")
    return args


def lora_shape(config: dict) -> dict:
    """The adapter_config.json fields that must agree for adapters to average (target modules in any order)."""
    return {field: sorted(config[field]) if field == "target_modules" else config.get(field) for field in SAME_FIELDS}


def average_lora(tensors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The stacked-rank tensors whose update is the mean of the inputs' (see the module docstring).

    Args:
        tensors: each adapter's state dict (lora_A: r x in, lora_B: out x r), with the same keys and shapes.

    Returns:
        lora_A: (k*r) x in, the A's stacked; lora_B: out x (k*r), the B's side by side divided by k.

    Raises:
        ValueError: a key that is not a LoRA factor, or keys or shapes that differ between the adapters.
    """
    first, count = tensors[0], len(tensors)
    if any(set(other) != set(first) for other in tensors[1:]):
        raise ValueError("the adapters hold different tensors (other target modules or layers)")
    averaged = {}
    for key in first:
        if any(other[key].shape != first[key].shape for other in tensors[1:]):
            raise ValueError(f"tensor {key} has another shape in one of the adapters")
        if ".lora_A." in key:
            averaged[key] = torch.cat([t[key] for t in tensors], dim=0)
        elif ".lora_B." in key:
            averaged[key] = torch.cat([t[key] for t in tensors], dim=1) / count
        else:
            raise ValueError(f"tensor {key} is not a LoRA factor (lora_A / lora_B); only plain LoRA adapters average")
    return averaged


def main(argv: list[str] | None = None) -> Path:
    """Average the adapters and publish the folder; returns its path."""
    args = parse_args(argv)
    try:
        adapters = [open_adapter(folder) for folder in args.adapters]
    except CheckpointError as err:
        sys.exit(f"average_adapters.py: error: {err}")
    first = adapters[0]
    expected = lora_shape(first.config)
    for adapter in adapters:
        if adapter.config.get("use_rslora") or adapter.config.get("use_dora"):
            sys.exit(f"average_adapters.py: error: {adapter.path}/adapter_config.json: rsLoRA / DoRA do not average")
        for field, value in lora_shape(adapter.config).items():
            if value != expected[field]:
                sys.exit(
                    f"average_adapters.py: error: {adapter.path}/adapter_config.json: {field} is {value!r}, "
                    f"{first.path} has {expected[field]!r}; only adapters of the same base and LoRA shape average"
                )
    try:
        tensors = average_lora([adapter.tensors for adapter in adapters])
    except ValueError as err:
        sys.exit(f"average_adapters.py: error: {err}")

    count = len(adapters)
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in sorted(first.path.iterdir()):
        if path.is_file() and path.name not in NOT_COPIED:
            shutil.copy2(path, tmp / path.name)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = first.config | {"r": count * first.config["r"], "lora_alpha": count * first.config["lora_alpha"]}
    write_json(tmp / "adapter_config.json", config)
    sources = [
        {"folder": str(adapter.path), "sha256": sha256_of(adapter.path / "adapter_model.safetensors")}
        for adapter in adapters
    ]
    write_json(tmp / "averaged_from.json", {"method": "mean of the LoRA updates, ranks stacked", "adapters": sources})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    publish_folder(tmp, args.output)
    print(f"wrote {args.output}: the mean of {count} adapters' updates at rank {config['r']}")
    return args.output


if __name__ == "__main__":
    main()
