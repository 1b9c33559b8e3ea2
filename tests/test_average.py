"""average_adapters.py: the averaged adapter's update is the mean of the inputs' updates (checked against
PEFT's own merges of each input), and adapters that cannot average are refused with the file and field."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
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

    def stages_of(variable: str) -> list[list[str]]:
        lines = makefile.split(f"{variable} := \\\n")[1].splitlines()
        block = lines[: next(i for i, line in enumerate(lines) if not line.endswith("\\")) + 1]
        return [shlex.split(line.strip().rstrip("\\").strip().strip('"')) for line in block]

    stages = stages_of("DEMO_TRAININGS") + stages_of("DEMO_STAGES")

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


FAKE_PYTHON = """#!{real}
import json, os, sys, time
argv = sys.argv[1:]
if argv[0] == "-c":  # the Makefile's device / cores question
    if os.environ.get("FAKE_GPU"):
        print(0)
        sys.exit(0)
    os.execv({real!r}, [{real!r}, *argv])
start = time.time()
time.sleep(2 if argv[0] == "train.py" else 0)
print("fake", *argv)
with open({log!r}, "a") as f:
    f.write(json.dumps(dict(argv=argv, threads=os.environ.get("OMP_NUM_THREADS"), start=start, end=time.time())) + "\\n")
sys.exit(3 if os.environ.get("FAKE_FAIL") and "4321" in argv else 0)
"""


def run_demo_with_fake_python(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """`make demo` in tmp_path with a python that only logs each stage (argv, threads, start, end)."""
    log, fake = tmp_path / "stages.jsonl", tmp_path / "fakepython"
    fake.write_text(FAKE_PYTHON.format(real=sys.executable, log=str(log)))
    fake.chmod(0o755)
    makefile = Path(__file__).resolve().parents[1] / "Makefile"
    command = ["make", "-s", "-C", str(tmp_path), "-f", str(makefile), "-o", ".venv/.installed", "demo", f"PY={fake}"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    stages = [json.loads(line) for line in log.read_text().splitlines()]
    return done, [s for s in stages if s["argv"][0] != "-m"]  # `make setup`'s model conversion


def test_make_demo_trains_its_seeds_side_by_side_on_the_cpu_each_with_its_share_of_the_cores(tmp_path):
    done, stages = run_demo_with_fake_python(tmp_path, OMP_NUM_THREADS="99")  # not inherited
    assert done.returncode == 0, done.stderr
    names = [s["argv"][0] for s in stages]
    assert names[0] == "data/generate.py" and names[1:3] == ["train.py", "train.py"]
    assert names[3] == "average_adapters.py" and len(names) == 10
    first, second = stages[1], stages[2]
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core: the trainings run one after another")
    assert max(first["start"], second["start"]) < min(first["end"], second["end"])  # they overlap
    assert first["threads"] == second["threads"] == str(cores // 2)
    assert stages[0]["end"] <= min(first["start"], second["start"])
    assert max(first["end"], second["end"]) <= stages[3]["start"]
    for before, after in itertools.pairwise(stages[2:]):
        assert before["end"] <= after["start"]  # the rest one after another
    timings = (tmp_path / "runs/demo-timings.txt").read_text().splitlines()
    assert len(timings) == 11 and timings[-1].endswith("total")
    assert sum("side by side" in line for line in timings) == 2
    assert "fake train.py" in (tmp_path / "runs/demo-training-2.log").read_text()
    # the first training's console is make's, the second's goes to its log
    assert (
        "fake train.py --run-name demo " in done.stdout and "fake train.py --run-name demo-seed4321" not in done.stdout
    )


def test_make_demo_trains_one_after_another_on_a_gpu_and_stops_when_a_training_fails(tmp_path):
    done, stages = run_demo_with_fake_python(tmp_path, FAKE_GPU="1", OMP_NUM_THREADS="99")
    assert done.returncode == 0, done.stderr
    first, second = stages[1], stages[2]
    assert first["end"] <= second["start"] and first["threads"] == second["threads"] == "99"  # the user's own
    assert "side by side" not in (tmp_path / "runs/demo-timings.txt").read_text()

    (tmp_path / "failing").mkdir()
    failed, stages = run_demo_with_fake_python(tmp_path / "failing", FAKE_FAIL="1")
    assert failed.returncode != 0
    assert [s["argv"][0] for s in stages] == ["data/generate.py", "train.py", "train.py"]  # no average of a failed run
    assert "fake train.py --run-name demo-seed4321" in failed.stdout  # the failed training's console, shown
