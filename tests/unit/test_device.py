"""Device parsing, defaults and all-or-nothing moves, tested on the meta device (CUDA paths skip on CPU)."""

from __future__ import annotations

import pytest
import torch

from torchmagic import device as devices
from torchmagic.errors import DeviceError

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
    report = devices.move_namespace(ns, "meta")
    assert [m.name for m in report.moved] == ["model", "optimizer", "leaf", "plain"]
    assert ns["leaf"].is_leaf and ns["leaf"].requires_grad and ns["leaf"].device.type == "meta"
    assert model.weight is weight and weight.device.type == "meta" and weight.grad.device.type == "meta"
    assert optimizer.param_groups[0]["params"][0] is model.weight
    assert optimizer.state[model.weight]["momentum_buffer"].device.type == "meta"
    assert ("w", "a module parameter: moved with its module") in report.skipped
    assert "plain                tensor" in report.text()


class _Exploding(torch.nn.Module):
    """A module whose second tensor cannot be allocated on the target."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(2))
        self.b = torch.nn.Parameter(torch.ones(2))


def test_a_failure_part_way_leaves_the_object_wholly_where_it_was(monkeypatch):
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
    report = devices.move_namespace(ns, "meta")
    monkeypatch.undo()
    assert report.failed and report.failed[0][0] == "module" and "out of memory" in report.failed[0][1]
    assert {p.device.type for p in module.parameters()} == {"cpu"}  # wholly on the old device
    assert [m.name for m in report.moved] == ["other"] and ns["other"].device.type == "meta"


@cuda
def test_cuda_round_trip():
    t = torch.ones(3, requires_grad=True)
    ns = {"t": t}
    devices.move_namespace(ns, "cuda")
    assert ns["t"].is_cuda and ns["t"].is_leaf
    devices.move_namespace(ns, "cpu")
    assert ns["t"].device.type == "cpu"
