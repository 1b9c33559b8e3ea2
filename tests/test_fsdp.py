"""FSDP2 (fully_shard) through Accelerate on this CPU: 2 processes (gloo) against one process.

The runs are launched exactly as README says, `accelerate launch --config_file accelerate_config.fsdp.yaml
train.py ...` (Accelerate starts torchrun with the config's FSDP_* variables), on the tiny model and the
data of tests/test_distributed.py: 2 processes x batch 2 against 1 process x batch 2 x accumulation 2.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import train
from tests.conftest import REPO, load_benchmark, make_conversation, write_jsonl
from tests.test_distributed import free_port, kill_tree, read_jsonl

FSDP_CONFIG = REPO / "accelerate_config.fsdp.yaml"
QLORA_FSDP_CONFIG = REPO / "accelerate_config.qlora_fsdp.yaml"
SHARDING = re.compile(r"FSDP2: fully_shard units (\{.*\}) over 2 processes; this rank holds ([\d,]+) of ([\d,]+) "
                      r"parameter elements \([\d.]+%\); (\d+) tensors left whole")  # fmt: skip


def run_args(model_dir: Path, data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """test_distributed.py's run, without sample replies (a sharded model cannot generate on one rank)."""
    return [
        "--model", str(model_dir), "--train-file", str(data_dir / "train.jsonl"),
        "--validation-file", str(data_dir / "validation.jsonl"), "--output-dir", str(output_dir),
        "--batch-size", "2", "--effective-batch-size", "4", "--epochs", "2", "--rank", "4", "--dropout", "0",
        "--mixed-precision", "no", "--report-to", "none", "--num-samples", "0",
        "--eval-batch-size", "2", "--log-examples", "--save-every", "2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """16 training examples of varied length, 7 validation examples (odd: ranks get unequal shards)."""
    path = tmp_path_factory.mktemp("fsdp-data")
    records = [make_conversation(i) for i in range(16)]
    for i, record in enumerate(records):
        record["messages"][-1]["content"] += " Details follow." * (i % 5)
    write_jsonl(path / "train.jsonl", records)
    write_jsonl(path / "validation.jsonl", [make_conversation(100 + i) for i in range(7)])
    return path


def launch(config: Path, args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file CONFIG train.py ARGS` (2 processes, as the config says); fails the
    test if it hangs past `timeout` (every process is then killed)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", str(free_port()), str(REPO / "train.py"), *args]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile("w+") as out:  # a file, not a pipe: a stray rank can never block us
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   text=True, env=env, cwd=cwd, start_new_session=True)  # fmt: skip
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            process.wait(timeout=30)
            pytest.fail(f"accelerate launch did not finish in {timeout} s (every process was killed)")
        out.seek(0)
        result = subprocess.CompletedProcess(command, process.returncode, out.read(), "")
    assert result.returncode == 0, result.stdout[-4000:]
    return result


def steps_by_number(run: Path) -> dict[int, dict]:
    """Step records keyed by step; a resumed run logs the replayed steps again and the last one wins."""
    return {r["step"]: r for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "step"}


def sharding(run: Path) -> tuple[dict, int, int, int]:
    """(fully_shard units, elements rank 0 holds, elements in all, tensors left whole) from train.log."""
    units, local, total, whole = SHARDING.search((run / "train.log").read_text()).groups()
    return ast.literal_eval(units), int(local.replace(",", "")), int(total.replace(",", "")), int(whole)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_model_dir, data_dir) -> tuple[Path, subprocess.CompletedProcess]:
    output = tmp_path_factory.mktemp("fsdp") / "two"
    return output, launch(FSDP_CONFIG, run_args(tiny_model_dir, data_dir, output), output.parent)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_model_dir, data_dir) -> Path:
    output = tmp_path_factory.mktemp("fsdp-single") / "one"
    train.main(run_args(tiny_model_dir, data_dir, output))
    return output


def test_fsdp_shards_every_decoder_layer_and_only_rank_0_writes(fsdp_run, one_process_run):
    run, result = fsdp_run
    derived = json.loads((run / "config.json").read_text())["derived"]
    assert derived["distributed_type"] == "DistributedType.FSDP"  # not MULTI_CPU: Accelerate alone would be
    assert derived["num_processes"] == 2 and derived["grad_accum"] == 1
    units, local, total, whole = sharding(run)
    assert units == {"TrainedTokenLoss": 1, "LlamaDecoderLayer": 2}  # one unit per layer, the rest in the root
    assert total == derived["total_params"]  # the tied embedding is still one tensor after the meta round trip
    assert whole == 0 and abs(local - total / 2) <= 64  # rank 0 holds half (dim-0 shards, a few padded rows)
    # The run folder holds what a one-process run writes, plus rank 1's own files only.
    assert {p.name for p in run.iterdir()} == {p.name for p in one_process_run.iterdir()} | {"examples_rank1.jsonl"}
    for checkpoint in ("step_000004", "step_000008"):
        files = {p.name for p in (run / "checkpoints" / checkpoint).iterdir()}
        assert files == {p.name for p in (one_process_run / "checkpoints" / checkpoint).iterdir()} | {
            "rng_state_rank1.json"
        }
    assert [r["step"] for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "step"] == list(range(1, 9))
    assert result.stdout.count("step 8 | loss") == 1 and result.stdout.count("FSDP2: fully_shard units") == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ranks_in_sync"] is True and "adapter weights identical on all 2 ranks: True" in result.stdout


def test_fsdp_losses_and_adapter_match_one_process(fsdp_run, one_process_run, record_property):
    """2 processes x batch 2 (FSDP2) and 1 process x batch 2 x accumulation 2 see the same batches per update."""
    two, one = steps_by_number(fsdp_run[0]), steps_by_number(one_process_run)
    assert sorted(two) == sorted(one) == list(range(1, 9))
    assert [two[s]["trained_tokens"] for s in two] == [one[s]["trained_tokens"] for s in one]
    loss_delta = max(abs(two[s]["loss"] - one[s]["loss"]) for s in one)
    for s in one:
        assert two[s]["grad_norm"] == pytest.approx(one[s]["grad_norm"], rel=1e-4)
    adapter_delta = 0.0
    for folder in ("final", "best"):
        two_adapter = load_file(fsdp_run[0] / folder / "adapter_model.safetensors")
        one_adapter = load_file(one_process_run / folder / "adapter_model.safetensors")
        assert two_adapter.keys() == one_adapter.keys()
        for name, tensor in one_adapter.items():  # the full tensors, not one rank's shard
            torch.testing.assert_close(two_adapter[name], tensor, atol=1e-6, rtol=1e-5)
            adapter_delta = max(adapter_delta, (two_adapter[name] - tensor).abs().max().item())
    record_property("observed", f"max |d loss| {loss_delta:.2e}, max |d adapter| {adapter_delta:.2e} over 8 steps")
    assert loss_delta < 1e-5
    evals_two, evals_one = read_jsonl(fsdp_run[0] / "eval_log.jsonl"), read_jsonl(one_process_run / "eval_log.jsonl")
    assert [e["val_loss"] for e in evals_two] == pytest.approx([e["val_loss"] for e in evals_one], abs=1e-6)
    norms_two, norms_one = read_jsonl(fsdp_run[0] / "grad_log.jsonl"), read_jsonl(one_process_run / "grad_log.jsonl")
    assert [n["norms"] for n in norms_two] == [pytest.approx(n["norms"], rel=1e-4) for n in norms_one]
    ratios_two = json.loads((fsdp_run[0] / "update_ratios.json").read_text())
    assert ratios_two == pytest.approx(json.loads((one_process_run / "update_ratios.json").read_text()), rel=1e-4)


def test_fsdp_checkpoint_holds_the_full_adapter_and_optimizer_state(fsdp_run, one_process_run):
    for name in ("adapter_model.safetensors", "optimizer.safetensors"):
        two = load_file(fsdp_run[0] / "checkpoints" / "step_000004" / name)
        one = load_file(one_process_run / "checkpoints" / "step_000004" / name)
        assert two.keys() == one.keys()
        for key, tensor in one.items():
            assert two[key].shape == tensor.shape  # gathered whole before rank 0 wrote
            torch.testing.assert_close(two[key], tensor, atol=1e-6, rtol=1e-5)
    meta = [
        json.loads((run / "checkpoints/step_000004/optimizer.json").read_text())
        for run in (fsdp_run[0], one_process_run)
    ]
    assert meta[0] == meta[1]


def test_fsdp_resume_from_a_checkpoint_replays_the_uninterrupted_run(
    fsdp_run, one_process_run, tiny_model_dir, data_dir
):
    """Resume the FSDP run from step 4 under FSDP: each rank takes its slice of the saved full tensors."""
    run = fsdp_run[0].parent / "resumed"
    shutil.copytree(fsdp_run[0], run)
    for later in ("checkpoints/step_000006", "checkpoints/step_000008", "final"):
        shutil.rmtree(run / later)
    args = run_args(tiny_model_dir, data_dir, run, "--resume-from", str(run / "checkpoints/step_000004"))
    result = launch(FSDP_CONFIG, args, run.parent)
    assert "resumed from" in result.stdout and "step 4, epoch 2, batch 0" in result.stdout
    resumed, one = steps_by_number(run), steps_by_number(one_process_run)
    for s in range(5, 9):
        assert resumed[s]["loss"] == pytest.approx(one[s]["loss"], abs=1e-5)
        assert resumed[s]["grad_norm"] == pytest.approx(one[s]["grad_norm"], rel=1e-4)
    final, expected = (
        load_file(run / "final/adapter_model.safetensors"),
        load_file(one_process_run / "final/adapter_model.safetensors"),
    )
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=1e-5)


def test_qlora_fsdp_shards_the_4bit_base_and_matches_one_process(tmp_path, tiny_model_dir, data_dir, record_property):
    """QLoRA + FSDP2 in fp16 (a T4's precision: CPU autocast and GradScaler), 2 steps, against one process."""
    extra = ["--quantization", "nf4", "--mixed-precision", "fp16", "--max-steps", "2", "--epochs", "1",
             "--no-baseline", "--save-every", "0", "--grad-log-every", "1"]  # fmt: skip
    two = tmp_path / "two"
    launch(QLORA_FSDP_CONFIG, run_args(tiny_model_dir, data_dir, two, *extra), tmp_path)
    one = tmp_path / "one"
    train.main(run_args(tiny_model_dir, data_dir, one, *extra))
    _, local, total, whole = sharding(two)
    assert whole == 0 and abs(local - total / 2) <= 64  # the packed 4-bit weights are sharded too
    steps_two, steps_one = steps_by_number(two), steps_by_number(one)
    assert sorted(steps_two) == sorted(steps_one) == [1, 2]
    loss_delta = max(abs(steps_two[s]["loss"] - steps_one[s]["loss"]) for s in steps_one)
    record_property("observed", f"max |d loss| {loss_delta:.2e} over 2 fp16 steps")
    assert loss_delta < 1e-4  # measured 6.7e-6
    final_two, final_one = (
        load_file(two / "final/adapter_model.safetensors"),
        load_file(one / "final/adapter_model.safetensors"),
    )
    for name, tensor in final_one.items():
        torch.testing.assert_close(final_two[name], tensor, atol=3e-5, rtol=1e-4)  # fp16: measured 7.6e-6


# --- fast checks: the refusals, the configs as `accelerate launch` reads them, the CPU switch ---


def test_fsdp_refuses_sample_generation_before_touching_the_run_folder(monkeypatch, tmp_path, tiny_model_dir, data_dir):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(SystemExit) as stop:
        train.main(run_args(tiny_model_dir, data_dir, tmp_path / "run", "--num-samples", "1"))
    assert "the main process alone cannot generate sample replies; pass --num-samples 0" in str(stop.value)
    assert not (tmp_path / "run").exists()


def launch_env(config: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG` gives train.py (Accelerate's own parsing)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP")) or k == "WORLD_SIZE"}


@pytest.mark.parametrize(
    ("config", "ram_efficient"), [(FSDP_CONFIG, True), (QLORA_FSDP_CONFIG, False)], ids=["lora", "qlora"]
)
def test_fsdp_configs_load_as_fsdp2_with_per_layer_wrapping(config, ram_efficient, monkeypatch, tiny_model_dir):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import StateDictType
    from transformers import AutoModelForCausalLM

    env = launch_env(config)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == str(ram_efficient).lower()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # what train.py's Accelerator builds from those variables
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.use_orig_params is None and plugin.sync_module_states is None  # FSDP1-only settings
    assert plugin.cpu_ram_efficient_loading is ram_efficient
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plugin.set_auto_wrap_policy(model)
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)  # what fsdp2_prepare_model shards by
    assert [type(m).__name__ for m in model.modules() if policy(m)] == ["LlamaDecoderLayer"] * 2


def test_cpu_fsdp_switch(monkeypatch):
    """Accelerate leaves a CPU run MULTI_CPU whatever the FSDP variables say; the switch turns it to FSDP2."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    from common import fsdp

    def fake_accelerator() -> SimpleNamespace:
        return SimpleNamespace(
            distributed_type=DistributedType.MULTI_CPU, mixed_precision="no", state=SimpleNamespace()
        )

    accelerator = fake_accelerator()
    assert fsdp.enable_cpu_fsdp(accelerator) is False  # no FSDP asked: data parallel stays
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP_VERSION=1: only FSDP2 \\(fully_shard\\) runs on a CPU"):
        fsdp.enable_cpu_fsdp(accelerator)
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setitem(PartialState._shared_state, "distributed_type", DistributedType.MULTI_CPU)
    assert fsdp.enable_cpu_fsdp(accelerator) is True
    assert accelerator.state.distributed_type == DistributedType.FSDP
    assert accelerator.state.fsdp_plugin.fsdp_version == 2
    assert PartialState._shared_state["distributed_type"] == DistributedType.FSDP


# --- benchmarks/gpu_check.py --multi-gpu: what it runs where GPUs are lent, and its parity figures ---


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


def test_gpu_check_multi_gpu_commands_compare_fsdp_on_2_gpus_with_1_gpu(gpu_check, tmp_path):
    args = gpu_check.parse_args(["--multi-gpu", "--steps", "6", "--batch-size", "4", "--grad-accum", "2"])
    reference, fsdp = gpu_check.multi_gpu_commands(
        args, "accelerate_config.qlora_fsdp.yaml", "nf4", "fp16", tmp_path, tmp_path / "v.jsonl"
    )
    assert reference[1] == str(REPO / "train.py") and reference[-2:] == ["--grad-accum", "4"]  # 1 GPU x 4 x 4
    launch_flags = fsdp[: fsdp.index(str(REPO / "train.py"))]
    assert launch_flags[1:3] == ["-m", "accelerate.commands.launch"]
    assert ["--config_file", str(REPO / "accelerate_config.qlora_fsdp.yaml"), "--num_processes", "2"] == launch_flags[
        3:7
    ]
    assert fsdp[-2:] == ["--grad-accum", "2"]  # 2 GPUs x 4 x 2: the same 32 examples per update
    expected = {"--num-samples": "0", "--dropout": "0", "--quantization": "nf4", "--mixed-precision": "fp16"}
    for command in (reference, fsdp):
        flags = command[command.index(str(REPO / "train.py")) + 1 :]
        assert {flag: flags[flags.index(flag) + 1] for flag in expected} == expected


def test_gpu_check_parity_figures_of_the_cpu_fsdp_run(gpu_check, fsdp_run, one_process_run, tmp_path):
    parity = gpu_check.compare_runs(fsdp_run[0], one_process_run)
    assert parity["steps"] == 8 and parity["max_abs_loss_delta"] < 1e-5 and parity["max_abs_adapter_delta"] < 1e-6
    shutil.copytree(fsdp_run[0] / "final", tmp_path / "final")  # a run whose adapter differs by 0.5 in one weight
    shutil.copy(fsdp_run[0] / "train_log.jsonl", tmp_path)
    adapter = load_file(tmp_path / "final/adapter_model.safetensors")
    next(iter(adapter.values()))[0, 0] += 0.5
    save_file(adapter, tmp_path / "final/adapter_model.safetensors")
    assert gpu_check.compare_runs(tmp_path, one_process_run)["max_abs_adapter_delta"] == pytest.approx(0.5, abs=1e-3)


def test_gpu_check_multi_gpu_needs_2_gpus(gpu_check, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert gpu_check.main(["--multi-gpu", "--output", str(tmp_path / "gpu.md")]) == 0
    assert capsys.readouterr().out == "gpu_check.py --multi-gpu: fewer than 2 CUDA devices here, nothing to check\n"
    assert not (tmp_path / "gpu.md").exists()
