"""Instrument a cell's own assignments so each value it binds passes through a callback.

After every statement at cell level that binds plain names (``a = ...``, ``a, b = ...``,
``a += ...``, ``a: T = ...``, ``for a in ...``, ``with ... as a``, ``except E as a`` is left
alone), a statement ``a = __import__('torchmagic.assignments').assignments.dispatch('a', a)``
is inserted with the original statement's line number, so tracebacks and line numbers stay
the user's own. The call reaches ``dispatch`` through the import system, not through a name
in the cell's namespace, so ``%reset``, ``del`` or a rebinding in the user's namespace cannot
take it away. The callback sees the value at the moment it is bound: later lines of the cell
already see whatever it returns. Bodies of functions and classes defined in the cell are not
touched: they run later, outside the cell.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from typing import Any

LAST_EXPRESSION = "<last expression>"  # the name binders see for the cell's displayed value

Binder = Callable[[str, Any], Any]


def _target_names(target: ast.expr) -> Iterator[str]:
    """Plain names bound by an assignment target, in source order."""
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from _target_names(element)
    elif isinstance(target, ast.Starred):
        yield from _target_names(target.value)
    # attributes and subscripts (obj.x = ..., d[k] = ...) bind no name


def _dispatch_call(args: list[ast.expr]) -> ast.Call:
    """``__import__('torchmagic.assignments').assignments.dispatch(*args)``.

    ``__import__`` is a builtin (IPython's ``%reset`` keeps builtins) and returns the package
    from ``sys.modules``: about 0.1 us more than a global name lookup.
    """
    package = ast.Call(func=ast.Name(id="__import__", ctx=ast.Load()), args=[ast.Constant(value=__name__)], keywords=[])
    module = ast.Attribute(value=package, attr=__name__.rpartition(".")[2], ctx=ast.Load())
    return ast.Call(func=ast.Attribute(value=module, attr="dispatch", ctx=ast.Load()), args=args, keywords=[])


def _bind_statements(names: list[str], where: ast.AST) -> list[ast.stmt]:
    statements = []
    for name in dict.fromkeys(names):  # a, a = 1, 2 binds `a` once
        call = _dispatch_call([ast.Constant(value=name), ast.Name(id=name, ctx=ast.Load())])
        statement = ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())], value=call)
        statements.append(ast.fix_missing_locations(ast.copy_location(statement, where)))
        for node in ast.walk(statement):
            ast.copy_location(node, where)
    return statements


class AssignmentInstrumenter(ast.NodeTransformer):
    """An IPython AST transformer (and a plain one) that inserts the bind calls."""

    def visit_FunctionDef(self, node: ast.AST) -> ast.AST:
        return node

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_ClassDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def _instrument_body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        result: list[ast.stmt] = []
        for statement in body:
            statement = self.visit(statement)
            result.append(statement)
            names: list[str] = []
            if isinstance(statement, ast.Assign):
                for target in statement.targets:
                    names.extend(_target_names(target))
            elif isinstance(statement, (ast.AugAssign, ast.AnnAssign)):
                if statement.value is not None or isinstance(statement, ast.AugAssign):
                    names.extend(_target_names(statement.target))
            if names:
                result.extend(_bind_statements(names, statement))
        return result

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
                setattr(node, field, self._instrument_body(body))
        if isinstance(node, (ast.For, ast.AsyncFor)):
            names = list(_target_names(node.target))
            if names:
                node.body = _bind_statements(names, node) + node.body
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            names = [n for item in node.items if item.optional_vars is not None
                     for n in _target_names(item.optional_vars)]
            if names:
                node.body = _bind_statements(names, node) + node.body
        elif isinstance(node, (ast.Try, ast.TryStar)):
            for handler in node.handlers:
                handler.body = self._instrument_body(handler.body)
        elif isinstance(node, ast.Match):
            for case in node.cases:
                case.body = self._instrument_body(case.body)
        return node

    def visit_Module(self, node: ast.Module) -> ast.Module:
        node.body = self._instrument_body(node.body)
        last = node.body[-1] if node.body else None
        if isinstance(last, ast.Expr):
            # the cell's last expression is shown as Out[N]: it passes through the binders too
            call = _dispatch_call([ast.Constant(value=LAST_EXPRESSION), last.value])
            last.value = ast.copy_location(call, last.value)
            for child in ast.walk(call):
                if not hasattr(child, "lineno"):
                    ast.copy_location(child, last.value)
        return node


def instrument(tree: ast.Module) -> ast.Module:
    """Return ``tree`` with bind calls after each cell-level assignment."""
    return ast.fix_missing_locations(AssignmentInstrumenter().visit(tree))


class BindDispatcher:
    """Runs each active binder in turn on a value the cell binds.

    Binders are added and removed by name (``"tensor"``, ``"trace"``); with none active the
    value passes through unchanged, so a cell compiled while one was on still runs. A binder
    that raises leaves the value as it was and never breaks the user's cell: the first error
    is kept in ``errors`` for whoever installed the binder to report.
    """

    ORDER = ("tensor", "trace")  # convert first, so the trace sees the tensor the cell will see

    def __init__(self) -> None:
        self.binders: dict[str, Binder] = {}
        self.errors: list[tuple[str, str, Exception]] = []  # (binder, bound name, error)

    def __call__(self, name: str, value: Any) -> Any:
        for key in self.ORDER:
            binder = self.binders.get(key)
            if binder is not None:
                try:
                    value = binder(name, value)
                except Exception as error:  # noqa: BLE001 - reported after the cell, value untouched
                    if len(self.errors) < 10:
                        self.errors.append((key, name, error))
        return value


dispatch = BindDispatcher()
"""The one dispatcher that instrumented code calls (one IPython shell per process, like IPython's own)."""
