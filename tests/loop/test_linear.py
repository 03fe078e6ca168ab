"""eagle2.linear: the skinny twin the decode loop runs a model as (its nn.Linear layers on
skinny_linear, everything else the model's own, the model itself untouched)."""
import torch
from loop_helpers import tiny_target
from torch import nn

import eagle2_kernels
from eagle2.linear import SkinnyLinear, blas_linears, linear, skinny_twin


def test_twin_shares_the_weights_and_leaves_the_model_as_it_was():
    model = tiny_target().float()
    twin = skinny_twin(model)
    assert twin is not model
    assert all(a is b for a, b in zip(model.parameters(), twin.parameters()))
    assert all(a is b for a, b in zip(model.buffers(), twin.buffers()))
    assert twin.config is model.config
    assert {type(m) for m in model.modules()} & {SkinnyLinear} == set()
    kinds = [(type(a), type(b)) for a, b in zip(model.modules(), twin.modules())]
    assert (nn.Linear, SkinnyLinear) in kinds and all(b is SkinnyLinear or a is b for a, b in kinds)
    with torch.no_grad():  # in-place weight changes show through
        model.lm_head.weight.mul_(2)
    assert torch.equal(twin.lm_head.weight, model.lm_head.weight)


def test_twin_runs_its_linears_on_skinny_linear_and_computes_the_same_model():
    model = tiny_target().float().eval()
    twin = skinny_twin(model)
    x = torch.randn(1, 5, model.config.hidden_size)
    linears = [m for m in twin.modules() if isinstance(m, SkinnyLinear)]
    assert linears and all(m.plan is not None and m.plan.weight is m.weight for m in linears)
    with torch.inference_mode():
        assert torch.equal(twin.lm_head(x), eagle2_kernels.skinny_linear(x, model.lm_head.weight))
        with blas_linears():
            assert torch.equal(twin.lm_head(x), torch.nn.functional.linear(x, model.lm_head.weight))
        ids = torch.randint(3, 160, (1, 12))
        torch.testing.assert_close(twin(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert torch.is_grad_enabled()
    y = linear(x, model.lm_head.weight)  # with autograd: the BLAS, differentiable
    assert y.requires_grad


def test_hooks_installed_on_the_twin_stay_off_the_model():
    """transformers installs output-capturing hooks on first use (hidden states, which EAGLE-3
    heads read); those the twin gets must not fire again in the user's own forwards."""
    model = tiny_target().float().eval()
    twin = skinny_twin(model)
    ids = torch.randint(3, 160, (1, 6))
    with torch.inference_mode():
        twin(ids, output_hidden_states=True)
        out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


def test_float64_and_other_devices_keep_the_model():
    model = tiny_target()  # float64: skinny_linear has no float64 kernel, linear falls back
    x = torch.randn(2, model.config.hidden_size, dtype=torch.float64)
    with torch.inference_mode():
        assert torch.equal(skinny_twin(model).lm_head(x), model.lm_head(x))
    assert skinny_twin(None) is None


def test_twin_follows_a_model_converted_after_it():
    """model.half() replaces each parameter's data in place: the twin's linears (their plans
    were checked in float32) compute the converted layer."""
    model = tiny_target().float().eval()
    twin = skinny_twin(model)
    model.half()
    x = torch.randn(2, model.config.hidden_size, dtype=torch.float16)
    with torch.inference_mode():
        assert torch.equal(twin.lm_head(x), eagle2_kernels.skinny_linear(x, model.lm_head.weight))


def test_twin_follows_a_parameter_replaced_after_it():
    """The twin shares the modules' parameter dictionaries: a layer whose weight was replaced
    (weights tied or swapped after the twin was made) computes with the new one, not its plan's."""
    model = tiny_target().float().eval()
    twin = skinny_twin(model)
    model.lm_head.weight = nn.Parameter(torch.randn_like(model.lm_head.weight))
    x = torch.randn(2, model.config.hidden_size)
    with torch.inference_mode():
        assert torch.equal(twin.lm_head(x), eagle2_kernels.skinny_linear(x, model.lm_head.weight))
