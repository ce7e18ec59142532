"""Conversion rules: what converts, what is left alone, when memory is shared and why a copy was made."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchmagic
from torchmagic.convert import ConversionOptions, Converter, convert, is_near_miss, parse_dtype
from torchmagic.errors import OptionError


def test_ndarray_shares_memory_proven_by_mutation():
    array = np.arange(4.0)
    c = convert(array, "a")
    assert c.shares_memory and c.memory == "shares memory with the ndarray"
    array[0] = 42.0
    assert c.tensor[0].item() == 42.0
    c.tensor[1] = -1.0
    assert array[1] == -1.0


@pytest.mark.parametrize(
    "make, options, reason",
    [
        (lambda: np.arange(3.0), ConversionOptions(copy=True), "--copy asked for a copy"),
        (lambda: np.arange(3, dtype=">i4"), ConversionOptions(), "non-native byte order"),
        (lambda: np.arange(3.0)[::-1], ConversionOptions(), "negative strides"),
        (lambda: np.arange(3), ConversionOptions(dtype=torch.float32), "dtype change int64 -> float32"),
        (lambda: np.arange(3.0), ConversionOptions(device=torch.device("meta")), "device meta is not the CPU"),
    ],
)
def test_every_copy_says_why_and_does_not_alias(make, options, reason):
    array = make()
    c = convert(array, "a", options)
    assert not c.shares_memory and reason in c.copy_reason
    if c.tensor.device.type == "cpu":
        before = c.tensor.clone()
        array.setflags(write=True) if array.flags.owndata or array.base is not None else None
        try:
            array[...] = 7
        except ValueError:
            pass
        assert torch.equal(c.tensor, before)


def test_read_only_array_is_copied_never_aliased():
    array = np.arange(3.0)
    array.flags.writeable = False
    c = convert(array, "r")
    assert "read-only" in c.copy_reason
    c.tensor[0] = 100.0  # writing the tensor must not change the "read-only" array
    assert array[0] == 0.0


def test_list_dtypes_follow_torch():
    assert convert([[1, 2], [3, 4]]).tensor.dtype == torch.int64
    assert convert([1.5, 2.0]).tensor.dtype == torch.float32
    assert convert([True, False]).tensor.dtype == torch.bool
    assert convert([1, 2], options=ConversionOptions(dtype=torch.float64)).tensor.dtype == torch.float64
    assert convert(np.float64(2.5)).tensor.item() == 2.5


@pytest.mark.parametrize(
    "value, note",
    [
        ([], "empty list"),
        ([[1, 2], [3]], "ragged list (rows of different lengths)"),
        ([1, [2]], "ragged list (numbers mixed with lists)"),
        (["a", "b"], "list of strings"),
        ([1, None], "list contains None"),
        ([torch.ones(1)], "list of tensors (use torch.stack)"),
        (np.array(["a"]), "<U1 arrays are left alone (strings)"),
        (np.array([object()], dtype=object),
         "object arrays are left alone (Python objects, not numbers (arr.astype(float) converts them))"),
        ((1, 2), "tuples are left alone (usually shapes)"),
        ({"a": 1}, "not a list or ndarray"),
    ],
)
def test_what_stays_as_it_is(value, note):
    c = convert(value, "v")
    assert not c.converted and c.note == note


def test_near_misses_exclude_empty_lists_and_tuples():
    assert is_near_miss(convert([1, None]))
    assert not is_near_miss(convert([]))
    assert not is_near_miss(convert((1, 2)))


@pytest.mark.parametrize("value", [[2**63], [2**64 - 1, 2**63, 5], [-(2**63) - 1], [2**70]])
def test_integers_outside_int64_are_left_alone_never_wrapped(value):
    c = convert(value)
    assert not c.converted and c.note.startswith("integers outside int64's range")
    rounded = convert(value, options=ConversionOptions(dtype=torch.float64))
    assert rounded.tensor.tolist() == [float(v) for v in value]


def test_self_referential_and_very_deep_lists_are_refused_quickly():
    rec = []
    rec.append(rec)
    assert convert(rec).note == "contains itself (a self-referential list)"
    inner = [[1, 2], None]
    inner[1] = inner  # off the first path: torch refuses, the explanation must still end
    assert convert(inner).note == "contains itself (a self-referential list)"
    deep = 1
    for _ in range(200):
        deep = [deep]
    assert convert(deep).note == "nested more than 128 levels deep (torch's limit)"
    ok = 1
    for _ in range(128):
        ok = [ok]
    assert convert(ok).tensor.dim() == 128


def test_a_shared_sublist_is_not_a_cycle():
    row = [1, 2]
    c = convert([row, row])
    assert c.tensor.tolist() == [[1, 2], [1, 2]]
    ragged = [[1], [[1]]]
    assert convert(ragged).note.startswith("ragged list")


@pytest.mark.parametrize("dtype, values, expected", [
    (np.uint16, [0, 65535], torch.int32),
    (np.uint32, [0, 2**32 - 1], torch.int64),
    (np.uint64, [0, 2**63 - 1], torch.int64),
])
def test_unsigned_arrays_widen_exactly(dtype, values, expected):
    c = convert(np.array(values, dtype=dtype))
    assert c.tensor.dtype == expected and c.tensor.tolist() == values
    assert "(exact)" in c.copy_reason or "(every value fits)" in c.copy_reason


def test_uint64_beyond_int64_is_left_alone():
    array = np.array([2**64 - 1, 2**63, 5], dtype=np.uint64)
    c = convert(array)
    assert not c.converted and "above int64's maximum" in c.note
    floats = convert(array, options=ConversionOptions(dtype=torch.float64))
    assert floats.tensor.tolist() == [float(2**64 - 1), float(2**63), 5.0]


def test_long_double_converts_when_float64_holds_it_exactly():
    exact = convert(np.array([1.5, -2.25], dtype=np.longdouble))
    assert exact.tensor.dtype == torch.float64 and exact.tensor.tolist() == [1.5, -2.25]
    complex_exact = convert(np.array([1 + 2j], dtype=np.clongdouble))
    assert complex_exact.tensor.dtype == torch.complex128
    if np.finfo(np.longdouble).eps < np.finfo(np.float64).eps:  # x86: 80-bit long double
        finer = np.longdouble(1) + np.finfo(np.longdouble).eps
        c = convert(np.array([finer], dtype=np.longdouble))
        assert not c.converted and "cannot hold exactly" in c.note


def test_an_explicit_integer_dtype_never_wraps():
    c = convert(np.array([1, 300]), options=ConversionOptions(dtype=torch.int8))
    assert not c.converted and "do not fit int8" in c.note
    c = convert(np.array([1.0, np.nan]), options=ConversionOptions(dtype=torch.int64))
    assert not c.converted and "NaN or infinite" in c.note
    assert not convert([300], options=ConversionOptions(dtype=torch.int8)).converted


def test_masked_arrays_are_left_alone():
    c = convert(np.ma.masked_array([1.0, 2.0], mask=[0, 1]))
    assert not c.converted and "masked" in c.note


def test_a_failing_conversion_leaves_the_value_and_says_so(monkeypatch):
    import torchmagic.convert as conversion

    def broken(value, name="", options=None):
        raise RuntimeError("internal")

    monkeypatch.setattr(conversion, "convert", broken)
    converter = Converter(ConversionOptions())
    value = [1, 2]
    assert converter("v", value) is value
    assert "could not be converted: RuntimeError: internal" in converter.report.text()


def test_requires_grad_only_for_floating_results():
    assert convert([1.0], options=ConversionOptions(requires_grad=True)).tensor.requires_grad
    c = convert([1, 2], options=ConversionOptions(requires_grad=True))
    assert not c.tensor.requires_grad and "int64 tensors cannot require grad" in c.note


def test_parse_dtype():
    assert parse_dtype("torch.float16") is torch.float16
    with pytest.raises(OptionError, match="unknown dtype 'floaty'"):
        parse_dtype("floaty")


def test_conversion_lands_on_cpu_and_shares_under_a_meta_default_device():
    array = np.arange(3.0)
    with torch.device("meta"):
        c = convert(array, "a")
    assert c.tensor.device.type == "cpu" and c.shares_memory


def test_converter_reports_loop_assignments_once():
    converter = Converter(ConversionOptions())
    for i in range(3):
        converter("e", [i])
    assert [c.name for c in converter.report.conversions] == ["e"]
    assert "e (x3)" in converter.report.text()


def test_public_convert():
    c = torchmagic.to_tensor(np.ones(2), dtype="float32")
    assert c.tensor.dtype == torch.float32 and "dtype change" in c.copy_reason


@pytest.mark.parametrize("values, dtype, expected", [
    ([2147483647.0], torch.int32, [2147483647]),
    ([123456789.0], torch.int64, [123456789]),
    ([16777217, 0.5], torch.int64, [16777217, 0]),
    ([2**63, 2**64 - 1], torch.uint64, [2**63, 2**64 - 1]),
])
def test_an_integer_dtype_converts_list_values_as_torch_does(values, dtype, expected):
    conversion = convert(values, "v", ConversionOptions(dtype=dtype))
    assert conversion.converted and conversion.tensor.tolist() == expected
