"""Bad and odd data for %%tensor and %tensor: every value converts exactly or is left alone with the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchmagic

SETUP = """
import numpy as np, torch
rec = []
rec.append(rec)
p = []
q = [p]
p.append(q)
deep = 1
for _ in range(200):
    deep = [deep]
"""

# (expression bound to `a` in a %%tensor cell, None when it converts exactly, else a phrase of the note)
ARRAYS = [
    ("np.array([True, False])", None),
    ("np.array([-128, 127], dtype=np.int8)", None),
    ("np.array([-2**15, 2**15 - 1], dtype=np.int16)", None),
    ("np.array([-2**31, 2**31 - 1], dtype=np.int32)", None),
    ("np.array([-2**63, 2**63 - 1], dtype=np.int64)", None),
    ("np.array([0, 255], dtype=np.uint8)", None),
    ("np.array([0, 2**16 - 1], dtype=np.uint16)", None),
    ("np.array([0, 2**32 - 1], dtype=np.uint32)", None),
    ("np.array([0, 2**63 - 1], dtype=np.uint64)", None),
    ("np.array([2**64 - 1, 2**63, 5], dtype=np.uint64)", "uint64 values above int64's maximum"),
    ("np.array([1.5, -np.inf, np.nan], dtype=np.float16)", None),
    ("np.array([1e-45, 3.4e38, np.nan], dtype=np.float32)", None),
    ("np.array([5e-324, 1.7e308, -np.inf])", None),
    ("np.array([1.5, -2.25], dtype=np.longdouble)", None),
    ("np.array([1 + 2j, np.nan], dtype=np.complex64)", None),
    ("np.array([1e300 + 1e-300j])", None),
    ("np.array([1 - 1j], dtype=np.clongdouble)", None),
    ("np.array([object(), 1], dtype=object)", "Python objects, not numbers"),
    ("np.array(['a', 'bc'])", "strings"),
    ("np.array([b'a'])", "bytes"),
    ("np.array(['2020-01-01'], dtype='datetime64[D]')", "torch has no datetime type"),
    ("np.array([1], dtype='timedelta64[s]')", "torch has no timedelta type"),
    ("np.zeros(2, dtype=[('x', 'f4'), ('y', 'i4')])", "structured records"),
    ("np.ma.masked_array([1.0, 2.0], mask=[0, 1])", "torch has no masks"),
    ("np.arange(4, dtype='>f8')", None),
    ("np.arange(6.0)[::-2]", None),
    ("np.arange(3.0).view()", None),
    ("np.array(7.5)", None),
    ("np.zeros((0, 3))", None),
    ("np.arange(12.0).reshape(3, 4)[:, ::2]", None),
    ("np.asfortranarray(np.arange(6).reshape(2, 3))", None),
    ("np.float64(2.5)", None),
    ("np.int8(-3)", None),
    ("np.longdouble(0.5)", None),
    ("np.datetime64('2020-01-01')", "is not numeric"),
    ("np.bool_(True)", None),
]


@pytest.mark.parametrize("expression, refusal", ARRAYS)
def test_every_numpy_dtype_converts_exactly_or_is_left_alone(hostile, expression, refusal):
    hostile.run(SETUP)
    hostile.run(f"src = {expression}")
    source = hostile.ns["src"]
    hostile.run("%%tensor\na = src")
    result = hostile.ns["a"]
    report = hostile.displayed()[0]
    if refusal is None:
        assert isinstance(result, torch.Tensor), report
        exact = np.array_equal(result.numpy(), np.asarray(source), equal_nan=result.is_floating_point()
                               or result.is_complex())
        assert exact and tuple(result.shape) == np.shape(source), (result, source)
    else:
        assert result is source and "a: " in report and refusal in report, report
    hostile.assert_clean()


def test_long_double_finer_than_float64_is_left_alone(hostile):
    if np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps:
        pytest.skip("long double is float64 on this platform")
    hostile.run(SETUP + "fine = np.array([np.longdouble(1) + np.finfo(np.longdouble).eps])")
    hostile.run("%%tensor\na = fine")
    assert hostile.ns["a"] is hostile.ns["fine"] and "cannot hold exactly" in hostile.displayed()[0]


LISTS = [
    ("rec", "contains itself (a self-referential list)"),
    ("p", "contains itself (a self-referential list)"),
    ("deep", "nested more than 128 levels deep"),
    ("[[1, 2], [3]]", "ragged list (rows of different lengths)"),
    ("[1, [2]]", "ragged list (numbers mixed with lists)"),
    ("[[]]", "contains an empty list"),
    ("[1, None]", "list contains None"),
    ("['a', 'b']", "list of strings"),
    ("[b'a']", "list of strings"),
    ("[torch.ones(1), torch.ones(1)]", "list of tensors (use torch.stack)"),
    ("[np.zeros(2), np.ones(2)]", "list of ndarrays"),
    ("[2**64 - 1, 2**63, 5]", "integers outside int64's range"),
    ("[-(2**63) - 1]", "integers outside int64's range"),
    ("[1e39, 1.0]", "values beyond float32's range would become inf"),
    ("[1, {'a': 1}]", "list contains dict"),
    ("[np.longdouble(1.5)]", "torch cannot convert it"),
]


@pytest.mark.parametrize("expression, note", LISTS)
def test_lists_that_do_not_convert_are_left_alone_with_a_note(hostile, expression, note):
    hostile.run(SETUP)
    hostile.run(f"src = {expression}")
    hostile.run("%%tensor\na = src")
    assert hostile.ns["a"] is hostile.ns["src"]
    report = hostile.displayed()[0]
    assert "left alone:" in report and note in report, report
    hostile.assert_clean()


@pytest.mark.parametrize("expression, dtype", [
    ("[True, 2, 3.5]", torch.float32),
    ("[[1, 2], [3, 4]]", torch.int64),
    ("[1 + 2j, 3]", torch.complex64),
    ("[float('nan'), float('inf')]", torch.float32),
    ("[np.float64(1.5), 2]", torch.float64),
    ("[-(2**63), 2**63 - 1]", torch.int64),
])
def test_lists_that_convert_keep_their_values(hostile, expression, dtype):
    hostile.run(SETUP)
    hostile.run(f"src = {expression}")
    hostile.run("%%tensor --quiet\na = src")
    result = hostile.ns["a"]
    assert result.dtype == dtype
    assert np.array_equal(result.numpy(), np.array(hostile.ns["src"], dtype=result.numpy().dtype), equal_nan=True)


LINE_REFUSALS = [
    ("%tensor rec", "left list alone: contains itself"),
    ("%tensor deep", "left list alone: nested more than 128 levels deep"),
    ("%tensor [2**64]", "integers outside int64's range"),
    ("%tensor [1, None]", "list contains None"),
    ("%tensor [[1, 2], [3]]", "ragged list"),
    ("%tensor []", "left the empty list alone: an empty list has no dtype"),
    ("%tensor (1, 2)", "left tuple alone: tuples are left alone"),
    ("%tensor 'abc'", "left str alone: not a list or ndarray"),
    ("%tensor {'a': 1}", "left dict alone: not a list or ndarray"),
    ("%tensor 5", "left int alone: not a list or ndarray"),
    ("%tensor torch.ones(2)", "left Tensor alone: not a list or ndarray"),
    ("%tensor np.array(['a'])", "strings"),
    ("%tensor np.ma.masked_array([1.0], mask=[1])", "torch has no masks"),
    ("%tensor np.array([2**64 - 1], dtype=np.uint64)", "above int64's maximum"),
    ("%tensor --dtype int8 [300]", "value cannot be converted to type int8 without overflow"),
    ("%tensor --dtype int8 np.array([1, 300])", "values from 1 to 300 do not fit int8"),
    ("%tensor --dtype int64 np.array([1.0, np.nan])", "NaN or infinite values cannot become int64"),
    ("%tensor --requires-grad [1, 2]", "only floating point and complex tensors can require grad"),
    ("%tensor --requires-grad np.arange(3)", "only floating point and complex tensors can require grad"),
]


@pytest.mark.parametrize("line, message", LINE_REFUSALS)
def test_the_line_form_refuses_bad_data_on_one_line(hostile, line, message):
    hostile.run(SETUP)
    assert message in hostile.usage_error(f"t = {line}")
    assert "t" not in hostile.ns and torchmagic.last_conversion() is None
    hostile.assert_clean()


def test_on_mode_converts_what_it_can_and_the_cell_still_works(hostile):
    hostile.run(SETUP)
    hostile.run("%tensor on")
    hostile.run("good = [1.0, 2.0]\nloop = rec\nwide = [2**64]\nlabels = [0, 1]\ntotal = good.sum() + len(loop)")
    hostile.run("%tensor off")
    ns = hostile.ns
    assert ns["total"].item() == 4.0 and ns["loop"] is ns["rec"] and ns["wide"] == [2**64]
    assert ns["labels"].dtype == torch.int64
    report = torchmagic.last_conversion()
    assert [c.name for c in report.converted] == ["good", "labels"]
    assert {c.name for c in report.near_misses} == {"loop", "wide"}


def test_a_huge_list_is_converted_without_a_python_walk(hostile):
    hostile.run("values = [float(i) for i in range(200_000)]")
    hostile.run("%%tensor --quiet\nt = values")
    assert hostile.ns["t"].shape == (200_000,) and hostile.ns["t"][-1].item() == 199_999.0
    hostile.assert_collectable("t")
