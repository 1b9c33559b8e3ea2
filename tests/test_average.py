"""average_adapters.py: the averaged adapter's update is the mean of the inputs' updates (checked against
PEFT's own merges of each input), and adapters that cannot average are refused with the file and field."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import average_adapters
from common.checkpoint import verify


def make_adapter(base_dir: Path, folder: Path, seed: int, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A random LoRA (B not zero, so the update is not zero) on the tiny model, saved as PEFT saves it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def merged_weights(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The base with the adapter folded in by PEFT (W + alpha/r * B @ A)."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def test_the_average_adapter_adds_the_mean_update(tiny_model_dir, tmp_path):
    inputs = [make_adapter(tiny_model_dir, tmp_path / f"seed{seed}", seed) for seed in (1, 2, 3)]
    output = average_adapters.main(["--adapters", *map(str, inputs), "--output", str(tmp_path / "soup")])

    config = json.loads((output / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (12, 24)  # three rank-4 adapters, the same alpha / r
    verify(output)  # COMPLETE with the hashes of what was written
    sources = json.loads((output / "averaged_from.json").read_text())["adapters"]
    assert [Path(s["folder"]).name for s in sources] == ["seed1", "seed2", "seed3"]

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    merged = [merged_weights(tiny_model_dir, folder) for folder in inputs]
    averaged = merged_weights(tiny_model_dir, output)
    changed = 0
    for key, weight in base.items():
        mean = sum(m[key] for m in merged) / len(merged)
        torch.testing.assert_close(averaged[key], mean, rtol=0, atol=1e-6)
        changed += not torch.equal(merged[0][key], weight)
    assert changed == 4  # q_proj and v_proj of both layers moved; the rest is the base


def test_adapters_that_do_not_average_are_refused(tiny_model_dir, tmp_path, capsys):
    plain = make_adapter(tiny_model_dir, tmp_path / "qv", 1)
    other = make_adapter(tiny_model_dir, tmp_path / "qk", 2, targets=("q_proj", "k_proj"))
    with pytest.raises(SystemExit) as refused:
        average_adapters.main(["--adapters", str(plain), str(other), "--output", str(tmp_path / "soup")])
    message = str(refused.value.code)
    assert "qk/adapter_config.json: target_modules is" in message and "same base and LoRA shape" in message
    assert not (tmp_path / "soup").exists()
    with pytest.raises(SystemExit):
        average_adapters.main(["--adapters", str(plain), "--output", str(tmp_path / "soup")])
    assert "needs two or more" in capsys.readouterr().err


def test_make_demo_evaluates_exports_and_merges_the_average_of_its_trained_seeds():
    # README's results are make demo's: the adapter it scores and ships must be the average of the runs it trains.
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text(encoding="utf-8")
    block = makefile.split("DEMO_STAGES := \\\n")[1].split("\n\n")[0]
    stages = [shlex.split(line.strip().rstrip("\\").strip().strip('"')) for line in block.splitlines()]

    def flag(argv: list[str], name: str) -> list[str]:
        values = argv[argv.index(name) + 1 :]
        return values[: next((i for i, v in enumerate(values) if v.startswith("--")), len(values))]

    trains = [argv for argv in stages if argv[0] == "train.py"]
    assert len({flag(argv, "--seed")[0] for argv in trains}) == len(trains) >= 2  # different seeds
    (average,) = [argv for argv in stages if argv[0] == "average_adapters.py"]
    assert flag(average, "--adapters") == [f"{flag(argv, '--output-dir')[0]}/best" for argv in trains]
    averaged = flag(average, "--output")
    evaluated = [flag(argv, "--adapter") for argv in stages if argv[0] == "evaluate.py" and "--adapter" in argv]
    assert evaluated == [averaged, averaged]  # test and stress
    reports = [flag(argv, "--report")[0] for argv in stages if argv[0] == "evaluate.py" and "--report" in argv]
    assert reports == [flag(argv, "--output-dir")[0] for argv in trains]  # each training's convergence report
    (export,) = [argv for argv in stages if argv[0] == "export.py"]
    assert flag(export, "--checkpoint") == averaged
    (merge,) = [argv for argv in stages if argv[0] == "merge_and_load.py"]
    assert flag(merge, "--adapter") == [
        f"exports/{Path(flag(export, '--run')[0]).name}-v{flag(export, '--version')[0]}"
    ]
