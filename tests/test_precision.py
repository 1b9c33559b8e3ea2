"""The one precision resolver (common/precision.py): a faked probe decides, GPUs keep their rule, CPU fp16 works.

The probe's timing function is replaced by fixed figures, so no test depends on this machine's speed.
The figures are the DESIGN.md table's CPUs: an AMX Xeon (bf16 ~6x fp32) and the 2026-12-01 Xeon
with AVX512-BF16 + AVX512-FP16 but no AMX (fp32 0.24, bf16 0.135, fp16 0.23 TFLOP/s).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import train
from common import perf
from common import precision as precision_module
from common.precision import (
    MIN_SPEEDUP,
    PROBE_MAX_FLOPS,
    PROBE_ROUNDS,
    enable_cpu_fp16,
    measure_matmul_flops,
    probe_shapes,
    resolve_precision,
)
from tests.conftest import REPO

AMX_XEON = {torch.float32: 0.30e12, torch.bfloat16: 1.90e12}
XEON_NO_AMX = {torch.float32: 0.24e12, torch.bfloat16: 0.135e12, torch.float16: 0.23e12}
CPU = torch.device("cpu")


@pytest.fixture
def fake_cpu(monkeypatch):
    """Install fake matmul figures (FLOP/s per dtype) and CPU flags; returns the list of probed dtypes."""

    def install(figures: dict, flags: set[str] = frozenset()) -> list[torch.dtype]:
        probed: list[torch.dtype] = []

        def fake_measure(device, dtype, shapes, budget_s):
            probed.append(dtype)
            return figures[dtype]

        monkeypatch.setattr(precision_module, "measure_matmul_flops", fake_measure)
        monkeypatch.setattr(precision_module, "read_cpu_flags", lambda: set(flags))
        monkeypatch.setattr(precision_module, "cpu_bf16_supported", lambda: torch.bfloat16 in figures)
        return probed

    return install


@pytest.fixture(scope="module")
def smollm_config():
    from common.model import load_config

    return load_config(str(REPO / "configs/smollm2-135m-instruct.json"))


def test_probe_shapes_are_the_models_own_and_stay_small(smollm_config):
    from common.model import load_config

    shapes = probe_shapes(smollm_config)
    # hidden 576, intermediate 1536, 9 heads x 64, vocab 49152 (probed 16384 wide)
    assert [s[:3] for s in shapes] == [(512, 576, 1536), (512, 1536, 576), (512, 576, 576), (512, 576, 16384)]
    # weights: 30 layers x (2 x 576 x 1536 up/gate, 576 x 1536 down, 4 x 576 x 576 q/k/v/o); head on half the tokens
    assert [s[3] for s in shapes] == [30 * 2 * 576 * 1536, 30 * 576 * 1536, 30 * 4 * 576 * 576, 0.5 * 576 * 49152]
    big = probe_shapes(load_config(str(REPO / "configs/mistral-7b-instruct-v0.3.json")))
    assert all(2 * m * k * n <= PROBE_MAX_FLOPS for m, k, n, _ in big)  # a 7B probe is as short as a 135M one
    assert big[0][:3] == (64, 4096, 14336)


def test_auto_picks_bf16_where_it_is_fast(fake_cpu, smollm_config):
    probed = fake_cpu(AMX_XEON)
    choice = resolve_precision("auto", CPU, smollm_config)
    assert (choice.precision, choice.dtype) == ("bf16", torch.bfloat16)
    assert choice.probe_flops == {"fp32": 0.30e12, "bf16": 1.90e12}
    assert (choice.peak_flops, choice.peak_dtype) == (1.90e12, "bf16")
    assert torch.float16 not in probed  # no AVX512-FP16 / AMX-FP16: emulated fp16 is not worth timing
    assert "fp16 not probed" in choice.reason


def test_auto_picks_fp32_on_the_xeon_without_amx(fake_cpu, smollm_config):
    probed = fake_cpu(XEON_NO_AMX, flags={"avx512_bf16", "avx512_fp16"})
    choice = resolve_precision("auto", CPU, smollm_config)
    assert choice.precision == "no" and choice.dtype == torch.float32  # bf16 0.56x, fp16 0.96x of fp32
    assert torch.float16 in probed and choice.probe_flops["fp16"] == 0.23e12
    assert (choice.peak_flops, choice.peak_dtype) == (0.24e12, "fp32")
    record = choice.to_json()
    assert record["probe_flops"] == {"fp32": 0.24e12, "bf16": 0.135e12, "fp16": 0.23e12}
    assert record["precision"] == "no" and record["dtype"] == "float32"
    line = choice.describe()
    assert "precision no (fp32 base)" in line and "fp32 0.240, bf16 0.135, fp16 0.230" in line
    assert "MFU against the fp32 peak 0.240 TFLOP/s" in line


def test_fp16_only_when_clearly_faster(fake_cpu, smollm_config):
    def chosen(fp32: float, bf16: float | None, fp16: float) -> str:
        figures = {torch.float32: fp32, torch.float16: fp16} | ({torch.bfloat16: bf16} if bf16 else {})
        fake_cpu(figures, flags={"avx512_fp16"})
        return resolve_precision("auto", CPU, smollm_config).precision

    assert chosen(0.24e12, 0.135e12, 0.50e12) == "fp16"
    # within MIN_SPEEDUP of the more accurate dtype: keep it (ties go to precision, fp16 also needs loss scaling)
    assert chosen(1.0, None, MIN_SPEEDUP * 0.99) == "no"
    assert chosen(1.0, 3.0, 3.1) == "bf16"
    assert chosen(1.0, 3.0, 3.0 * MIN_SPEEDUP * 1.01) == "fp16"


def test_explicit_flag_wins_and_mfu_still_uses_the_fastest_dtype(fake_cpu, smollm_config):
    fake_cpu(AMX_XEON)
    choice = resolve_precision("no", CPU, smollm_config)
    assert choice.precision == "no" and "requested explicitly" in choice.reason
    assert (choice.peak_flops, choice.peak_dtype) == (1.90e12, "bf16")  # honest MFU: not fp32's own peak
    assert resolve_precision("fp32", CPU, smollm_config).precision == "no"  # evaluate.py's spelling
    probed = fake_cpu(AMX_XEON)
    quiet = resolve_precision("bf16", CPU, smollm_config, measure_peak=False)
    assert quiet.precision == "bf16" and quiet.peak_flops is None and probed == []  # nothing timed
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", CPU)


@pytest.mark.parametrize(
    ("capability", "requested", "launcher", "expected"),
    [((7, 5), "auto", None, "fp16"), ((8, 0), "auto", None, "bf16"), ((7, 5), "bf16", None, "fp16"),
     ((8, 6), "auto", "fp16", "fp16"), ((8, 0), "no", None, "no")],
    ids=["T4 auto", "A100 auto", "bf16 on a T4", "accelerate launch fp16", "explicit fp32 on a GPU"],
)  # fmt: skip
def test_gpu_rule(monkeypatch, capability, requested, launcher, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    if launcher:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    else:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    timed = []
    figures = {torch.float16: 65e12, torch.bfloat16: 300e12}
    monkeypatch.setattr(
        precision_module, "measure_matmul_flops", lambda d, dtype, s, budget_s: timed.append(dtype) or figures[dtype]
    )
    choice = resolve_precision(requested, torch.device("cuda"))
    assert choice.precision == expected and choice.device == "cuda"
    # the card's own peak: fp16 always, bf16 only where the tensor cores run it
    assert choice.peak_flops == (300e12 if capability >= (8, 0) else 65e12)
    assert set(timed) == ({torch.float16, torch.bfloat16} if capability >= (8, 0) else {torch.float16})


def test_real_probe_measures_within_its_budget(tiny_model_dir):
    from common.model import load_config

    shapes = probe_shapes(load_config(str(tiny_model_dir)))
    # CPU time of this process, not wall time: other processes on a shared CI machine do not count
    start = time.process_time()
    rate = measure_matmul_flops(CPU, torch.float32, shapes, budget_s=0.2)
    assert rate > 1e8 and time.process_time() - start < 2.0  # a real figure, in a fraction of a second
    start = time.process_time()
    choice = resolve_precision("auto", CPU, load_config(str(tiny_model_dir)), budget_s=0.3)
    assert choice.probe_flops["fp32"] > 0 and choice.peak_flops == max(choice.probe_flops.values())
    assert time.process_time() - start < 3.0


# --- fp16 on a CPU: Accelerate leaves autocast and loss scaling off, enable_cpu_fp16 switches both on ---


def test_accelerate_fp16_on_cpu_is_a_no_op_until_enabled():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    assert accelerator.scaler is None and not accelerator.native_amp  # the trap: nothing happens by itself
    choice = resolve_precision("fp16", CPU, measure_peak=False)
    assert enable_cpu_fp16(accelerator, choice)
    assert isinstance(accelerator.scaler, torch.amp.GradScaler) and accelerator.scaler.get_scale() == 2.0**16
    assert not enable_cpu_fp16(accelerator, resolve_precision("bf16", CPU, measure_peak=False))


def test_cpu_fp16_autocasts_scales_unscales_and_skips_inf_steps():
    from accelerate import Accelerator

    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    model.load_state_dict(reference.state_dict())
    inputs, targets = torch.randn(8, 16), torch.randn(8, 1)
    torch.nn.functional.mse_loss(reference(inputs), targets).backward()  # fp32 gradients to compare with

    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    enable_cpu_fp16(accelerator, resolve_precision("fp16", CPU, measure_peak=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = model.module if hasattr(model, "module") else model
    seen = []
    inner[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    output = model(inputs)
    assert seen == [torch.float16]  # prepare() wrapped the forward in fp16 autocast (outputs come back fp32)
    with accelerator.autocast():
        assert torch.matmul(inputs, inputs.T).dtype == torch.float16
    loss = torch.nn.functional.mse_loss(output.float(), targets)
    accelerator.backward(loss)
    weight = inner[0].weight
    scaled = weight.grad.clone()
    accelerator.clip_grad_norm_(model.parameters(), 1e9)  # unscales first, as in train.py
    assert torch.allclose(scaled / 2.0**16, weight.grad)  # the backward ran on a loss x 65536
    torch.testing.assert_close(weight.grad, reference[0].weight.grad, rtol=2e-2, atol=2e-4)
    before = weight.detach().clone()
    optimizer.step()
    assert not optimizer.step_was_skipped and not torch.equal(before, weight)
    optimizer.zero_grad()

    accelerator.backward(torch.nn.functional.mse_loss(model(inputs).float(), targets) * float("inf"))
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    before = weight.detach().clone()
    optimizer.step()
    assert optimizer.step_was_skipped and torch.equal(before, weight)  # the inf update never happened
    assert accelerator.scaler.get_scale() == 2.0**15  # and the scale backed off


# --- the scripts: the choice and the figures land in config.json / train.log / metrics.json ---


def train_args(tiny_model_dir, toy_data_dir, output_dir, precision: str) -> list[str]:
    return [
        "--model", str(tiny_model_dir), "--train-file", str(toy_data_dir / "train.jsonl"),
        "--validation-file", str(toy_data_dir / "validation.jsonl"), "--output-dir", str(output_dir),
        "--subset", "8", "--batch-size", "2", "--grad-accum", "2", "--epochs", "1", "--max-steps", "2",
        "--rank", "4", "--alpha", "8", "--mixed-precision", precision, "--report-to", "none", "--num-samples", "1",
        "--max-new-tokens", "4", "--no-baseline", "--save-every", "1",
    ]  # fmt: skip


def test_train_records_the_probe_and_stores_the_base_in_the_chosen_dtype(
    fake_cpu, tiny_model_dir, toy_data_dir, tmp_path
):
    fake_cpu({torch.float32: 1e11, torch.bfloat16: 4e11})
    run = tmp_path / "auto"
    train.main(train_args(tiny_model_dir, toy_data_dir, run, "auto"))
    derived = json.loads((run / "config.json").read_text())["derived"]
    assert derived["mixed_precision"] == "bf16" and derived["base_dtype"] == "bfloat16"  # base stored in bf16
    assert derived["precision"]["probe_flops"] == {"fp32": 1e11, "bf16": 4e11}
    assert (derived["peak_flops"], derived["peak_flops_dtype"]) == (4e11, "bf16")
    log = (run / "train.log").read_text()
    assert "precision bf16 (bf16 base) on cpu: auto" in log and "MFU against the bf16 peak 0.400 TFLOP/s" in log


def test_train_divides_mfu_by_the_fastest_dtypes_peak(fake_cpu, monkeypatch, tiny_model_dir, toy_data_dir, tmp_path):
    fake_cpu({torch.float32: 1e11, torch.bfloat16: 4e11})
    monkeypatch.setattr(perf, "estimate_train_flops", lambda *args: 1e9)  # every step "does" 1 GFLOP
    run = tmp_path / "fp32"
    train.main(train_args(tiny_model_dir, toy_data_dir, run, "no"))
    derived = json.loads((run / "config.json").read_text())["derived"]
    assert derived["mixed_precision"] == "no" and derived["base_dtype"] == "float32"
    assert (derived["peak_flops"], derived["peak_flops_dtype"]) == (4e11, "bf16")  # fp32 chosen, bf16's peak
    steps = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["type"] == "step"]
    assert len(steps) == 2
    for s in steps:  # mfu = 1 GFLOP / step seconds / the FASTEST dtype's 4e11, not fp32's own 1e11
        assert s["mfu"] == pytest.approx(1e9 / (s["tokens"] / s["tokens_per_s"]) / 4e11, rel=1e-6)


def read_steps(run: Path) -> list[dict]:
    """The step records of a run's train_log.jsonl."""
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == "step"]


def test_a_probe_that_read_too_low_never_logs_mfu_above_100_percent(fake_cpu, tiny_model_dir, toy_data_dir, tmp_path):
    """The startup probe reads 1 kFLOP/s (as if the CPU were busy): each step beats it, the peak is measured again
    (still slow here), and then the step's own rate is the peak: MFU 100%, not 10^7 %."""
    probed = fake_cpu({torch.float32: 1e3})
    run = tmp_path / "slow-probe"
    train.main(train_args(tiny_model_dir, toy_data_dir, run, "no"))
    steps = read_steps(run)
    assert len(steps) == 2 and all(s["mfu"] <= 1.0 for s in steps)
    assert steps[0]["mfu"] == pytest.approx(1.0)  # the first step beat the re-measured peak: it is the peak
    assert all(s["peak_flops"] > 1e3 for s in steps)
    assert len(probed) > PROBE_ROUNDS  # the startup probe, then at least one re-measurement
    assert "mfu 100.0%" in (run / "train.log").read_text() and "mfu 1000" not in (run / "train.log").read_text()


def test_a_step_beating_the_probe_has_the_peak_measured_again(monkeypatch):
    """MfuMeter: a step above the peak triggers a re-measurement, whose better figure becomes the denominator."""
    calls = []
    meter = perf.MfuMeter({"body": 1, "head": 0, "lora": 0, "layers": 1, "hidden": 1}, peak_flops=10.0)
    meter.remeasure = lambda: calls.append(1) or 1000.0
    monkeypatch.setattr(perf, "estimate_train_flops", lambda *args: 100.0)
    assert meter.mfu(1, 1, 1, seconds=1.0) == pytest.approx(0.1)  # 100 FLOP/s > 10: re-measured at 1000
    assert calls == [1] and meter.peak_flops == 1000.0
    assert meter.mfu(1, 1, 1, seconds=1.0) == pytest.approx(0.1) and calls == [1]  # below the peak: no re-measure
    meter.remeasure = lambda: calls.append(1) or 5.0  # a re-measurement that reads low never lowers the peak
    monkeypatch.setattr(perf, "estimate_train_flops", lambda *args: 4000.0)
    assert meter.mfu(1, 1, 1, seconds=1.0) == 1.0 and meter.peak_flops == 4000.0 and len(calls) == 2
    assert perf.MfuMeter({}, peak_flops=None).mfu(1, 1, 1, 1.0) is None


def test_train_fp16_on_cpu_uses_our_autocast_and_grad_scaler(tiny_model_dir, toy_data_dir, tmp_path):
    run = tmp_path / "fp16"
    summary = train.main(train_args(tiny_model_dir, toy_data_dir, run, "fp16"))
    derived = json.loads((run / "config.json").read_text())["derived"]
    assert derived["mixed_precision"] == "fp16" and derived["base_dtype"] == "float16"
    scaler = json.loads((run / "checkpoints/step_000002/scaler.json").read_text())
    assert scaler["scale"] == 2.0**16  # a CPU GradScaler ran (Accelerate alone would save null here)
    steps = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if s["type"] == "step"]
    assert (
        len(losses) == 2 and all(0 < loss < 20 for loss in losses) and summary["status"] in ("completed", "max_steps")
    )


def test_evaluate_uses_the_resolver_and_shows_progress(fake_cpu, tiny_model_dir, toy_data_dir, tmp_path, capsys):
    import evaluate

    fake_cpu({torch.float32: 1e11, torch.bfloat16: 4e11})
    argv = ["--model", str(tiny_model_dir), "--data-file", str(toy_data_dir / "test.jsonl"), "--limit", "3"]
    argv += ["--max-new-tokens", "4", "--batch-size", "2", "--bootstrap", "20", "--output-dir", str(tmp_path)]
    metrics = evaluate.main(argv)
    assert metrics["settings"]["dtype"] == "bfloat16"  # loaded and autocast in the measured-fastest dtype
    assert metrics["settings"]["precision"]["probe_flops"] == {"fp32": 1e11, "bf16": 4e11}
    err = capsys.readouterr().err
    assert "base: scoring" in err and " tok/s" in err
    assert "base: generating" in err and "new tok/s" in err


def test_merge_rounds_qlora_bases_in_the_dtype_the_run_recorded():
    from merge_and_load import resolve_nf4_dtype

    # train.py records the frozen base's dtype (what common.precision chose), e.g. fp32 on a CPU without AMX
    assert resolve_nf4_dtype("auto", {"derived": {"base_dtype": "float32", "mixed_precision": "no"}}) == torch.float32
    assert resolve_nf4_dtype("auto", {"derived": {"base_dtype": "float16", "mixed_precision": "fp16"}}) == torch.float16
    assert resolve_nf4_dtype("auto", {"derived": {"mixed_precision": "bf16"}}) == torch.bfloat16  # older runs
    assert resolve_nf4_dtype("bfloat16", {"derived": {"base_dtype": "float32"}}) == torch.bfloat16  # the flag wins


def test_a_sweep_measures_once_and_every_configuration_uses_that_precision(fake_cpu, tmp_path, monkeypatch):
    import sweep
    from tests.test_sweep import FAKE_TRAIN

    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_TRAIN_CALLS", str(calls))
    argv = ["--grid", "lr=1e-4,2e-4", "--name", "p", "--sweeps-dir", str(tmp_path / "sweeps"), "--train-script"]
    argv += [str(script), "--", "--max-steps", "2"]
    probed = fake_cpu({torch.float32: 1e11, torch.bfloat16: 4e11})
    sweep.main(argv)
    commands = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(commands) == 2 and all(c[c.index("--mixed-precision") + 1] == "bf16" for c in commands)
    assert all(c[-2:] == ["--max-steps", "2"] for c in commands)  # the arguments after `--` stay last
    assert len(probed) == 2 * PROBE_ROUNDS  # fp32 and bf16, probed once for the whole sweep
    record = json.loads((tmp_path / "sweeps/p/sweep.json").read_text())
    assert record["mixed_precision"] == "bf16"

    # resumed on a machine where fp32 would now win: the sweep keeps its recorded precision
    shutil.rmtree(tmp_path / "sweeps/p/lr=1e-4")
    probed = fake_cpu({torch.float32: 4e11, torch.bfloat16: 1e11})
    sweep.main(argv)
    commands = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(commands) == 3 and commands[-1][commands[-1].index("--mixed-precision") + 1] == "bf16"
    assert probed == []
