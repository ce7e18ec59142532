"""Assertions on a trace that say which gradient failed to flow, and why, from the graph."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .model import GradientSummary, MissingGradient, PassInfo, TraceNode, format_values

# Why a parameter is in neither the graph nor the trace's list of leaves without a gradient (which
# names those a .detach() or no_grad cut off).
NOT_IN_GRAPH = "not in the graph that backward went through"
NOT_IN_GRAPH_HINT = ("never used in the traced code, or what it computed left autograd without a trace of it "
                     "(.item(), .numpy(), torch.tensor(...))")

# Operations that pass no gradient where their input was cut off (x <= 0 for relu).
_GATES = {
    "relu": "relu passes gradient only where its input was > 0",
    "relu_": "relu passes gradient only where its input was > 0",
    "threshold": "threshold passes gradient only where its input was above the threshold",
    "relu6": "relu6 passes gradient only where its input was between 0 and 6",
    "hardtanh": "hardtanh passes gradient only where its input was inside its range",
    "clamp": "clamp passes gradient only where its input was inside the bounds",
    "clamp_min": "clamp passes gradient only where its input was above the bound",
    "clamp_max": "clamp passes gradient only where its input was below the bound",
    "clip": "clip passes gradient only where its input was inside the bounds",
}

# Operations whose derivative is infinite or undefined somewhere, and where.
_NONFINITE_HINTS = {
    "sqrt": "the derivative of sqrt(x), 1/(2*sqrt(x)), is infinite at x == 0 (and a zero gradient times it is NaN)",
    "rsqrt": "the derivative of rsqrt(x) is infinite at x == 0",
    "log": "the derivative of log(x), 1/x, is infinite at x == 0; log of a negative number is NaN",
    "log2": "the derivative of log2(x) is infinite at x == 0; log of a negative number is NaN",
    "log10": "the derivative of log10(x) is infinite at x == 0; log of a negative number is NaN",
    "log1p": "the derivative of log1p(x), 1/(1+x), is infinite at x == -1",
    "div": "a division: its gradient divides by the divisor, so a divisor of 0 gives Inf or NaN",
    "true_divide": "a division: its gradient divides by the divisor, so a divisor of 0 gives Inf or NaN",
    "reciprocal": "the derivative of 1/x is infinite at x == 0",
    "pow": "x ** p with p < 1 has an infinite derivative at x == 0",
    "asin": "the derivative of asin(x) is infinite at x == -1 and x == 1",
    "acos": "the derivative of acos(x) is infinite at x == -1 and x == 1",
    "atanh": "the derivative of atanh(x) is infinite at x == -1 and x == 1",
    "norm": "the derivative of a norm, x / norm(x), is NaN where x is all zero",
    "linalg_vector_norm": "the derivative of a norm, x / norm(x), is NaN where x is all zero",
    "dist": "the derivative of a distance is NaN where the two points coincide",
    "cdist": "the derivative of a distance is NaN where the two points coincide",
    "std": "std divides by (n - 1) and by the std itself: NaN for one element or constant input",
    "var": "var divides by (n - 1): NaN for a single element",
    "exp": "exp overflows to Inf for inputs above about 88 (float32)",
    "atan2": "the derivative of atan2(y, x) is NaN at y == x == 0",
}

_EXCERPT_LINES = 40  # a text view up to this long goes into a message whole
_HUGE = 1e12  # a finite gradient this large feeding an overflow is an exploding one


@dataclass
class _Checked:
    """One tensor an assertion looks at: a node of the graph, a leaf without gradient, or neither."""

    name: str
    shape: tuple[int, ...] | None
    node: TraceNode | None = None
    missing: MissingGradient | None = None


@dataclass
class _Group:
    """The tensors one argument of an assertion stands for: a module's parameters, a name, a tensor."""

    label: str
    members: list[_Checked] = field(default_factory=list)
    is_module: bool = False
    note: str | None = None  # said under the failures, when how the argument was resolved matters


@dataclass
class _Failure:
    name: str
    shape: tuple[int, ...] | None
    lines: list[str]  # the first says what is wrong, the others why or where
    refs: set[str] = field(default_factory=set)  # text-view rows worth showing


class TraceChecks:
    """Assertions on a Trace for tests: each raises AssertionError naming what failed and why.

    Mixed into ``Trace``; works from its public data (``nodes``, ``missing``, ``passes``,
    ``grad_history``, ``grad()``, ``text()``), so the messages read the same under pytest and
    outside it.
    """

    nodes: list[TraceNode]
    missing: list[MissingGradient]
    passes: list[PassInfo]
    grad_history: dict[str, list[tuple[int, float]]]

    # -- the assertions ---------------------------------------------------------------------
    def assert_gradients_flow(self, *targets: Any, max_zero_fraction: float | None = None) -> None:
        """Every parameter or tensor given received a finite, non-zero gradient.

        ``targets``: nn.Modules (their parameters that require grad), tensor names (``"x"``,
        ``"model.0.weight"``), leaf tensors, or lists of these; none means every leaf and
        parameter of the trace. (A module path such as ``"model.0"`` is refused: the trace
        knows only the parameters that reached its graph, so pass the module.) Fails naming each tensor that did not and why: no gradient (cut by
        ``.detach()``, used only under ``no_grad``, not in the graph), NaN/Inf, or a gradient
        that is exactly zero (with the operation where it stopped, e.g. a dead ReLU). With
        ``max_zero_fraction``, also fails when more than that fraction of a gradient's
        elements are exactly zero.
        """
        __tracebackhide__ = True  # noqa: F841 (pytest shows the test's line, not this one)
        if max_zero_fraction is not None and not 0 <= max_zero_fraction <= 1:
            raise ValueError(f"max_zero_fraction must be between 0 and 1, not {max_zero_fraction!r}")
        groups = self._resolve(targets)
        members = _unique(m for g in groups for m in g.members)
        if not members:
            raise AssertionError(self._message("nothing to check: the trace has no leaf or parameter", []))
        failures = [f for f in (self._flow_failure(m, max_zero_fraction) for m in members) if f is not None]
        if not failures:
            return
        noun = "parameters" if all(g.is_module for g in groups) else "tensors"
        whose = f" of {groups[0].label}" if len(groups) == 1 else f" ({', '.join(g.label for g in groups)})"
        if not targets:
            noun, whose = "leaves and parameters", " of the trace"
        if len(members) == 1:
            header = f"the gradient did not flow to {members[0].name}:"
        else:
            header = f"gradients did not flow to {len(failures)} of {len(members)} {noun}{whose}:"
        notes = [g.note for g in groups if g.note]
        raise AssertionError(self._message(header, failures, notes))

    def assert_finite(self) -> None:
        """No gradient in the trace holds NaN or Inf.

        Fails naming the first tensor whose gradient was not finite (in the order backward
        computed them), the operation whose backward produced it, its source line, and the
        gradient that fed it; also a NaN/Inf norm in an earlier backward pass of a loop.
        """
        __tracebackhide__ = True  # noqa: F841 (pytest shows the test's line, not this one)
        if not self.passes:
            raise AssertionError(self._message(
                "no gradient to check: backward was never called in the traced code", []))
        failures = []
        origin = next((n for n in self.nodes if n.nonfinite_origin), None)
        if origin is None:  # summaries mark the origin; fall back to the first non-finite gradient
            origin = next((n for n in self.nodes if n.grad is not None and not n.grad.finite), None)
        if origin is not None:
            failures.append(_Failure(origin.label, origin.shape, self._origin_story(origin),
                                     {_ref(origin)} | {_ref(c) for c in self._consumers(origin)}))
        for node in self.nodes:
            if node.leaf_grad is not None and not node.leaf_grad.finite:
                failures.append(_Failure(node.label, node.shape, [
                    f"its .grad is not finite: {_counts(node.leaf_grad)} ({node.leaf_grad_note or 'accumulated'})"],
                    {_ref(node)}))
        shown = {p.index for p in self.passes if p.kept}  # passes whose gradients the nodes show
        for name, norms in self.grad_history.items():
            bad = [(index, norm) for index, norm in norms if not math.isfinite(norm) and index not in shown]
            if bad:
                index, norm = bad[0]
                failures.append(_Failure(name, None, [
                    f"its gradient norm was {format_values(norm)} in backward pass {index + 1} of "
                    f"{len(self.passes)} ({len(bad)} such pass{'es' if len(bad) > 1 else ''}; "
                    f"a loop's earlier passes leave only these norms, not their graph)"], {name}))
        if failures:
            raise AssertionError(self._message("gradients are not finite:", failures))

    def assert_grad_norm(self, *targets: Any, max: float | None = None, min: float | None = None) -> None:
        """The gradient norm of each target lies within ``[min, max]``.

        A module's norm is taken over all its parameters together, as
        ``torch.nn.utils.clip_grad_norm_`` does: sqrt of the sum of their squared norms.
        Targets are given as for ``assert_gradients_flow``; none means each parameter and
        leaf on its own. Fails with the norm, the bound it broke and the largest contributors.
        """
        __tracebackhide__ = True  # noqa: F841 (pytest shows the test's line, not this one)
        if max is None and min is None:
            raise ValueError("assert_grad_norm needs max=, min= or both")
        if max is not None and min is not None and min > max:
            raise ValueError(f"min ({min}) is larger than max ({max})")
        groups = self._resolve(targets)
        if not targets:
            groups = [_Group(m.name, [m]) for m in groups[0].members]
            if not groups:
                raise AssertionError(self._message("nothing to check: the trace has no leaf or parameter", []))
        failures = []
        for group in groups:
            with_grad = [m for m in group.members if m.node is not None and m.node.grad is not None]
            if not with_grad:
                failures.append(_Failure(group.label, None, ["no gradient reached it, so it has no norm"],
                                         {m.name for m in group.members}))
                continue
            total = math.sqrt(sum(m.node.grad.norm ** 2 for m in with_grad))
            if max is not None and not total <= max:
                broke = f"above max={max:g}"
            elif min is not None and not total >= min:
                broke = f"below min={min:g}"
            else:
                continue
            lines = [f"gradient norm {format_values(total)}, {broke}"]
            if len(group.members) > 1:
                ranked = sorted(with_grad, key=lambda m: -m.node.grad.norm if math.isfinite(m.node.grad.norm) else -math.inf)
                for m in ranked[:5]:
                    lines.append(f"{m.name} {_shape(m.shape)}: norm {format_values(m.node.grad.norm)}")
                if len(ranked) > 5:
                    lines.append(f"... and {len(ranked) - 5} more")
                lacking = len(group.members) - len(with_grad)
                if lacking:
                    lines.append(f"({lacking} without a gradient left out)")
            failures.append(_Failure(group.label, None, lines, {m.name for m in with_grad}))
        if failures:
            raise AssertionError(self._message("gradient norms out of bounds:", failures))

    # -- what each argument stands for ------------------------------------------------------
    def _resolve(self, targets: tuple[Any, ...]) -> list[_Group]:
        if not targets:
            entries = self._leaf_entries()
            return [_Group("the trace", _unique(entries.values()))]
        groups: list[_Group] = []
        for target in targets:
            if isinstance(target, str):
                groups.append(self._name_group(target))
            elif isinstance(target, torch.nn.Module):
                groups.append(self._module_group(target))
            elif isinstance(target, torch.Tensor):
                groups.append(self._tensor_group(target))
            elif isinstance(target, Iterable):
                groups.extend(self._resolve(tuple(target)))
            else:
                raise TypeError(f"cannot check {type(target).__name__}: pass an nn.Module, a tensor or a name")
        return groups

    def _leaf_entries(self) -> dict[str, _Checked]:
        """Every leaf and parameter the trace knows, under each of its names."""
        entries: dict[str, _Checked] = {}
        for node in self.nodes:
            if node.kind != "op":
                checked = _Checked(node.label, node.shape, node=node)
                for alias in (node.name, *node.names):
                    if alias:
                        entries.setdefault(alias, checked)
        for missing in self.missing:
            entries.setdefault(missing.name, _Checked(missing.name, missing.shape, missing=missing))
        return entries

    def _name_group(self, name: str) -> _Group:
        __tracebackhide__ = True  # noqa: F841
        entries = self._leaf_entries()
        if name in entries:
            return _Group(name, [entries[name]])
        node = next((n for n in reversed(self.nodes) if n.name == name or name in n.names), None)
        if node is None:  # ``h`` for the last of ``h (1)``, ``h (2)``
            node = next((n for n in reversed(self.nodes) if n.name and n.name.split(" (")[0] == name), None)
        if node is not None:
            return _Group(name, [_Checked(node.label, node.shape, node=node)])
        if any(alias.startswith(name + ".") for alias in entries):
            # A path names only the parameters that reached the graph: the ones a test is
            # after (cut off, never used) would be silently left out.
            raise ValueError(f"{name!r} is a module path, not a tensor: pass the module itself "
                             f"(a trace only knows the parameters of {name!r} that reached its graph)")
        known = ", ".join(sorted({c.name for c in entries.values()})) or "none"
        raise AssertionError(self._message(
            f"nothing named {name!r} took part in this trace (its leaves and parameters: {known})", []))

    def _module_group(self, module: torch.nn.Module) -> _Group:
        """A module's parameters, under the path the trace knows them by (``model.0.weight``).

        The trace names parameters by where they sit in the namespace's modules; the module
        object does not know that path, so it is found by parameter names and shapes. Two
        modules alike (``a`` and ``b``, both ``Linear(4, 4)``) are told apart by their .grad:
        a parameter whose .grad equals the gradient the trace kept is the one in the trace, and
        one with no .grad at all is not the one that got a gradient.
        """
        params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        kind = type(module).__name__
        if not params:
            raise ValueError(f"this {kind} has no parameter that requires grad: nothing to check")
        entries = self._leaf_entries()
        fits: dict[str, set[str]] = {}
        for pname, param in params:
            for alias, checked in entries.items():
                if alias == pname:
                    prefix = ""
                elif alias.endswith("." + pname):
                    prefix = alias[: -len(pname) - 1]
                else:
                    continue
                if checked.shape is None or tuple(checked.shape) == tuple(param.shape):
                    fits.setdefault(prefix, set()).add(pname)
        best = max((len(names) for names in fits.values()), default=0)
        candidates = sorted(prefix for prefix, names in fits.items() if len(names) == best)
        evidence = {prefix: self._grad_evidence(prefix, params, entries) for prefix in candidates}
        rejected = [prefix for prefix in candidates if evidence[prefix] < 0]
        candidates = [prefix for prefix in candidates if evidence[prefix] >= 0]
        if len(candidates) > 1 and any(evidence[prefix] > 0 for prefix in candidates):
            candidates = [prefix for prefix in candidates if evidence[prefix] > 0]
        if len(candidates) > 1:
            paths = " and ".join(repr(c) for c in candidates)
            raise ValueError(f"this {kind} could be {paths} in the trace; name its parameters instead, "
                             f"e.g. assert_gradients_flow({candidates[0] + '.' + params[0][0]!r}, ...)")
        prefix = candidates[0] if candidates else None
        members = []
        for pname, param in params:
            full = f"{prefix}.{pname}" if prefix else pname
            checked = entries.get(full) if prefix is not None else None
            members.append(checked or self._unnamed_leaf(full, param) or _Checked(full, tuple(param.shape)))
        group = _Group(prefix or f"the {kind} given", members, is_module=True)
        unnamed = [n for n in self.nodes if n.kind != "op" and n.name is None]
        if any(m.node is None and m.missing is None for m in members):
            if rejected:
                group.note = (f"{', '.join(rejected)} in the trace has parameters like these that did get "
                              "gradients, but these have no .grad (reset after backward, by zero_grad()?)")
            elif unnamed:
                group.note = (f"the trace has {len(unnamed)} leaves without a name: parameters of a module the "
                              "traced code reached other than through a variable (self.model) are not named")
        return group

    def _unnamed_leaf(self, name: str, param: torch.Tensor) -> _Checked | None:
        """The one unnamed leaf that is this parameter: its gradient is the parameter's .grad (same
        shape and statistics), or, for a parameter without .grad, the only one of its shape without either."""
        shape = tuple(param.shape)
        unnamed = [n for n in self.nodes if n.kind != "op" and n.name is None and n.shape is not None
                   and tuple(n.shape) == shape]
        grad = param.grad
        if grad is None:
            found = [n for n in unnamed if n.grad is None]
        else:
            norm, low, high = float(grad.norm()), float(grad.min()), float(grad.max())
            found = [n for n in unnamed if n.grad is not None and all(
                math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12)
                for a, b in ((n.grad.norm, norm), (n.grad.min, low), (n.grad.max, high)))]
        return _Checked(name, shape, node=found[0]) if len(found) == 1 else None

    def _grad_evidence(self, prefix: str, params: list[tuple[str, torch.Tensor]],
                       entries: dict[str, _Checked]) -> int:
        """+1 if these parameters' .grad equal the trace's gradients under ``prefix``, -1 if they cannot be, else 0."""
        found = 0
        for pname, param in params:
            checked = entries.get(f"{prefix}.{pname}" if prefix else pname)
            node = checked.node if checked is not None else None
            if node is None or node.grad is None:
                continue
            if param.grad is None:
                return -1  # that parameter got a gradient in the trace; this one has none
            if _same_values(self._kept_grad(node.label), param.grad):
                found = 1
        return found

    def _kept_grad(self, name: str) -> torch.Tensor | None:
        try:
            return self.grad(name)
        except (KeyError, LookupError):
            return None

    def _tensor_group(self, tensor: torch.Tensor) -> _Group:
        if not tensor.is_leaf:
            raise ValueError("pass an intermediate tensor by its name (t.names lists them); "
                             "only leaves and parameters can be recognised by their .grad")
        shape = tuple(tensor.shape)
        if tensor.grad is not None:
            for checked in _unique(self._leaf_entries().values()):
                if checked.node is not None and _same_values(self._kept_grad(checked.node.label), tensor.grad):
                    return _Group(checked.name, [checked])
            raise ValueError(f"this tensor {_shape(shape)} has a .grad, but not one from this trace; "
                             "pass its name instead (t.names lists them)")
        # no .grad: not a leaf that got a gradient here; maybe one the trace lists as without one
        without = [m for m in self.missing if tuple(m.shape) == shape]
        if len(without) == 1:
            return _Group(without[0].name, [_Checked(without[0].name, shape, missing=without[0])])
        label = f"a tensor of shape {_shape(shape)}"
        group = _Group(label, [_Checked(label, None)])
        if without:
            group.note = (f"the trace has {len(without)} leaves of shape {_shape(shape)} without a gradient "
                          f"({', '.join(m.name for m in without)}): pass names to say which is meant")
        return group

    # -- why a gradient failed ------------------------------------------------------------------
    def _flow_failure(self, checked: _Checked, max_zero_fraction: float | None) -> _Failure | None:
        name, shape = checked.name, checked.shape

        def fail(*lines: str, refs: Iterable[str] = ()) -> _Failure:
            return _Failure(name, shape, list(lines), {name, *refs})

        if checked.missing is not None:
            missing = checked.missing
            return fail(f"no gradient: {missing.reason}", *([str(missing.source)] if missing.source else []))
        node = checked.node
        if node is None:
            return fail(f"no gradient: {NOT_IN_GRAPH}", NOT_IN_GRAPH_HINT)
        grad = node.grad
        if grad is None:
            reason = node.missing_reason or "no gradient reached it"
            return fail(f"no gradient: {reason}", *([str(node.source)] if node.source else []))
        if not grad.finite:
            lines = [f"gradient not finite ({_counts(grad)})"]
            origin = next((n for n in self.nodes if n.nonfinite_origin), None)
            if origin is not None and origin is not node:
                lines.append(f"the first NaN/Inf of the trace was in the gradient of {origin.label}; "
                             "t.assert_finite() says where it came from")
            elif origin is node:
                lines += self._origin_story(node)[1:]
            return fail(*lines)
        if grad.numel and grad.min == 0 and grad.max == 0:
            return fail(f"gradient exactly zero (all {grad.numel} elements)", *self._why_zero(node),
                        refs=self._zero_refs(node))
        if max_zero_fraction is not None:
            return self._zero_fraction_failure(checked, max_zero_fraction)
        return None

    def _consumers(self, node: TraceNode) -> list[TraceNode]:
        """The tensors computed from ``node`` (the graph keeps only inputs; this is the other way)."""
        nodes = self.nodes
        cached = self.__dict__.get("_checks_consumers")
        if cached is None or cached[0] is not nodes:
            consumers: dict[int, list[TraceNode]] = {}
            for candidate in nodes:
                for input_id in dict.fromkeys(candidate.inputs):
                    consumers.setdefault(input_id, []).append(candidate)
            cached = self.__dict__["_checks_consumers"] = (nodes, consumers)
        return cached[1].get(node.id, [])

    def _zero_boundary(self, node: TraceNode) -> tuple[TraceNode, TraceNode] | None:
        """Follow an all-zero gradient downstream to the op whose output gradient is not zero.

        Returns (the input whose gradient is zero, that op's output).
        """
        seen = {node.id}
        frontier = deque([node])
        while frontier:
            current = frontier.popleft()
            for consumer in self._consumers(current):
                if consumer.id in seen:
                    continue
                seen.add(consumer.id)
                if consumer.grad is not None and _all_zero(consumer.grad):
                    frontier.append(consumer)
                elif consumer.grad is not None:
                    return current, consumer
        return None

    def _why_zero(self, node: TraceNode) -> list[str]:
        boundary = self._zero_boundary(node)
        if boundary is None:
            return ["every tensor computed from it also got a zero gradient (is the loss constant in it?)"]
        zero_input, op = boundary
        where = f"{_named_call(op, self.nodes)}{_at(op)}"
        if op.op in _GATES:
            return [f"the gradient stops at {where}",
                    f"{_GATES[op.op]}, and it was nowhere that mattered (a dead ReLU)"]
        lines = [f"the gradient stops at {where}",
                 f"its output's gradient is not zero (norm {format_values(op.grad.norm)}), "
                 f"but none of it reaches {_ref(zero_input)}"]
        for other_id in op.inputs:
            other = self.nodes[other_id]
            if other.id == zero_input.id or other.op not in _GATES or not other.inputs:
                continue
            gated = self.nodes[other.inputs[0]]
            if gated.grad is not None and _all_zero(gated.grad):
                lines.append(f"what it multiplies, {_named_call(other, self.nodes)}, passed no gradient back "
                             "either: a dead ReLU, whose output is zero wherever it mattered")
        return lines

    def _zero_refs(self, node: TraceNode) -> set[str]:
        boundary = self._zero_boundary(node)
        if boundary is None:
            return set()
        zero_input, op = boundary
        return {_ref(zero_input), _ref(op)} | {_ref(self.nodes[i]) for i in op.inputs}

    def _zero_fraction_failure(self, checked: _Checked, limit: float) -> _Failure | None:
        node = checked.node
        grad = node.grad
        tensor = None
        if grad.min > 0 or grad.max < 0:
            return None
        if node.grad_kept:
            try:
                tensor = self.grad(node.label)
            except LookupError:
                tensor = None
        if tensor is not None:
            zeros = int((tensor == 0).sum())
        elif grad.values is not None:
            flat = _flatten(grad.values)
            zeros = sum(1 for v in flat if v == 0)
        else:
            return _Failure(checked.name, checked.shape, [
                "cannot count the zero elements of its gradient: only its statistics were kept "
                "(it was over the trace's memory budget; raise memory_budget)"], {checked.name})
        fraction = zeros / grad.numel
        if fraction <= limit:
            return None
        lines = [f"{fraction:.0%} of its gradient is exactly zero ({zeros} of {grad.numel} elements), "
                 f"more than max_zero_fraction={limit:g}"]
        if tensor is not None and tensor.dim() == 2:
            dead_rows = int((tensor == 0).all(dim=1).sum())
            if dead_rows:
                lines.append(f"{dead_rows} of {tensor.shape[0]} rows are entirely zero: output units that "
                             "passed back no gradient for this batch (dead ReLU units do this)")
        return _Failure(checked.name, checked.shape, lines, {checked.name})

    def _origin_story(self, origin: TraceNode) -> list[str]:
        """Where the first NaN/Inf gradient came from: the backward that made it, and what fed it."""
        grad = origin.grad
        values = f"{format_values(grad.values)} " if grad.values is not None else ""
        lines = [f"the first NaN/Inf gradient: {values}({_counts(grad)})"]
        consumers = self._consumers(origin)
        if not consumers:
            lines.append("it is where backward started: the gradient given to backward() was not finite")
            return lines
        for consumer in consumers:
            lines.append(f"it came out of the backward of {_named_call(consumer, self.nodes)}{_at(consumer)}")
            if consumer.grad is not None:
                lines.append(f"fed by the gradient of {_ref(consumer)}, which was finite: {consumer.grad.short()}")
                largest = max(abs(consumer.grad.min), abs(consumer.grad.max))
                if consumer.grad.finite and largest > _HUGE:
                    lines.append(f"that gradient was already huge (|g| up to {format_values(largest)}): its product "
                                 "overflowed float32; an exploding gradient (a learning rate too high, no clipping?)")
            others = [self.nodes[i] for i in consumer.inputs if i != origin.id]
            if others:
                lines.append(f"its other inputs: {', '.join(dict.fromkeys(_ref(o) for o in others))}")
            if consumer.op in _NONFINITE_HINTS:
                lines.append(_NONFINITE_HINTS[consumer.op])
        return lines

    def describe_nonfinite(self) -> list[str]:
        """Lines saying where the first NaN/Inf gradient appeared, the backward that made it and what
        fed it (``--stop-on-nan`` stops with these); one line when every gradient is finite."""
        origin = next((n for n in self.nodes if n.nonfinite_origin), None)
        if origin is None:
            origin = next((n for n in self.nodes if n.grad is not None and not n.grad.finite), None)
        if origin is None:
            return ["every gradient the trace keeps is finite"]
        story = self._origin_story(origin)
        shape = f" {_shape(origin.shape)}" if origin.shape is not None else ""
        where = f" ({origin.source})" if origin.source is not None else ""
        return [f"{origin.label}{shape}{where}: {story[0]}", *story[1:]]

    # -- the message ------------------------------------------------------------------------------
    def _message(self, header: str, failures: list[_Failure], notes: Iterable[str] = ()) -> str:
        lines = [header]
        for failure in failures:
            shape = f" {_shape(failure.shape)}" if failure.shape is not None else ""
            lines.append(f"  {failure.name}{shape}: {failure.lines[0]}")
            lines += [f"      {line}" for line in failure.lines[1:]]
        lines += [f"note: {note}" for note in notes]
        refs = set().union(*(f.refs for f in failures)) if failures else set()
        lines.append("what the trace shows:")
        lines += ["  " + line for line in self._excerpt(refs)]
        return "\n".join(lines)

    def _excerpt(self, refs: set[str]) -> list[str]:
        """The text view, or for a big trace its title, section headings and the rows about ``refs``."""
        try:
            text = self.text().splitlines()
        except Exception as error:  # a message must not fail because a view did
            return [f"(text view unavailable: {type(error).__name__}: {error})"]
        if len(text) <= _EXCERPT_LINES:
            return text
        kept: list[str] = [text[0]]
        if len(text) > 1 and text[1].startswith("  the code raised"):
            kept.append(text[1])
        heading: str | None = None
        skipped = False
        for line in text[1:]:
            stripped = line.strip()
            if not line.startswith("  ") or stripped == "no gradient:" or stripped.startswith("name "):
                heading, skipped = line, False
                continue
            if any(stripped == r or stripped.startswith(r + " ") for r in refs):
                if heading is not None:
                    kept.append(heading)
                    heading = None
                elif skipped:
                    kept.append("  …")
                kept.append(line)
                skipped = False
            else:
                skipped = True
        return kept


def _unique(items: Iterable[_Checked]) -> list[_Checked]:
    seen: set[int] = set()
    out = []
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return out


def _ref(node: TraceNode) -> str:
    """How the text view names a tensor: its name, or ``%7`` for an unnamed intermediate."""
    return node.name if node.name is not None else f"%{node.id}"


def _call(node: TraceNode, nodes: list[TraceNode]) -> str:
    return f"{node.op}({', '.join(_ref(nodes[i]) for i in node.inputs)})"


def _named_call(node: TraceNode, nodes: list[TraceNode]) -> str:
    """``s = sqrt(a)``, or ``relu(%4)`` for an unnamed result."""
    call = _call(node, nodes)
    return f"{node.name} = {call}" if node.name is not None else call


def _at(node: TraceNode) -> str:
    return f" at {node.source}" if node.source else ""


def _shape(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return ""
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _counts(grad: GradientSummary) -> str:
    """``1 NaN of 2 elements``, ``1 NaN and 3 Inf of 8 elements``."""
    parts = [f"{count} {kind}" for count, kind in ((grad.nan_count, "NaN"), (grad.inf_count, "Inf")) if count]
    return f"{' and '.join(parts) or 'no NaN or Inf'} of {grad.numel} element{'s' if grad.numel != 1 else ''}"


def _all_zero(grad: GradientSummary) -> bool:
    return grad.finite and grad.min == 0 and grad.max == 0


def _same_values(kept: torch.Tensor | None, grad: torch.Tensor) -> bool:
    """Whether the gradient a trace kept is this .grad: the same tensor, or one equal to it."""
    if kept is None:
        return False
    if kept is grad:
        return True
    if kept.shape != grad.shape or kept.dtype != grad.dtype or kept.device != grad.device or kept.is_meta:
        return False
    try:
        return bool(torch.isclose(kept, grad, rtol=0, atol=0, equal_nan=True).all())
    except (RuntimeError, TypeError):  # dtypes isclose does not take (bool, sparse)
        return bool(torch.equal(kept, grad))


def _flatten(values: Any) -> list[float]:
    if isinstance(values, list):
        return [v for item in values for v in _flatten(item)]
    return [values]
