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
        (np.array(["a"]), "<U1 arrays are left alone (not numeric)"),
        (np.array([object()], dtype=object), "object arrays are left alone (not numeric)"),
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


def test_overflowing_list_is_left_alone_with_torchs_reason():
    c = convert([2**63])
    assert not c.converted and "Overflow" in c.note


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
