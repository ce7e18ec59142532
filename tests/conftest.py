"""Shared fixtures: every test must leave torch as it found it."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.nn.modules import module as nn_module

from torchmagic.trace.recorder import recorders_holding_state


def _torch_state():
    return (
        torch._C._len_torch_function_stack(),
        torch.get_default_device(),
        len(nn_module._global_forward_pre_hooks),
        len(nn_module._global_forward_hooks),
        torch.is_grad_enabled(),
        torch.autograd.graph._engine_run_backward,  # the recorder's engine wrapper is gone
        torch.autograd._engine_run_backward,
        torch.autograd.function.Function.__dict__["apply"],  # and so is its apply wrapper
    )


@pytest.fixture(autouse=True)
def leaves_no_trace():
    """No torch mode on the stack, no global module hook, no recorder holding state, device unchanged."""
    before = _torch_state()
    assert before[0] == 0, "a torch function mode was left on the stack before this test"
    yield
    after = _torch_state()
    assert after == before, f"torch state leaked: before {before}, after {after}"
    if recorders_holding_state():
        gc.collect()  # a test's caught exception keeps its frames (and a trace's recorder) in a cycle
    assert recorders_holding_state() == [], "a trace recorder is still active or holds gradients"
