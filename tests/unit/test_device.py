"""Device parsing, defaults and all-or-nothing moves, tested on the meta device (CUDA paths skip on CPU)."""

from __future__ import annotations

import pytest
import torch

from torchmagic import device as devices
from torchmagic.errors import DeviceError, MoveError
from torchmagic.move import move_namespace

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")


def test_parse_specs():
    assert devices.parse_device("cpu") == torch.device("cpu")
    assert devices.parse_device(" META ") == torch.device("meta")
    assert devices.parse_device("auto").type in ("cuda", "mps", "cpu")


@pytest.mark.parametrize("spec, message", [("gpu", "unknown device 'gpu'"), ("xla", "unsupported device"),
                                            ("cpu:3", "there is no 'cpu:3'")])
def test_bad_specs_name_the_available_devices(spec, message):
    with pytest.raises(DeviceError, match=message) as info:
        devices.parse_device(spec)
    assert "available here: cpu" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_unavailable_is_a_clear_error():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        devices.parse_device("cuda:0")


def test_default_device_context_restores_even_on_error():
    with pytest.raises(RuntimeError):
        with devices.default_device("meta"):
            assert torch.ones(1).device.type == "meta"
            raise RuntimeError("boom")
    assert torch.get_default_device() == torch.device("cpu")


def test_describe_without_gpu_says_so():
    text = devices.describe().text()
    assert "default device  cpu" in text
    if not torch.cuda.is_available():
        assert "no CUDA device available" in text


def test_move_keeps_leaves_leaves_and_modules_with_their_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 2)).sum().backward()
    optimizer.step()
    weight = model.weight
    leaf = torch.ones(2, requires_grad=True)
    plain = torch.zeros(3)
    ns = {"model": model, "optimizer": optimizer, "leaf": leaf, "plain": plain, "w": model.weight, "n": 3}
    report = move_namespace(ns, "meta")
    assert [m.name for m in report.moved] == ["model", "leaf", "plain", "optimizer"]
    assert ns["leaf"].is_leaf and ns["leaf"].requires_grad and ns["leaf"].device.type == "meta"
    assert model.weight is weight and weight.device.type == "meta" and weight.grad.device.type == "meta"
    assert optimizer.param_groups[0]["params"][0] is model.weight
    assert optimizer.state[model.weight]["momentum_buffer"].device.type == "meta"
    assert ("w", "part of a module: moved with it") in report.skipped
    assert "plain                tensor" in report.text()


class _Exploding(torch.nn.Module):
    """A module whose second tensor cannot be allocated on the target."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(2))
        self.b = torch.nn.Parameter(torch.ones(2))


def test_a_failure_anywhere_leaves_everything_where_it_was(monkeypatch):
    module = _Exploding()
    other = torch.ones(2)
    real_to = torch.Tensor.to
    calls = {"n": 0}

    def flaky_to(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", flaky_to)
    ns = {"module": module, "other": other}
    with pytest.raises(MoveError, match="module: RuntimeError: CUDA out of memory"):
        move_namespace(ns, "meta")
    monkeypatch.undo()
    assert {p.device.type for p in module.parameters()} == {"cpu"}
    assert ns["other"] is other and other.device.type == "cpu"


def test_a_failure_while_swapping_undoes_the_swaps_already_made(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    weight, bias = model.weight, model.bias
    w = torch.ones(2, requires_grad=True)
    ns = {"model": model, "w": w}
    real_swap = torch.utils.swap_tensors
    calls = {"n": 0}

    def flaky_swap(a, b):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("cannot swap (simulated)")
        real_swap(a, b)

    monkeypatch.setattr(torch.utils, "swap_tensors", flaky_swap)
    with pytest.raises(MoveError, match="every swap was undone"):
        move_namespace(ns, "meta")
    monkeypatch.undo()
    assert model.weight is weight and model.bias is bias
    assert weight.device.type == "cpu" and bias.device.type == "cpu" and ns["w"] is w


def test_an_optimizer_over_a_bare_tensor_follows_it():
    w = torch.ones(3, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    (w * 2).sum().backward()
    optimizer.step()
    ns = {"w": w, "alias": w, "opt": optimizer}
    report = move_namespace(ns, "meta")
    moved = ns["w"]
    assert moved.device.type == "meta" and moved.is_leaf and moved.requires_grad
    assert ns["alias"] is moved  # one tensor under two names stays one tensor
    assert optimizer.param_groups[0]["params"][0] is moved
    assert list(optimizer.state) == [moved] and optimizer.state[moved]["momentum_buffer"].device.type == "meta"
    assert "opt" in [m.name for m in report.moved]


def test_an_optimizer_parameter_the_namespace_does_not_reach_is_reported():
    hidden = torch.ones(2, requires_grad=True)
    ns = {"opt": torch.optim.SGD([hidden], lr=0.1)}
    report = move_namespace(ns, "meta")
    assert hidden.device.type == "cpu"
    assert report.skipped and "spans two devices" in report.skipped[0][1]


@cuda
def test_cuda_round_trip():
    t = torch.ones(3, requires_grad=True)
    ns = {"t": t}
    move_namespace(ns, "cuda")
    assert ns["t"].is_cuda and ns["t"].is_leaf
    move_namespace(ns, "cpu")
    assert ns["t"].device.type == "cpu"
