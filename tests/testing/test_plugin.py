"""The plugin as a user gets it: pytest run on a fresh folder holding one test file and no conftest."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SETUP = '''
    import torch
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(8, 4)
'''

USER_TESTS = f'''
SETUP = """{SETUP}"""


def test_healthy_model(torchmagic_shell):
    torchmagic_shell.run(SETUP)
    t = torchmagic_shell.trace("""
        loss = model(x).pow(2).mean()
        loss.backward()
    """)
    t.assert_gradients_flow(torchmagic_shell.ns["model"])


def test_first_layer_detached(torchmagic_shell):
    torchmagic_shell.run(SETUP)
    t = torchmagic_shell.trace("""
        h = model[0](x)
        h = h.detach()
        loss = model[2](torch.relu(h)).pow(2).mean()
        loss.backward()
    """)
    t.assert_gradients_flow(torchmagic_shell.ns["model"])


def test_sqrt_finite(torchmagic_shell):
    t = torchmagic_shell.trace("""
        import torch
        a = torch.tensor([1.0, 4.0], requires_grad=True)
        y = (torch.sqrt(a) * 0).sum()
        y.backward()
    """)
    t.assert_finite()


def test_sqrt_of_zero(torchmagic_shell):
    t = torchmagic_shell.trace("""
        import torch
        a = torch.tensor([0.0, 1.0], requires_grad=True)
        y = (torch.sqrt(a) * 0).sum()
        y.backward()
    """)
    t.assert_finite()
'''


def run_user_tests(pytester: pytest.Pytester) -> pytest.RunResult:
    """A new process, as a user runs pytest: the plugin must come from the installed entry point."""
    pytester.makepyfile(test_user_model=USER_TESTS)
    assert sorted(p.name for p in pytester.path.iterdir()) == ["test_user_model.py"]  # no conftest
    return pytester.runpytest_subprocess("-p", "no:cacheprovider")


def test_fixture_found_detached_layer_and_nan_reported_healthy_versions_pass(pytester: pytest.Pytester):
    result = run_user_tests(pytester)
    result.assert_outcomes(passed=2, failed=2)
    outcomes = {line.split(" - ")[0] for line in result.stdout.lines if line.startswith("FAILED")}
    assert outcomes == {"FAILED test_user_model.py::test_first_layer_detached",
                        "FAILED test_user_model.py::test_sqrt_of_zero"}
    out = result.stdout.str()
    assert "fixture 'torchmagic_shell' not found" not in out
    # the detached layer: both of its parameters named, the rest of the model not
    result.stdout.fnmatch_lines([
        "E*AssertionError: gradients did not flow to 2 of 4 parameters of model:",
        "E*  model.0.weight (16, 4): no gradient: *",
        "*",
        "E*  model.0.bias (16,): no gradient: *",
    ])
    # the NaN: sqrt, at its line of the traced cell (the magic is line 1)
    result.stdout.fnmatch_lines([
        "E*AssertionError: gradients are not finite:",
        "E*  a (2,): the first NaN/Inf gradient: [[]nan, 0[]] (1 NaN of 2 elements)",
        "E*      it came out of the backward of sqrt(a) at In [[]1[]], line 4: y = (torch.sqrt(a) * 0).sum()",
    ])
    # pytest shows the user's line, not the assertion's insides
    assert ">       t.assert_finite()" in out and "def assert_finite" not in out


def test_detached_layer_message_names_the_detach_and_its_line(pytester: pytest.Pytester):
    out = run_user_tests(pytester).stdout.str()
    assert "E         model.0.weight (16, 4): no gradient: cut off by .detach()" in out
    assert "E             In [2], line 3: h = h.detach()" in out  # the setup cell is In [1]


def readme_test_file() -> str:
    """The test file the README offers to copy, from its "Testing your model with pytest" section."""
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Testing your model with pytest", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_test_file_passes_as_a_user_would_run_it(pytester: pytest.Pytester):
    pytester.makepyfile(test_gradients=readme_test_file())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
