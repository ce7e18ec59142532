"""Shared fixtures: every test must leave torch as it found it."""

from __future__ import annotations

import gc
import signal
import warnings

import pytest
import torch
from torch.nn.modules import module as nn_module

from torchmagic.assignments import dispatch
from torchmagic.trace.recorder import recorders_holding_state

GLOBAL_MODULE_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_forward_hooks_always_called",
                       "_global_backward_pre_hooks", "_global_backward_hooks")


def torch_state() -> dict:
    """What a test could leave behind in torch: modes, the default device, global module hooks, grad mode,
    and the recorder's wrappers of the backward engine and of autograd.Function.apply."""
    state = {
        "function modes": torch._C._len_torch_function_stack(),
        "default device": torch.get_default_device(),
        "grad enabled": torch.is_grad_enabled(),
        "engine": (torch.autograd.graph._engine_run_backward, torch.autograd._engine_run_backward),
        "Function.apply": torch.autograd.function.Function.__dict__["apply"],
        "will_engine_execute_node": torch._C._will_engine_execute_node,
    }
    state.update({name: len(getattr(nn_module, name)) for name in GLOBAL_MODULE_HOOKS})
    return state


def process_state() -> dict:
    """And in the process: the assignment hook's binders, the SIGINT handler, our warnings filter."""
    ours = sum(1 for entry in warnings.filters if entry[1] is not None and "global hooks on modules" in entry[1].pattern)
    return {"binders": sorted(dispatch.binders), "SIGINT handler": signal.getsignal(signal.SIGINT),
            "warnings filters": ours}


@pytest.fixture(autouse=True)
def leaves_no_trace():
    """No torch mode on the stack, no global module hook, no recorder holding state, device and handlers unchanged."""
    before = torch_state()
    assert before["function modes"] == 0, "a torch function mode was left on the stack before this test"
    before_process = process_state()
    yield
    assert torch_state() == before, f"torch state leaked: before {before}, after {torch_state()}"
    assert process_state() == before_process, f"leaked: before {before_process}, after {process_state()}"
    if recorders_holding_state():
        gc.collect()  # a test's caught exception keeps its frames (and a trace's recorder) in a cycle
    assert recorders_holding_state() == [], "a trace recorder is still active or holds gradients"
