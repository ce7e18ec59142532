"""Turn what a Recorder saw into a Trace: walk the graph once, name it, summarise gradients."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from .model import MissingGradient, PassInfo, TraceNode
from .naming import Labeler, NamespaceNames, source_line
from .recorder import KEY, Recorder, node_op_name
from .stats import summarize_many

NOT_CALLED = "backward not called yet"
NOT_REACHABLE = "not reachable from the output"
NO_GRAD = "used only under torch.no_grad()"
DETACHED = "used only through .detach()"
CHANGED_IN_PLACE = (".grad was changed in place after backward (clipping, zero_grad(set_to_none=False)); "
                    "the norm per pass was taken before")


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _post_order(roots: list[Any], known: dict[Any, tuple] | None = None) -> tuple[list[Any], dict[Any, tuple]]:
    """Autograd nodes reachable from ``roots``, inputs before the ops that consume them.

    Also returns each node's ``next_functions``: reading that attribute builds a new tuple
    (about 1 us), so it is read once per node here and reused.
    """
    order: list[Any] = []
    edges: dict[Any, tuple] = {}
    for root in roots:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if node in edges:
                continue
            children = known.get(node) if known else None
            if children is None:
                children = node.next_functions
            edges[node] = children
            stack.append((node, True))
            for child, _ in reversed(children):
                if child is not None and child not in edges:
                    stack.append((child, False))
    return order, edges


def build(
    recorder: Recorder,
    namespace: Mapping[str, Any] | None = None,
    labeler: Labeler | None = None,
    extra_roots: list[torch.Tensor] = (),
) -> dict[str, Any]:
    """Everything a Trace holds, as keyword arguments for it. Releases the recorder."""
    try:
        return _build(recorder, namespace, labeler, list(extra_roots))
    finally:
        recorder.release()


def _build(recorder: Recorder, namespace, labeler, extra_roots) -> dict[str, Any]:
    names = NamespaceNames(namespace)
    root_edges: list[tuple[Any, int]] = []
    if recorder.passes:
        root_edges.extend(recorder.passes[-1].root_edges)
    candidates = [t for _, t in names.tensors] + [t for t in extra_roots if isinstance(t, torch.Tensor)]
    for tensor in candidates:
        node = tensor.grad_fn
        if node is None:
            continue
        record = node.metadata.get(KEY)
        if record is not None and record.trace_id == recorder.trace_id and record.seen_forward:
            root_edges.append((node, tensor.output_nr))
    edge_names: dict[tuple[Any, int], str] = {}
    for name, tensor in names.tensors:
        if tensor.grad_fn is not None:
            edge_names.setdefault((tensor.grad_fn, tensor.output_nr), name)

    root_nodes = list(dict.fromkeys(node for node, _ in root_edges))
    order, next_edges = _post_order(root_nodes, recorder.last_edges)
    used: dict[Any, set[int]] = {node: set() for node in order}
    consumed: set[tuple[Any, int]] = set()
    for node in order:
        for edge in next_edges[node]:
            if edge[0] is not None:
                used[edge[0]].add(edge[1])
                consumed.add(edge)
    root_set = {edge for edge in root_edges if edge not in consumed}
    for node, index in root_edges:
        used[node].add(index)

    nodes: list[TraceNode] = []
    ids: dict[tuple[Any, int], int] = {}
    grad_tensors: dict[int, torch.Tensor] = {}
    summaries: dict[int, Any] = {}
    seqs: dict[int, int] = {}
    in_graph_leaves: set[int] = set()
    has_passes = bool(recorder.passes)
    lines: dict[Any, Any] = {}  # location -> SourceLine: a loop's ops share a handful of lines

    for op_id, node in enumerate(order):
        record = node.metadata.get(KEY)
        is_leaf = type(node).__name__ == "AccumulateGrad"
        outputs = set(used[node])
        if record is not None and not is_leaf:
            outputs.update(record.names)
        inputs = tuple(ids[edge] for edge in next_edges[node] if edge[0] is not None)
        for output_nr in sorted(outputs):
            trace_id = len(nodes)
            ids[(node, output_nr)] = trace_id
            bindings = list(record.names.get(output_nr, ())) if record is not None else []
            location = record.location if record is not None else None
            module = names.modules.get(id(record.module)) if record is not None and record.module is not None else None
            if is_leaf:
                variable = node.variable
                in_graph_leaves.add(id(variable))
                info = recorder.leaves.get(id(variable))
                param = names.params.get(id(variable))
                binding_names = [n for n, _ in info.names] if info is not None else []
                # the module path, then what the namespace calls it now, then the cell's bindings
                leaf_names = ([param] if param else []) + names.by_id.get(id(variable), []) + binding_names
                kind = "param" if param else "leaf"
                op = "parameter" if param else (info.op if info is not None and info.op else "leaf")
                if info is not None:
                    location = info.location or (info.names[0][1] if info.names else None)
                shape, dtype, device = tuple(variable.shape), variable.dtype, variable.device
                all_names = tuple(dict.fromkeys(leaf_names))
            else:
                kind = "op"
                op = record.op if record is not None else node_op_name(node)
                all_names = tuple(dict.fromkeys(n for n, _ in bindings))
                if not all_names and (node, output_nr) in edge_names:
                    all_names = (edge_names[(node, output_nr)],)
                meta = record.outputs.get(output_nr) if record is not None else None
                shape, dtype, device = meta if meta is not None else (None, None, None)
                if meta is None and record is not None and record.grads and output_nr in record.grads:
                    # made inside a call the mode saw as one: its gradient has its shape and dtype
                    held = record.grads[output_nr]
                    source = held.tensor if held.tensor is not None else held.summary
                    shape, dtype = tuple(source.shape), source.dtype
                if location is None and bindings:
                    location = bindings[0][1]
            slot = record.grads.get(output_nr) if record is not None and record.grads else None
            trace_node = TraceNode(
                id=trace_id,
                kind=kind,
                op=op,
                op_id=op_id,
                output_nr=output_nr,
                name=all_names[0] if all_names else None,
                names=all_names,
                shape=shape,
                dtype=_dtype_name(dtype),
                device=None if device is None else str(device),
                inputs=inputs,
                source=lines[location] if location in lines else lines.setdefault(location, source_line(location, labeler)),
                module=module,
                seen_forward=record is not None and record.seen_forward,
                is_output=(node, output_nr) in root_set,
            )
            if slot is not None and slot.version is not None and slot.tensor._version != slot.version:
                # the leaf's .grad (which the trace shares, to spare a copy) changed after backward
                trace_node.missing_reason = CHANGED_IN_PLACE
            elif slot is not None:
                seqs[trace_id] = slot.seq
                if slot.tensor is not None:
                    grad_tensors[trace_id] = slot.tensor
                    trace_node.grad_kept = True
                else:
                    summaries[trace_id] = slot.summary
            elif kind != "op":
                trace_node.missing_reason = NOT_REACHABLE if has_passes else NOT_CALLED
            nodes.append(trace_node)

    _label_rebound_names(nodes)
    _assign_modules(nodes)
    for trace_id, summary in summaries.items():  # over the memory budget: summarised in the hook
        nodes[trace_id].grad = summary.resolve()
        nodes[trace_id].grad_seq = seqs[trace_id]
    for trace_id in grad_tensors:
        nodes[trace_id].grad_seq = seqs[trace_id]

    missing = _missing_leaves(recorder, names, in_graph_leaves, labeler)
    passes = [
        PassInfo(
            index=i,
            entry=p.entry,
            roots=tuple(edge_names.get(edge, "?") for edge in p.root_edges),
            node_count=p.node_count,
            signature=p.signature,
        )
        for i, p in enumerate(recorder.passes)
    ]
    history: dict[str, list[tuple[int, float]]] = {}
    for leaf, norms in recorder.leaf_history.values():
        label = names.params.get(id(leaf)) or next(iter(names.by_id.get(id(leaf), [])), None)
        info = recorder.leaves.get(id(leaf))
        if label is None and info is not None and info.names:
            label = info.names[0][0]
        if label is not None:
            history[label] = [(index, float(norm)) for index, norm in norms]
    return dict(
        nodes=nodes,
        grad_tensors=grad_tensors,
        missing=missing,
        passes=passes,
        grad_history=history,
        op_count=recorder.op_count,
        modules={path: names.module_types.get(path, "") for path in
                 sorted({prefix for module in {n.module for n in nodes if n.module} for prefix in _prefixes(module)})},
    )


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _assign_modules(nodes: list[TraceNode]) -> None:
    """Give every tensor the nn.Module it belongs to, where the forward hooks could not say.

    A parameter belongs to the module that owns it (``model.0.weight`` -> ``model.0``). An
    operation torch ran inside a functional call the mode saw as one (the internals of
    ``multi_head_attention_forward``) belongs to the module of the tensor that consumed it.
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


def _label_rebound_names(nodes: list[TraceNode]) -> None:
    """A name bound to several tensors (``h = torch.tanh(h)`` in a loop) labels each: ``h (1)``, ``h (2)``."""
    counts = Counter(node.name for node in nodes if node.name is not None)
    seen: Counter[str] = Counter()
    for node in nodes:
        if node.name is not None and counts[node.name] > 1:
            seen[node.name] += 1
            node.name = f"{node.name} ({seen[node.name]})"


def _missing_leaves(recorder: Recorder, names: NamespaceNames, in_graph: set[int], labeler) -> list[MissingGradient]:
    missing = []
    for key, info in recorder.leaves.items():
        if key in in_graph:
            continue
        label = (names.params.get(key) or next(iter(names.by_id.get(key, [])), None)
                 or (info.names[0][0] if info.names else None))
        if label is None:
            continue  # nobody can refer to it: not worth a line
        if info.detached:
            reason = DETACHED
        elif info.no_grad:
            reason = NO_GRAD
        elif recorder.passes:
            reason = NOT_REACHABLE
        else:
            reason = NOT_CALLED
        location = info.location or (info.names[0][1] if info.names else None)
        missing.append(MissingGradient(label, tuple(info.tensor.shape), reason, source_line(location, labeler)))
    return missing


def summarize_gradients(nodes: list[TraceNode], grad_tensors: dict[int, torch.Tensor], small_values: int) -> None:
    """Fill in each node's gradient statistics and mark the first non-finite gradient.

    Deferred until a view or ``t.nodes`` needs it: reading every gradient costs memory
    bandwidth comparable to the backward pass itself, and a script may never look.
    """
    kept = list(grad_tensors)
    for trace_id, summary in zip(kept, summarize_many([grad_tensors[i] for i in kept], small_values)):
        nodes[trace_id].grad = summary
        if nodes[trace_id].shape is None:
            nodes[trace_id].shape = summary.shape
    origin = None
    for node in nodes:
        if node.grad is not None and not node.grad.finite and (origin is None or node.grad_seq < origin.grad_seq):
            origin = node
    if origin is not None:
        origin.nonfinite_origin = True
