"""common.lora: adapters on exactly the target modules, only adapters trainable, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from common.lora import (
    CastUnlessAutocast,
    LoraSetupError,
    SampledGapDropout,
    apply_lora,
    assert_only_adapters_trainable,
    bernoulli_drop_positions,
    count_parameters,
    lora_parameter_key,
)
from common.model import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(tiny_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    return model


def test_adapters_exist_on_exactly_the_target_modules_of_every_layer(tiny):
    model = apply_lora(tiny, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
    with_adapter = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    expected = {
        f"base_model.model.model.layers.{layer}.self_attn.{proj}"
        for layer in range(2)
        for proj in ("q_proj", "k_proj", "v_proj")
    }
    assert with_adapter == expected
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}.default.weight" for m in expected for ab in "AB"}
    assert {lora_parameter_key(n) for n in trainable} == {f"{lay}.{p}.{ab}" for lay in (0, 1) for p in ("q_proj", "k_proj", "v_proj") for ab in "AB"}  # fmt: skip
    counts = count_parameters(model)
    # hidden 64, q: 64->64, k/v: 64->32 (2 kv heads x 16): r*(in+out) per module
    per_layer = 4 * (64 + 64) + 4 * (64 + 32) * 2
    assert counts["trainable"] == 2 * per_layer
    assert counts["trainable_pct"] < 1.0


def test_all_linear_targets_mlp_too(tiny):
    model = apply_lora(tiny, rank=2, alpha=4, dropout=0.0, target_modules="all-linear")
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_unknown_target_module_names_the_alternatives(tiny):
    with pytest.raises(LoraSetupError, match=r"qkv_proj not found in this model; linear layers are: .*q_proj"):
        apply_lora(tiny, rank=4, alpha=8, dropout=0.0, target_modules=["qkv_proj"])


def test_a_trainable_base_weight_is_refused(tiny):
    model = apply_lora(tiny, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    model.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(LoraSetupError, match="base parameters are trainable"):
        assert_only_adapters_trainable(model)


def test_base_weights_are_bit_identical_after_training_steps(tiny):
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    model = apply_lora(tiny, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 1000, (2, 16))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.get_base_model().named_parameters())
    changed_adapters = [n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed_adapters  # the adapters did train
    for name, value in before.items():
        key = name.replace("q_proj.weight", "q_proj.base_layer.weight").replace(
            "v_proj.weight", "v_proj.base_layer.weight"
        )
        assert torch.equal(after[key], value), name


# --- SampledGapDropout: same distribution as nn.Dropout, far fewer random draws on CPU ---


@pytest.mark.parametrize("n, p, draws", [(200_000, 0.05, None), (50_000, 0.5, None), (20_000, 0.05, 7)])
def test_drop_positions_are_iid_bernoulli(n, p, draws):
    """Drop rate, independence of neighbours and per-position rate match i.i.d. Bernoulli(p) within 5 sigma
    (draws=7 forces the refill loop: hundreds of batches of Geometric gaps)."""
    generator = torch.Generator().manual_seed(0)
    trials = 10
    hits = torch.zeros(n)
    for _ in range(trials):
        positions = bernoulli_drop_positions(n, p, generator=generator, draws=draws)
        assert positions.dtype == torch.int64 and bool((positions[1:] > positions[:-1]).all())
        assert int(positions.min()) >= 0 and int(positions.max()) < n
        hits[positions] += 1
    total = trials * n
    rate = float(hits.sum()) / total
    assert abs(rate - p) < 5 * (p * (1 - p) / total) ** 0.5
    # neighbours both dropped: p^2 if independent
    mask = torch.zeros(n, dtype=torch.bool)
    mask[bernoulli_drop_positions(n, p, generator=generator, draws=draws)] = True
    pairs = float((mask[1:] & mask[:-1]).float().mean())
    assert abs(pairs - p * p) < 5 * (p * p * (1 - p * p) / (n - 1)) ** 0.5 + 1e-9
    # the first and last positions are dropped at rate p too (no edge effect from the gap sampling)
    small = torch.zeros(5)
    for _ in range(4000):
        small[bernoulli_drop_positions(5, p, generator=generator, draws=draws)] += 1
    assert torch.allclose(small / 4000, torch.full((5,), p), atol=5 * (p * (1 - p) / 4000) ** 0.5)


def test_sampled_gap_dropout_scales_survivors_and_matches_its_gradient():
    torch.manual_seed(1)
    x = torch.randn(3, 50, 64, requires_grad=True)
    layer = SampledGapDropout(p=0.1)
    y = layer(x)
    dropped = y == 0
    assert 0.05 < float(dropped.float().mean()) < 0.15
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.9, rtol=0, atol=1e-6)
    y.sum().backward()
    expected = torch.where(dropped, torch.zeros_like(x), torch.full_like(x, 1 / 0.9))
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-7)
    layer.eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(SampledGapDropout(p=0.0)(x), x)


def test_sampled_gap_dropout_follows_the_global_seed():
    x = torch.ones(10_000)
    layer = SampledGapDropout(p=0.05)
    torch.manual_seed(7)
    first = layer(x)
    torch.manual_seed(7)
    assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)


def test_apply_lora_swaps_every_adapter_dropout(tiny):
    model = apply_lora(tiny, rank=4, alpha=8, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj"])
    adapter_dropouts = [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert len(adapter_dropouts) == 3 * tiny.config.num_hidden_layers
    assert all(type(d) is SampledGapDropout and d.p == 0.05 for d in adapter_dropouts)


def peft_reference(model_dir):
    """PEFT's own LoRA on a bf16 base (its input cast on, its own dropout module), B made non-zero."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_model_and_tokenizer(str(model_dir), dtype=torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def loss_and_grads(model, ids: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Summed logits of a forward (under bf16 autocast or not) and the adapters' gradients of it."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids).logits.float().sum()
    out.backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_input_kept_in_bf16_is_bit_identical_to_peft_casting_it(tiny_model_dir, autocast):
    """apply_lora turns PEFT's fp32 cast of the adapter input off under autocast (on without): on a bf16 base with
    fp32 adapters, the outputs and gradients equal PEFT's own path bit for bit."""
    torch.manual_seed(0)
    reference = peft_reference(tiny_model_dir)
    base, _ = load_model_and_tokenizer(str(tiny_model_dir), dtype=torch.bfloat16)
    torch.manual_seed(0)
    ours = apply_lora(base, rank=4, alpha=8, dropout=0.0, target_modules="all-linear")
    layers = [m for m in ours.modules() if hasattr(m, "lora_dropout")]
    assert layers and all(type(m.cast_input_dtype_enabled) is CastUnlessAutocast for m in layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layers[0].cast_input_dtype_enabled
    assert layers[0].cast_input_dtype_enabled
    for model in (reference, ours):  # the same non-zero B in both, so the adapters change the output
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(2))
    expected, expected_grads = loss_and_grads(reference, ids, autocast)
    got, grads = loss_and_grads(ours, ids, autocast)
    assert torch.equal(got, expected)
    assert len(grads) == len(expected_grads) and all(map(torch.equal, grads, expected_grads))


def test_dropout_of_a_bf16_input_rounds_once_as_an_fp32_mask_would():
    """In bf16, x * 1/(1-p) is what PEFT's path gave: x cast to fp32, times an fp32 mask, cast back by autocast."""
    x = torch.randn(3, 40, 64).to(torch.bfloat16).requires_grad_()
    layer = SampledGapDropout(p=0.05)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.backward(torch.ones_like(y))
    torch.manual_seed(5)
    mask = torch.full((x.numel(),), 1 / 0.95)
    mask[bernoulli_drop_positions(x.numel(), 0.05)] = 0
    assert torch.equal(y, (x.detach().float() * mask.view(x.shape)).bfloat16())
    assert torch.equal(x.grad, (torch.ones(x.shape) * mask.view(x.shape)).bfloat16())


def test_the_default_models_trainable_counts_match_its_shapes_and_the_readme():
    # The default model built on the meta device (no weights) from its config; the expected counts
    # come from the layer shapes alone: a LoRA of rank r on an (in -> out) linear has r * (in + out).
    config = json.loads((ROOT / "configs" / "smollm2-135m-instruct.json").read_text())
    h, kv, inter = (
        config["hidden_size"],
        config["num_key_value_heads"] * config["head_dim"],
        config["intermediate_size"],
    )
    per_layer_qkv = 16 * ((h + h) + 2 * (h + kv))
    per_layer_rest = 16 * ((h + h) + 2 * (h + inter) + (inter + h))  # o_proj, gate/up_proj, down_proj

    def count(targets: list[str] | str) -> dict:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
            return count_parameters(apply_lora(model, 16, 32, 0.05, targets))

    qkv, every = count(["q_proj", "k_proj", "v_proj"]), count("all-linear")
    assert qkv["trainable"] == config["num_hidden_layers"] * per_layer_qkv
    assert every["trainable"] == config["num_hidden_layers"] * (per_layer_qkv + per_layer_rest)
    # What README and docs/results.md say about them.
    readme, results = (ROOT / "README.md").read_text(), (ROOT / "docs" / "results.md").read_text()
    assert f"{qkv['trainable']:,} trainable of {qkv['total'] / 1e6:.1f}M ({qkv['trainable_pct']:.2f}%)" in readme
    assert f"({every['trainable_pct']:.1f}% of parameters trainable)" in readme
    assert (
        f"{every['trainable']:,} of {every['total']:,} parameters trainable, {every['trainable_pct']:.1f}%" in results
    )
