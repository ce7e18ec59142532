"""Lists and ndarrays become tensors, with a record of what was copied and what shares memory.

``torch.from_numpy`` shares the ndarray's memory; ``torch.tensor`` copies. ``convert`` picks
sharing whenever it is possible and safe, and says why when it copies. Nothing here imports
IPython.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .display import TextAndHtml
from .errors import OptionError


@dataclass(frozen=True)
class Conversion:
    """What happened to one value: converted (``tensor`` set) or left alone (``reason`` says why)."""

    name: str
    source: str  # "list", "ndarray", "numpy scalar", or the type name
    source_shape: tuple[int, ...] | None
    source_dtype: str | None
    tensor: torch.Tensor | None = None
    shares_memory: bool = False
    copy_reason: str | None = None  # why it was copied (None when it shares memory or came from a list)
    note: str | None = None  # e.g. requires_grad not applied, or why a near miss was left alone

    @property
    def converted(self) -> bool:
        return self.tensor is not None

    @property
    def memory(self) -> str:
        if not self.converted:
            return ""
        if self.shares_memory:
            return "shares memory with the ndarray"
        if self.copy_reason:
            return f"copied: {self.copy_reason}"
        return "new tensor (a list has no memory to share)"


@dataclass(frozen=True)
class ConversionOptions:
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    requires_grad: bool = False
    copy: bool = False


_DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float16", "bfloat16", "float32", "float64", "half", "float", "double",
        "int8", "int16", "int32", "int64", "uint8", "bool", "long", "int", "short",
        "complex64", "complex128",
    )
}


def parse_dtype(text: str) -> torch.dtype:
    """``float32``, ``torch.float32`` or ``float`` -> ``torch.float32``; OptionError lists the choices."""
    key = text.strip().removeprefix("torch.")
    if key not in _DTYPES:
        raise OptionError(f"unknown dtype {text!r}; choose one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]


MAX_NESTING = 128  # torch.tensor refuses lists nested deeper ("too many dimensions 'list'")
_EXPLAIN_LIMIT = 2**24  # elements the Python walk looks at to explain a refusal
_INT64 = torch.iinfo(torch.int64)


def _is_list(value: Any) -> bool:
    return issubclass(type(value), list)  # type(), not isinstance: never runs the value's own code


def _is_number(value: Any) -> bool:
    return issubclass(type(value), (bool, int, float, complex, np.generic, numbers.Number)) \
        and not issubclass(type(value), np.ndarray)


def _first_leaf(value: list) -> tuple[Any, str | None]:
    """The first element under nested lists, or why the nesting itself is refused (cheap: one path)."""
    seen: set[int] = set()
    depth = 0
    while _is_list(value) and value:
        if id(value) in seen:
            return None, "contains itself (a self-referential list)"
        seen.add(id(value))
        depth += 1
        if depth > MAX_NESTING:
            return None, f"nested more than {MAX_NESTING} levels deep (torch's limit)"
        value = value[0]
    return value, None


def _contains_itself(value: list) -> bool:
    """Whether a list reaches itself through nested lists (depth-first, each list visited once)."""
    done: set[int] = set()
    on_path = {id(value)}
    stack = [(value, iter(value))]
    while stack:
        node, items = stack[-1]
        for item in items:
            if _is_list(item):
                if id(item) in on_path:
                    return True
                if id(item) not in done:
                    on_path.add(id(item))
                    stack.append((item, iter(item)))
                    break
        else:
            stack.pop()
            on_path.discard(id(node))
            done.add(id(node))
    return False


def _list_shape(value: list) -> tuple[tuple[int, ...] | None, str | None]:
    """(shape, None) for a rectangular nested list of numbers, else (None, why not)."""
    if _contains_itself(value):
        return None, "contains itself (a self-referential list)"
    shape: list[int] = []
    level: list = [value]
    while True:
        lists = [_is_list(v) for v in level]
        if all(lists):
            lengths = {len(v) for v in level}
            if len(lengths) != 1:
                return None, "ragged list (rows of different lengths)"
            length = lengths.pop()
            if length == 0:
                return None, "contains an empty list" if shape else "empty list"
            shape.append(length)
            if len(shape) > MAX_NESTING:
                return None, f"nested more than {MAX_NESTING} levels deep (torch's limit)"
            if len(level) * length > _EXPLAIN_LIMIT:
                return tuple(shape), None  # too big to look at element by element: torch's reason stands
            level = [item for v in level for item in v]
            continue
        if any(lists):
            return None, "ragged list (numbers mixed with lists)"
        for item in level:
            if item is None:
                return None, "list contains None"
            if issubclass(type(item), (str, bytes)):
                return None, "list of strings"
            if issubclass(type(item), torch.Tensor):
                return None, "list of tensors (use torch.stack)"
            if issubclass(type(item), np.ndarray):
                return None, "list of ndarrays (use np.stack, then convert)"
            if not _is_number(item):
                return None, f"list contains {type(item).__name__}"
        return tuple(shape), None


def _dtype_str(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def convert(value: Any, name: str = "", options: ConversionOptions | None = None) -> Conversion:
    """Convert one value the way ``%%tensor`` does, and say what happened.

    Lists of numbers follow torch's dtype rules (ints -> int64, floats -> float32, bools ->
    bool) unless a dtype is given. NumPy arrays share memory unless a copy is asked for or
    forced; every copy says why. Values are never changed on the way: a NumPy dtype torch
    lacks is widened when that is exact and left alone (with the reason) when it is not,
    and integers that do not fit the result's dtype are left alone, never wrapped.
    """
    options = options or ConversionOptions()
    kind = type(value)
    if issubclass(kind, np.ndarray):
        return _convert_array(value, name, options, "ndarray")
    if issubclass(kind, np.generic):
        if value.dtype.kind in "biufc":
            result = _convert_array(np.array(value), name, options, "numpy scalar")
            if not result.converted:
                return result
            return replace(result, shares_memory=False,
                           copy_reason=result.copy_reason or "a NumPy scalar is a value, with no memory to share")
        return Conversion(name, "numpy scalar", (), str(value.dtype), note=f"numpy {value.dtype} is not numeric")
    if issubclass(kind, list):
        return _convert_list(value, name, options)
    if issubclass(kind, tuple):
        return Conversion(name, "tuple", None, None, note="tuples are left alone (usually shapes)")
    return Conversion(name, kind.__name__, None, None, note="not a list or ndarray")


def _finish(tensor: torch.Tensor, options: ConversionOptions) -> tuple[torch.Tensor, str | None]:
    note = None
    if options.requires_grad:
        if tensor.is_floating_point() or tensor.is_complex():
            tensor.requires_grad_(True)
        else:
            note = f"requires_grad not set: {_dtype_str(tensor.dtype)} tensors cannot require grad"
    return tensor, note


def _convert_list(value: list, name: str, options: ConversionOptions) -> Conversion:
    # torch.tensor checks shape and types in C; the Python walk only runs to explain a refusal
    leaf, why_not = _first_leaf(value)
    tensor = torch_error = None
    if why_not is None and _is_number(leaf):
        try:  # on the CPU first, whatever the default device: the checks below read values
            tensor = torch.tensor(value, dtype=options.dtype, device="cpu")
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            torch_error = error
    if tensor is not None and options.dtype is not None and _integer(options.dtype):
        refusal = _wrapped(value, options.dtype)  # torch.tensor wraps -1 into uint8's 255
        if refusal is not None:
            return Conversion(name, "list", tuple(tensor.shape), None, note=refusal)
    if tensor is None:
        shape = None
        if why_not is None:
            shape, why_not = _list_shape(value)
        if why_not is None and torch_error is not None:
            why_not = _torch_refusal(torch_error)
        return Conversion(name, "list", shape, None, note=why_not or "torch cannot convert it")
    if options.dtype is None and tensor.dtype in (torch.float32, torch.complex64) and _overflowed(tensor, value):
        return Conversion(name, "list", tuple(tensor.shape), None,
                          note=f"values beyond {_dtype_str(tensor.dtype)}'s range would become inf "
                               f"(--dtype {'float64' if tensor.dtype == torch.float32 else 'complex128'} keeps them)")
    shape = tuple(tensor.shape)
    device = _device(options)
    if tensor.device != device:
        tensor = tensor.to(device)
    tensor, note = _finish(tensor, options)
    return Conversion(name, "list", shape, None, tensor=tensor, note=note)


def _wrapped(value: list, dtype: torch.dtype) -> str | None:
    """Why the list's values do not fit integer ``dtype`` (checked as int64, exactly), or None."""
    try:
        wide = torch.tensor(value, dtype=torch.int64, device="cpu")
    except (TypeError, ValueError, RuntimeError, OverflowError):
        if dtype == torch.uint64:
            return None  # (values past int64's range: torch's own uint64 build took them)
        return f"values outside int64's range cannot become {_dtype_str(dtype)}"
    return _out_of_range(wide.numpy(), dtype)


def _integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _overflowed(tensor: torch.Tensor, value: list) -> bool:
    """Python floats are 64-bit: one past float32's range becomes inf (checked only when an inf shows up)."""
    if not torch.isinf(tensor).any():
        return False
    wide = torch.tensor(value, dtype=torch.float64 if tensor.dtype == torch.float32 else torch.complex128, device="cpu")
    return not torch.equal(torch.isinf(wide), torch.isinf(tensor))


def _torch_refusal(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "Overflow when unpacking long" in text:
        return ("integers outside int64's range: torch has no wider integer type "
                "(--dtype float64 converts them, rounded)")
    return f"torch cannot convert it: {text[:160]}"


def _device(options: ConversionOptions) -> torch.device:
    # explicit, so the result lands where the report says whatever the default device is
    return options.device if options.device is not None else torch.device("cpu")


_NOT_NUMERIC = {
    "O": "Python objects, not numbers (arr.astype(float) converts them)",
    "U": "strings", "S": "bytes", "T": "strings",
    "M": "torch has no datetime type", "m": "torch has no timedelta type",
    "V": "structured records (convert each field)",
}
# NumPy integer types torch supports only partly (most ops are missing): widened when exact
_WIDER = {np.dtype(np.uint16): np.dtype(np.int32), np.dtype(np.uint32): np.dtype(np.int64)}


def _torch_ready(array: np.ndarray, options: ConversionOptions) -> tuple[np.ndarray, list[str], str | None]:
    """(an array of a dtype torch takes, why it differs from the input, or why it is left alone)."""
    native = array.dtype.newbyteorder("=")
    if native in _WIDER:
        return array.astype(_WIDER[native]), [f"torch has limited support for {native}: widened to {_WIDER[native]} (exact)"], None
    target = options.dtype
    wants_float = target is not None and (target.is_floating_point or target.is_complex)
    if native == np.uint64:
        if wants_float:
            return array.astype(np.float64), [], None
        if array.size and array.max() > _INT64.max:
            return array, [], ("uint64 values above int64's maximum: torch has limited support for uint64 and no "
                               "wider integer type (--dtype float64 converts them, rounded)")
        return array.astype(np.int64), ["torch has limited support for uint64: converted to int64 (every value fits)"], None
    if native.char in "gG":  # long double: torch has no float wider than 64 bits
        wide = np.dtype(np.float64 if native.char == "g" else np.complex128)
        narrowed = array.astype(wide)
        if not wants_float and not np.array_equal(narrowed.astype(native), array, equal_nan=True):
            return array, [], (f"{native} values that {wide} cannot hold exactly: torch has no wider type "
                               f"(--dtype {wide} converts them, rounded)")
        return narrowed, [f"torch has no {native}: converted to {wide}" + ("" if wants_float else " (exact)")], None
    return array, [], None


def _out_of_range(array: np.ndarray, dtype: torch.dtype) -> str | None:
    """Why ``array`` cannot become integer ``dtype`` without wrapping, or None."""
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool or not array.size:
        return None
    if array.dtype.kind == "c":
        return f"complex values cannot become {_dtype_str(dtype)}"
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return f"NaN or infinite values cannot become {_dtype_str(dtype)}"
    info = torch.iinfo(dtype)
    low, high = array.min(), array.max()
    if low < info.min or high > info.max:
        return f"values from {low} to {high} do not fit {_dtype_str(dtype)} ({info.min} to {info.max})"
    return None


def _convert_array(array: np.ndarray, name: str, options: ConversionOptions, source: str) -> Conversion:
    shape, dtype_text = tuple(array.shape), str(array.dtype)

    def left_alone(note: str) -> Conversion:
        return Conversion(name, source, shape, dtype_text, note=note)

    if issubclass(type(array), np.ma.MaskedArray):
        return left_alone("a masked array: torch has no masks (convert arr.filled(value) or arr.data)")
    if array.dtype.kind not in "biufc":
        return left_alone(f"{array.dtype} arrays are left alone ({_NOT_NUMERIC.get(array.dtype.kind, 'not numeric')})")
    reasons = []
    if options.copy:
        reasons.append("--copy asked for a copy")
    if not array.dtype.isnative:
        reasons.append("non-native byte order")
    if any(stride < 0 for stride in array.strides):
        reasons.append("negative strides")
    if not array.flags.writeable:
        reasons.append("the array is read-only")
    data, widened, refusal = _torch_ready(array, options)
    if refusal is None and options.dtype is not None:
        refusal = _out_of_range(data, options.dtype)
    if refusal is not None:
        return left_alone(refusal)
    reasons += widened
    target_device = _device(options)
    if target_device.type != "cpu":
        reasons.append(f"device {target_device} is not the CPU")
    if reasons:  # a C-contiguous, native-order copy of its own (np.ascontiguousarray would make 0-d arrays 1-d)
        if not data.dtype.isnative:
            data = data.astype(data.dtype.newbyteorder("="), order="C")
        elif np.may_share_memory(data, array) or not data.flags.c_contiguous:
            data = np.array(data, order="C", copy=True)
    base = torch.from_numpy(data)
    tensor = base
    if options.dtype is not None and options.dtype != tensor.dtype:
        tensor = tensor.to(options.dtype)
        reasons.append(f"dtype change {_dtype_str(base.dtype)} -> {_dtype_str(options.dtype)}")
    if target_device.type != "cpu":
        tensor = tensor.to(target_device)
    shares = not reasons
    tensor, note = _finish(tensor, options)
    return Conversion(name, source, shape, dtype_text, tensor=tensor, shares_memory=shares,
                      copy_reason="; ".join(reasons) if reasons else None, note=note)


def is_near_miss(conversion: Conversion) -> bool:
    """Left alone, but it looked like data the user may have meant to convert."""
    return not conversion.converted and conversion.source in ("list", "ndarray", "numpy scalar") \
        and conversion.note not in (None, "empty list")


def _shape(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return ""
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


@dataclass(repr=False)  # repr is the text view
class ConversionReport(TextAndHtml):
    """What one converting cell did: the conversions, and the near misses left alone."""

    conversions: list[Conversion]
    repeats: dict[str, int] = field(default_factory=dict)  # name -> times it was converted (loops)

    @property
    def converted(self) -> list[Conversion]:
        return [c for c in self.conversions if c.converted]

    @property
    def near_misses(self) -> list[Conversion]:
        return [c for c in self.conversions if is_near_miss(c)]

    def __bool__(self) -> bool:
        return bool(self.converted or self.near_misses)

    def rows(self) -> list[tuple[str, str, str, str]]:
        rows = []
        for c in self.converted:
            t = c.tensor
            was = f"{c.source} {_shape(c.source_shape)}" + (f" {c.source_dtype}" if c.source_dtype else "")
            became = f"tensor {_shape(tuple(t.shape))} {_dtype_str(t.dtype)} {t.device}"
            if t.requires_grad:
                became += " requires_grad"
            memory = c.memory + (f" ({c.note})" if c.note else "")
            times = self.repeats.get(c.name, 1)
            rows.append((c.name + (f" (x{times})" if times > 1 else ""), was, became, memory))
        return rows

    def text(self) -> str:
        lines = []
        rows = self.rows()
        if rows:
            header = ("name", "was", "became", "memory")
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
            lines += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in [header, *rows]]
        if self.near_misses:
            lines.append("left alone:")
            lines += [f"  {c.name}: {c.source}, {c.note}" for c in self.near_misses]
        return "\n".join(lines) if lines else "nothing converted"

    def html(self) -> str:
        import html as html_module

        esc = html_module.escape
        parts = []
        rows = self.rows()
        if rows:
            parts.append("<table class='torchmagic-conversions'><thead><tr>"
                         "<th>name</th><th>was</th><th>became</th><th>memory</th></tr></thead><tbody>")
            for row in rows:
                parts.append("<tr>" + "".join(f"<td style='text-align:left'>{esc(cell)}</td>" for cell in row) + "</tr>")
            parts.append("</tbody></table>")
        if self.near_misses:
            parts.append("<p><b>left alone</b></p><ul>")
            parts += [f"<li>{esc(c.name)}: {esc(c.source)}, {esc(c.note or '')}</li>" for c in self.near_misses]
            parts.append("</ul>")
        return "".join(parts) or "<p>nothing converted</p>"



_DATA_TYPES = (list, np.ndarray, np.generic)


class Converter:
    """The binder ``%%tensor`` installs: converts each bound value and keeps the report."""

    def __init__(self, options: ConversionOptions) -> None:
        self.options = options
        self.report = ConversionReport([])

    def __call__(self, name: str, value: Any) -> Any:
        if not issubclass(type(value), _DATA_TYPES):
            return value  # the fast path: most bindings are not data
        try:
            conversion = convert(value, name, self.options)
        except Exception as error:  # noqa: BLE001 - the value stays as it was, and the report says why
            text = str(error).strip().splitlines()[0] if str(error).strip() else ""
            conversion = Conversion(name, type(value).__name__, None, None,
                                    note=f"could not be converted: {type(error).__name__}: {text}"[:200])
        if conversion.converted or is_near_miss(conversion):
            conversions = self.report.conversions
            # a name assigned in a loop is reported once, with how many times it was converted
            previous = next((i for i, c in enumerate(conversions) if c.name == name), None)
            if previous is not None:
                del conversions[previous]
                self.report.repeats[name] = self.report.repeats.get(name, 1) + 1
            conversions.append(conversion)
        return conversion.tensor if conversion.converted else value
