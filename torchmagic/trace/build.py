"""Turn what a Recorder saw into a Trace's data: walk the graph once, attribute and name each node, attach gradients.

The graph drawn is the union of the graphs of each call site's last backward pass, plus graphs the
traced code built and kept in a variable without calling backward. A node is attributed to the
torch call, module call and line that made it by its autograd sequence number (``forward.py``);
its gradient is the one the latest pass that reached it computed.
"""

from __future__ import annotations

import functools
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .backward import ACCUMULATE_GRAD, HOOK_WRAPPER, PassRecord, post_order
from .forward import ForwardLog, Location, op_name
from .model import MissingGradient, PassInfo, SourceLine, TraceNode
from .naming import Labeler, NamespaceNames, source_line
from .recorder import Recorder
from .stats import NormOnly, PendingSummary

NOT_CALLED = "backward not called yet"
NOT_REACHABLE = "not reachable from the output"
NO_GRAD = "used only under torch.no_grad()"
DETACHED = "used only through .detach()"
CHANGED_IN_PLACE = ("its gradient was kept without a copy, as the memory of a leaf's .grad or of a gradient "
                    "the code was handed (autograd.grad), which code the trace did not see changed in place; "
                    "a leaf's norm per pass was taken before")
VIEW_REGENERATED = ("a view of {base}, changed in place after the view was made (an optimizer step?): PyTorch "
                    "gave the view a new grad_fn, so whether it is the graph's {could_be} is not known")
PASS_THROUGH = frozenset({HOOK_WRAPPER, "AliasBackward0"})  # identity nodes drawn as the edge they pass on
RECENT_LOGS = 4  # forward logs kept per thread, so a later cell's backward can name an earlier cell's ops
CUT_WALK_LIMIT = 20_000  # nodes walked, in all, to find the leaves a detach cut off

_recent_logs: dict[int, deque[ForwardLog]] = {}


def remember_log(log: ForwardLog) -> None:
    """Keep ``log`` for a while: a graph built now may get its backward in a later recording."""
    logs = _recent_logs.setdefault(log.thread, deque(maxlen=RECENT_LOGS))
    if not logs or logs[-1] is not log:
        logs.append(log)


def forget_logs() -> None:
    _recent_logs.clear()


def node_op_name(node: Any) -> str:
    """Op name from an autograd node's type: ``LogSoftmaxBackward0`` -> ``log_softmax``; a custom
    ``autograd.Function`` keeps its class name."""
    name = type(node).__name__
    if name == "AccumulateGrad":
        return "leaf"
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        return name.removesuffix("Backward")
    for suffix in ("Backward0", "Backward1", "Backward"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


# Ops whose backward node lists its inputs in another order than the call's arguments:
# F.linear(x, w, b) records AddmmBackward0(b, x, w.t()).
_ARGUMENT_ORDER = {("linear", "AddmmBackward0"): (1, 2, 0)}


@functools.lru_cache(maxsize=64)
def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=64)
def _device_name(device: torch.device | None) -> str | None:
    return None if device is None else str(device)


class _Attribution:
    """Per forward log: module-call segments, computed once."""

    def __init__(self, log: ForwardLog) -> None:
        self.log = log
        self.starts, self.stacks = log.module_calls()

    def calls_at(self, seq: int) -> tuple:
        k = bisect_right(self.starts, seq) - 1
        return self.stacks[k] if k >= 0 else ()


class _Recomputed:
    """The attribution of a node made during backward (reentrant checkpoint's recomputation): its
    module calls are known, but the lines and torch calls noted then are not its own."""

    def __init__(self, attribution: _Attribution) -> None:
        self.log = _NoOps()
        self.calls_at = attribution.calls_at


class _NoOps:
    @staticmethod
    def op_at(seq: int) -> None:
        return None

    @staticmethod
    def location_at(seq: int) -> None:
        return None


class Builder:
    """One build: a sequence of named steps over the recorder's passes and forward log."""

    def __init__(self, recorder: Recorder, namespace: Mapping[str, Any] | None, labeler: Labeler | None,
                 extra_roots: Sequence[Any]) -> None:
        self.recorder = recorder
        self.names = NamespaceNames(namespace)
        self.labeler = labeler
        self.extra_roots = [t for t in extra_roots if issubclass(type(t), torch.Tensor)]
        log = recorder.log
        self.attributions = [_Attribution(log)] + [_Attribution(old) for old in reversed(_recent_logs.get(log.thread, ()))
                                                    if old is not log]
        self.lines: dict[Location | None, SourceLine | None] = {}
        self.kept = [p for p in recorder.passes if p.kept]

    # -- the steps ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        roots = self.roots()
        nexts = self.adjacency()
        order = post_order([node for node, _ in roots], nexts)
        self.failed_reach: dict[int, PassRecord] = {}  # id(leaf) -> a pass that raised with it in its graph
        for record in self.kept:
            if record.failed:
                for node in post_order([node for node, _ in record.roots if node is not None], nexts):
                    if type(node) is ACCUMULATE_GRAD:
                        self.failed_reach.setdefault(id(node.variable), record)
        alias = self.hook_wrappers(order, nexts)
        roots = list(dict.fromkeys(alias.get(edge, edge) for edge in roots))
        gradients = self.gradients(alias)
        seqs = {node: node._sequence_nr() for node in order if type(node) is not ACCUMULATE_GRAD}
        edge_names = self.edge_names(order, seqs, alias)
        recomputed = self.recomputed(nexts)
        nodes, data = self.make_nodes(order, nexts, alias, roots, gradients, seqs, edge_names, recomputed)
        calls = data.pop("calls")
        module_calls = self.resolve_scopes(nodes, calls)
        _label_rebound_names(nodes)
        _assign_modules(nodes)
        data.update(
            nodes=nodes,
            missing=self.missing(data.pop("in_graph")) + self.lost_views(nodes),
            passes=self.pass_infos(edge_names),
            grad_history=self.history(),
            op_count=self.recorder.op_count,
            modules=self.module_types(nodes),
            module_calls=module_calls,
            notes=self.notes(recomputed, nodes),
        )
        return data

    def roots(self) -> list[tuple[Any, int]]:
        """Every kept pass's roots, then tensors the code made and kept in a variable (or returned)."""
        edges: list[tuple[Any, int]] = []
        for record in self.kept:
            edges += record.roots
            for inner in record.inner:
                edges += inner.roots
        log = self.recorder.log
        for tensor in [t for _, t in self.names.tensors] + self.extra_roots:
            node = tensor.grad_fn
            if node is not None and log.made_here(node._sequence_nr()):
                edges.append((node, tensor.output_nr))
        return list(dict.fromkeys(edge for edge in edges if edge[0] is not None))

    def adjacency(self) -> dict[Any, tuple]:
        """Filled in by the walk below (passes keep no adjacency: each kept object costs the
        garbage collector a visit at every full collection)."""
        return {}

    @staticmethod
    def hook_wrappers(order: list[Any], nexts: dict[Any, tuple]) -> dict[tuple[Any, int], tuple[Any, int]]:
        """Identity nodes that are plumbing, not the user's computation: module backward hooks wrap
        tensors in them, and a tensor subclass that re-wraps each result (``as_subclass``) adds an
        ``AliasBackward0`` after every op. Map each edge into one to the edge it passes through."""
        alias: dict[tuple[Any, int], tuple[Any, int]] = {}
        for node in order:  # inputs first: a wrapper of a wrapper resolves in one step
            if type(node).__name__ in PASS_THROUGH:
                for index, edge in enumerate(nexts[node]):
                    alias[(node, index)] = alias.get(edge, edge)
        return alias

    def gradients(self, alias: dict) -> dict[tuple[Any, int], list[tuple[int, Any, PassRecord]]]:
        """edge -> [(pass index, tensor or summary, pass record)], oldest pass first."""
        found: dict[tuple[Any, int], list[tuple[int, Any, PassRecord]]] = {}
        for record in self.kept:
            for part in [record, *record.inner]:
                for edge, value in part.items():
                    found.setdefault(alias.get(edge, edge), []).append((record.index, value, part))
        return found

    def edge_names(self, order: list[Any], seqs: dict[Any, int], alias: dict) -> dict[tuple[Any, int], list]:
        """edge -> [(name, location)] from the code's assignments, then the namespace's names."""
        names: dict[tuple[Any, int], list] = {}
        for node in order:
            seq = seqs.get(node)
            if seq is None:
                continue
            for attribution in self.attributions:
                bindings = attribution.log.bindings.get(seq)
                if bindings:
                    for output_nr, name, location in bindings:
                        edge = alias.get((node, output_nr), (node, output_nr))
                        names.setdefault(edge, []).append((name, location))
                    break
        for name, tensor in self.names.tensors:
            node = tensor.grad_fn
            if node is not None:
                edge = (node, tensor.output_nr)
                entries = names.setdefault(alias.get(edge, edge), [])
                if all(known != name for known, _ in entries):  # (z = y: one tensor, every name)
                    entries.append((name, None))
        return names

    def recomputed(self, nexts: dict) -> set[Any]:
        """Nodes that only graphs built during backward reach (reentrant checkpoint recomputes its block)."""
        inner_nodes: set[Any] = set()
        for record in self.kept:
            for inner in record.inner:
                inner_nodes.update(inner.nexts)
        if not inner_nodes:
            return set()
        outer_roots = [node for record in self.kept for node, _ in record.roots]
        outer = set(post_order(outer_roots, dict(nexts)))
        return inner_nodes - outer

    def make_nodes(self, order, nexts, alias, roots, gradients, seqs, edge_names, recomputed):
        """One TraceNode per tensor: each output of each node that something used, named or returned."""
        inputs_of: dict[Any, list[tuple[Any, int]]] = {}  # node -> its input edges, plumbing resolved
        used: dict[Any, set[int]] = {}
        for node in order:
            real = [alias.get(edge, edge) if edge[0] is not None else edge for edge in nexts[node]]
            inputs_of[node] = real
            for edge in real:
                if edge[0] is not None:
                    used.setdefault(edge[0], set()).add(edge[1])
        consumed = {edge for real in inputs_of.values() for edge in real if edge[0] is not None}
        for node, index in roots:
            used.setdefault(node, set()).add(index)
        outputs_set = {edge for edge in roots if edge not in consumed}
        for node, output_nr in edge_names:
            used.setdefault(node, set()).add(output_nr)
        nodes: list[TraceNode] = []
        ids: dict[tuple[Any, int], int] = {}
        data = dict(grad_tensors={}, grad_versions={}, summaries={}, pass_values={}, in_graph=set(), calls={})
        has_passes = bool(self.recorder.passes)
        for op_id, node in enumerate(order):
            kind_name = type(node).__name__
            if kind_name in PASS_THROUGH:
                continue
            is_leaf = type(node) is ACCUMULATE_GRAD
            seq = seqs.get(node)
            if is_leaf:
                common = self._leaf_common(node)
                if node in recomputed and common["fields"]["kind"] == "leaf":
                    common["fields"]["op"] = "recomputed input"
                edges_in = ()
            else:
                attribution = self._attribution(seq) if seq is not None else None
                if node in recomputed:  # made during backward: module calls are known, ops and lines are not
                    attribution = _Recomputed(attribution) if attribution is not None else None
                common = self._op_common(node, seq, attribution)
                edges_in = inputs_of[node]
                order_of_arguments = _ARGUMENT_ORDER.get((common["op"], kind_name))
                if order_of_arguments is not None and len(edges_in) == len(order_of_arguments):
                    edges_in = [edges_in[i] for i in order_of_arguments]  # the call's argument order
            inputs = tuple(ids[edge] for edge in edges_in if edge[0] is not None and edge in ids)
            for output_nr in sorted(used.get(node, ())) or [0]:
                edge = (node, output_nr)
                trace_id = len(nodes)
                ids[edge] = trace_id
                if is_leaf:
                    trace_node = TraceNode(id=trace_id, op_id=op_id, output_nr=output_nr, inputs=inputs,
                                           is_output=edge in outputs_set, **common["fields"],
                                           source=self._line(common["location"]))
                    data["in_graph"].add(id(node.variable))
                else:
                    trace_node = self._op_node(trace_id, op_id, edge, inputs, common, edge_names.get(edge, ()),
                                               edge in outputs_set)
                    data["calls"][trace_id] = common["calls"]
                    trace_node.grad_seq = -seq if seq is not None else None
                self._attach_gradient(trace_node, edge, gradients, data)
                if is_leaf:
                    self._leaf_state(trace_node, node.variable, has_passes)
                nodes.append(trace_node)
        return nodes, data

    # -- one node -----------------------------------------------------------------------
    def _attribution(self, seq: int) -> _Attribution | None:
        for attribution in self.attributions:
            if attribution.log.made_here(seq):
                return attribution
        return None

    def _leaf_common(self, node: Any) -> dict[str, Any]:
        variable = node.variable
        info = self.recorder.leaves.of(variable)
        params = self.names.params.get(id(variable), [])
        binding_names = [n for n, _ in info.names] if info is not None else []
        all_names = tuple(dict.fromkeys(params + self.names.by_id.get(id(variable), []) + binding_names))
        location = None
        if info is not None:
            location = info.location or (info.names[0][1] if info.names else None)
        op = "parameter" if params else (info.op if info is not None and info.op else "leaf")
        fields = dict(kind="param" if params else "leaf", op=op, name=all_names[0] if all_names else None,
                      names=all_names, shape=tuple(variable.shape), dtype=_dtype_name(variable.dtype),
                      device=str(variable.device))
        return {"fields": fields, "location": location}

    @staticmethod
    def _op_of(node: Any, seq: int | None, attribution: _Attribution | None) -> str | None:
        """The torch call's name where the node was the last one that call made."""
        if attribution is None or seq is None:
            return None
        found = attribution.log.op_at(seq)
        return op_name(found[0]) if found is not None and found[1] else None

    def _op_common(self, node: Any, seq: int | None, attribution: Any) -> dict[str, Any]:
        op, location, calls = self._op_of(node, seq, attribution), None, ()
        if attribution is not None:
            location = attribution.log.location_at(seq)
            calls = attribution.calls_at(seq)
        if op is None:
            op = node_op_name(node)
        try:
            metadata = node._input_metadata
        except Exception:
            metadata = ()
        return {"op": op, "location": location, "calls": calls, "metadata": metadata,
                "seen_forward": attribution is not None}

    def _op_node(self, trace_id, op_id, edge, inputs, common, bindings, is_output) -> TraceNode:
        node, output_nr = edge
        metadata = common["metadata"]
        shape = dtype = device = None
        if output_nr < len(metadata):
            meta = metadata[output_nr]
            shape, dtype, device = tuple(meta.shape), meta.dtype, meta.device
        all_names = tuple(dict.fromkeys(n for n, _ in bindings))
        location = common["location"] or next((loc for _, loc in bindings if loc is not None), None)
        trace_node = TraceNode(
            id=trace_id, kind="op", op=common["op"], op_id=op_id, output_nr=output_nr,
            name=all_names[0] if all_names else None, names=all_names, shape=shape, dtype=_dtype_name(dtype),
            device=_device_name(device), inputs=inputs, source=self._line(location),
            module=None, is_output=is_output, seen_forward=common["seen_forward"],
        )
        return trace_node

    def _line(self, location: Location | None) -> SourceLine | None:
        if location in self.lines:
            return self.lines[location]
        line = self.lines[location] = source_line(location, self.labeler)
        return line

    def _attach_gradient(self, trace_node: TraceNode, edge: tuple[Any, int], gradients: dict, data: dict) -> None:
        found = gradients.get(edge)
        if not found:
            return
        if len(found) > 1:
            data["pass_values"][trace_node.id] = {index: value for index, value, _ in found}
        index, value, part = found[-1]
        trace_node.grad_pass = index
        if isinstance(value, (PendingSummary, NormOnly)):
            data["summaries"][trace_node.id] = value
            return
        version = part.versions.get(edge)
        if version is not None and value._version != version:
            trace_node.missing_reason = CHANGED_IN_PLACE
            trace_node.grad_pass = None
            return
        data["grad_tensors"][trace_node.id] = value
        trace_node.grad_kept = True
        if version is not None:
            data["grad_versions"][trace_node.id] = version
        if trace_node.shape is None:
            trace_node.shape, trace_node.dtype = tuple(value.shape), _dtype_name(value.dtype)

    def _leaf_state(self, trace_node: TraceNode, variable: torch.Tensor, has_passes: bool) -> None:
        final = self.recorder.ledger.final.get(id(variable))
        if final is not None:
            summary, _, note = final
            trace_node.leaf_grad = summary.resolve() if summary is not None else None
            trace_node.leaf_grad_note = note
        if trace_node.grad_pass is None and trace_node.missing_reason is None:
            history = self.recorder.ledger.history.get(id(variable))
            failed = self.failed_reach.get(id(variable))
            if history:
                trace_node.missing_reason = self._earlier_pass(history[1][-1][0])
            elif failed is not None:  # in the graph of a pass that raised
                trace_node.missing_reason = (f"backward pass {failed.index + 1} raised before it reached it "
                                             f"({failed.failed[:120]})")
            else:
                trace_node.missing_reason = NOT_REACHABLE if has_passes else NOT_CALLED

    def _earlier_pass(self, index: int) -> str:
        record = self.recorder.passes[index]
        where = str(self._line(record.location)) if record.location else "an earlier call"
        return f"reached by pass {index + 1} ({where}), whose graph a later pass from the same line replaced"

    # -- what the graph does not show ------------------------------------------------------
    def missing(self, in_graph: set[int]) -> list[MissingGradient]:
        """Leaves that require grad and got no gradient in the graph shown, and why."""
        out: list[MissingGradient] = []
        reported: set[int] = set()
        cut_leaves = self._cut_leaves(in_graph)
        for key, info in self.recorder.leaves.alive():
            if key in in_graph:
                continue
            label = self._leaf_label(key, info.names[0][0] if info.names else None)
            if label is None:
                continue
            location = info.location or (info.names[0][1] if info.names else None)
            if info.detached:
                reason, location = DETACHED, info.detached
            elif key in cut_leaves:
                cut = cut_leaves[key][1]
                reason, location = f"cut off by {cut.how}", cut.location
            elif info.no_grad:
                reason, location = NO_GRAD, info.no_grad
            elif key in self.recorder.ledger.history:
                reason = self._earlier_pass(self.recorder.ledger.history[key][1][-1][0])
            else:
                reason = NOT_REACHABLE if self.recorder.passes else NOT_CALLED
            reported.add(key)
            out.append(MissingGradient(label, info.shape, reason, self._line(location)))
        for key, (leaf, cut) in cut_leaves.items():
            if key in reported:
                continue
            label = self._leaf_label(key, None)
            if label is not None:
                out.append(MissingGradient(label, tuple(leaf.shape), f"cut off by {cut.how}", self._line(cut.location)))
        return out

    def lost_views(self, nodes: list[TraceNode]) -> list[MissingGradient]:
        """Named views the graph cannot name: a view whose base was changed in place after it was
        made (an optimizer step on the parameter of ``wt = w.t()``) gets a new ``grad_fn`` from
        PyTorch when next read, which is not the node the pass went through. Listed where the
        graph has unnamed views of the same base and shape, which it may or may not be."""
        drawn = {name for node in nodes for name in node.names}
        by_name = {name: node for node in nodes for name in node.names}
        log = self.recorder.log
        out: list[MissingGradient] = []
        for name, tensor in self.names.tensors:
            if name in drawn:
                continue
            try:
                if not (tensor.requires_grad and tensor._is_view()):
                    continue
                node = tensor.grad_fn
                if node is None or node._sequence_nr() < log.first_seq or log.made_here(node._sequence_nr()):
                    continue  # made before the trace, or by a call it recorded: not a regenerated node
                base = self.names.param_name(tensor._base) or next(iter(self.names.by_id.get(id(tensor._base), [])),
                                                                   None)
                base_node = by_name.get(base) if base is not None else None
                if base_node is None:
                    continue
                shape = tuple(tensor.shape)
                could_be = list(dict.fromkeys(f"{n.op}({base})" for n in nodes
                                              if n.name is None and base_node.id in n.inputs and n.shape == shape))
                if could_be:
                    out.append(MissingGradient(name, shape, VIEW_REGENERATED.format(base=base,
                                                                                  could_be=" or ".join(could_be))))
            except Exception:
                continue
        return out

    def _leaf_label(self, key: int, fallback: str | None) -> str | None:
        params = self.names.params.get(key)
        if params:
            return params[0]
        return next(iter(self.names.by_id.get(key, [])), None) or fallback

    def _cut_leaves(self, in_graph: set[int]) -> dict[int, tuple[torch.Tensor, Any]]:
        """Leaves a ``.detach()`` (or use under no_grad) cut off: reachable from a cut, not from the graph shown."""
        found: dict[int, tuple[torch.Tensor, Any]] = {}
        budget = CUT_WALK_LIMIT
        for cut in self.recorder.cuts:
            stack, seen = [cut.node], set()
            while stack and budget > 0:
                node = stack.pop()
                if node in seen:
                    continue
                seen.add(node)
                budget -= 1
                if type(node) is ACCUMULATE_GRAD:
                    variable = node.variable
                    if id(variable) not in in_graph:
                        found.setdefault(id(variable), (variable, cut))
                    continue
                stack.extend(child for child, _ in node.next_functions if child is not None)
        return found

    def pass_infos(self, edge_names: dict) -> list[PassInfo]:
        infos = []
        for record in self.recorder.passes:
            roots = []
            for edge in record.roots:
                names = edge_names.get(edge)
                roots.append(names[0][0] if names else "?")
            infos.append(PassInfo(index=record.index, entry=record.entry, roots=tuple(roots),
                                  node_count=record.node_count, signature=record.signature,
                                  location=self._line(record.location), strategy=record.strategy,
                                  note=record.reason, kept=record.kept, failed=record.failed))
        return infos

    def history(self) -> dict[str, list[tuple[int, float]]]:
        out: dict[str, list[tuple[int, float]]] = {}
        for record in self.kept:
            self.recorder.ledger.norms(record)
        self.recorder.ledger.read_back()
        for key, (ref, norms) in self.recorder.ledger.history.items():
            leaf = ref()
            if leaf is None:
                continue
            info = self.recorder.leaves.of(leaf)
            label = self._leaf_label(key, info.names[0][0] if info is not None and info.names else None)
            if label is None:
                continue
            by_pass: dict[int, float] = {}
            for index, norm in norms:
                by_pass[index] = float("nan") if norm is None else float(norm)
            out[label] = sorted(by_pass.items())
        return out

    def module_types(self, nodes: list[TraceNode]) -> dict[str, str]:
        paths = sorted({prefix for module in {n.module for n in nodes if n.module} for prefix in _prefixes(module)})
        return {path: self.names.module_types.get(path, "") for path in paths}

    def resolve_scopes(self, nodes: list[TraceNode], calls: dict[int, tuple]) -> dict[str, int]:
        """Turn each op's (module, call index) pairs into ``scope`` ((path, call number), ...), call
        numbers counting only the calls the graph shows; returns how many calls of each path it shows."""
        seen: dict[str, set[int]] = {}
        paths = self.names.modules
        for pairs in calls.values():
            for module, index in pairs:
                path = paths.get(id(module))
                if path is not None:
                    seen.setdefault(path, set()).add(index)
        numbers = {path: {index: rank + 1 for rank, index in enumerate(sorted(indices))}
                   for path, indices in seen.items()}
        for trace_id, pairs in calls.items():
            scope = _with_containers(tuple((paths[id(module)], numbers[paths[id(module)]][index])
                                           for module, index in pairs if id(module) in paths))
            if scope:
                nodes[trace_id].scope = scope
                nodes[trace_id].module = scope[-1][0]
        return {path: len(indices) for path, indices in seen.items()}

    def notes(self, recomputed: set[Any], nodes: list[TraceNode]) -> list[str]:
        """What the trace left out or recorded another way, one line each."""
        out = list(self.recorder.untraced.values())
        hooked = [p for p in self.recorder.passes if p.strategy == "hooks"]
        if hooked:
            reasons = sorted({p.reason for p in hooked})
            out.append(f"{len(hooked)} backward pass{'es' if len(hooked) != 1 else ''} recorded with a hook on each "
                       f"node, exactly as untraced but slower: {'; '.join(reasons)}")
        if recomputed:
            out.append(f"{len(recomputed)} ops were recomputed during backward by reentrant checkpoint; "
                       "their gradients are from that recomputation")
        if any(n.op in ("CompiledFunction", "compiled_function") for n in nodes):
            out.append("torch.compile'd regions are drawn as one op each (CompiledFunction): "
                       "their insides are not recorded")
        return out


def build(recorder: Recorder, namespace: Mapping[str, Any] | None = None, labeler: Labeler | None = None,
          extra_roots: Sequence[Any] = ()) -> dict[str, Any]:
    """Everything a Trace holds, as keyword arguments for it. Releases the recorder."""
    try:
        with torch._C.DisableTorchFunctionSubclass():
            return Builder(recorder, namespace, labeler, extra_roots).run()
    finally:
        recorder.release()


def _with_containers(scope: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
    """The scope with the modules around each call that were never called themselves (a
    ``ModuleList``, or ``model`` when the code calls ``model.blocks[0]`` directly), as one call each,
    so that it follows the module tree from the top."""
    full: list[tuple[str, int]] = []
    present = {path for path, _ in scope}
    for path, number in scope:
        for prefix in _prefixes(path)[:-1]:
            if prefix not in present:
                present.add(prefix)
                full.append((prefix, 1))
        full.append((path, number))
    return tuple(full)


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _assign_modules(nodes: list[TraceNode]) -> None:
    """Give every tensor the nn.Module it belongs to, where the forward log could not say.

    A parameter belongs to the module that owns it (``model.0.weight`` -> ``model.0``). An op
    made in an earlier recording belongs to the module of the tensor that consumed it.
    """
    for node in nodes:
        if node.kind == "param" and node.module is None and node.name and "." in node.name:
            node.module = node.name.rsplit(".", 1)[0]
    consumers: dict[int, TraceNode] = {}
    for node in nodes:
        for input_id in node.inputs:
            consumers.setdefault(input_id, node)
    for node in reversed(nodes):  # consumers come after their inputs
        if node.kind == "op" and node.module is None and not node.seen_forward:
            consumer = consumers.get(node.id)
            if consumer is not None:
                node.module = consumer.module
                node.scope = consumer.scope


def _label_rebound_names(nodes: list[TraceNode]) -> None:
    """A name bound to several tensors (``h = torch.tanh(h)`` in a loop) labels each: ``h (1)``, ``h (2)``."""
    counts = Counter(node.name for node in nodes if node.name is not None)
    seen: Counter[str] = Counter()
    for node in nodes:
        if node.name is not None and counts[node.name] > 1:
            seen[node.name] += 1
            node.name = f"{node.name} ({seen[node.name]})"


def summarize_gradients(nodes: list[TraceNode], grad_tensors: dict[int, torch.Tensor],
                        summaries: dict[int, PendingSummary], small_values: int) -> None:
    """Fill in each node's gradient statistics and mark the first non-finite gradient.

    Deferred until a view or ``t.nodes`` needs it: reading every gradient costs memory
    bandwidth comparable to the backward pass itself, and a script may never look.
    """
    from .stats import summarize_many

    kept = list(grad_tensors)
    for trace_id, summary in zip(kept, summarize_many([grad_tensors[i] for i in kept], small_values)):
        nodes[trace_id].grad = summary
        if nodes[trace_id].shape is None:
            nodes[trace_id].shape = summary.shape
    for trace_id, pending in summaries.items():
        nodes[trace_id].grad = pending.resolve()
    _mark_first_nonfinite(nodes)


def _mark_first_nonfinite(nodes: list[TraceNode]) -> None:
    """Mark where the first NaN/Inf gradient appeared: a tensor whose gradient is not finite while
    every op that used it got a finite one (so that op's backward made it), in the first pass that
    had one; among several, the one the engine computed first (it runs the newest ops first)."""
    bad = [n for n in nodes if n.grad is not None and not n.grad.finite]
    if not bad:
        return
    consumers: dict[int, list[TraceNode]] = {}
    for node in nodes:
        for input_id in node.inputs:
            consumers.setdefault(input_id, []).append(node)

    def fed_finite(node: TraceNode) -> bool:
        return all(c.grad is None or c.grad.finite or c.grad_pass != node.grad_pass for c in consumers.get(node.id, ()))

    first_pass = min(n.grad_pass if n.grad_pass is not None else 0 for n in bad)
    in_pass = [n for n in bad if (n.grad_pass or 0) == first_pass]
    origins = [n for n in in_pass if fed_finite(n)] or in_pass
    # op nodes carry -seq (smaller: computed earlier); leaves come last in the engine's order
    origin = min(origins, key=lambda n: n.grad_seq if n.grad_seq is not None else float("inf"))
    origin.nonfinite_origin = True
