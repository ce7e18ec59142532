"""The assignment instrumenter: which bindings pass through the binder, and line numbers kept."""

from __future__ import annotations

import ast

import pytest

from torchmagic.assignments import LAST_EXPRESSION, BindDispatcher, dispatch, instrument


@pytest.fixture
def binders():
    """The process-wide dispatcher's binders for one test, emptied afterwards."""
    yield dispatch.binders
    dispatch.binders.clear()
    dispatch.errors.clear()


def run(code: str, binders: dict, namespace: dict | None = None):
    seen = []

    def binder(name, value):
        seen.append((name, value))
        return value

    binders["trace"] = binder
    namespace = {} if namespace is None else namespace
    exec(compile(instrument(ast.parse(code)), "<cell>", "exec"), namespace)
    return seen, namespace


def test_every_kind_of_cell_level_binding(binders):
    seen, _ = run(
        "a = 1\nb, (c, *d) = 2, (3, 4, 5)\na += 1\ne: int = 6\nfor f in [7]:\n    g = f\n"
        "with open(__file__ if False else '/dev/null') as h:\n    pass\nif True:\n    i = 8\n"
        "try:\n    j = 9\nexcept Exception:\n    pass\nwhile True:\n    k = 10\n    break\nobj = {}\nobj['x'] = 1",
        binders,
    )
    assert [name for name, _ in seen] == ["a", "b", "c", "d", "a", "e", "f", "g", "h", "i", "j", "k", "obj"]


def test_function_and_class_bodies_are_left_alone(binders):
    seen, ns = run("def f():\n    inner = 1\n    return inner\nclass C:\n    attr = 2\nr = f()", binders)
    assert [name for name, _ in seen] == ["r"]


def test_binder_return_value_is_what_later_lines_see(binders):
    binders["tensor"] = lambda name, value: value * 10 if isinstance(value, int) else value
    namespace = {}
    exec(compile(instrument(ast.parse("a = 1\nb = a + 1")), "<cell>", "exec"), namespace)
    assert namespace["a"] == 10 and namespace["b"] == 110


def test_the_hook_needs_no_name_in_the_namespace(binders):
    """What `%reset` and `del` can take away is the namespace: the instrumented code does not depend on it."""
    seen, namespace = run("a = 1\ndel a\nb = 2", binders)
    assert [name for name, _ in seen] == ["a", "b"]
    assert not [key for key in namespace if "torchmagic" in key]


def test_last_expression_passes_through_and_lines_are_kept():
    tree = instrument(ast.parse("x = 1\n\nx + 1"))
    last = tree.body[-1]
    assert isinstance(last, ast.Expr) and last.lineno == 3
    assert last.value.args[0].value == LAST_EXPRESSION
    assert all(stmt.lineno in (1, 3) for stmt in tree.body)


def test_dispatcher_runs_conversion_before_tracing():
    order = []
    dispatcher = BindDispatcher()
    dispatcher.binders["trace"] = lambda n, v: order.append("trace") or v
    dispatcher.binders["tensor"] = lambda n, v: order.append("tensor") or v
    dispatcher("a", 1)
    assert order == ["tensor", "trace"]


def test_a_failing_binder_leaves_the_value_and_is_kept_for_the_report():
    dispatcher = BindDispatcher()
    dispatcher.binders["tensor"] = lambda n, v: 1 / 0
    dispatcher.binders["trace"] = lambda n, v: v
    assert dispatcher("a", 5) == 5
    ((binder, name, error),) = dispatcher.errors
    assert (binder, name, type(error)) == ("tensor", "a", ZeroDivisionError)
