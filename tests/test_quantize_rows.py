"""kcache_ops.quantize_rows is bit for bit reference.quantize_rows: codes and meta with torch.equal
over dtypes, bits, head dims beyond 64/128, odd leading shapes, strided inputs, exact halves (round
half to even) and constant rows; its round trip is within scale / 2 plus the bfloat16 rounding of
scale and min; non-finite input behaves as documented; on CUDA it also captures in a CUDA graph."""
import pytest
import torch
from cuda_checks import requires_cuda
from conftest import DEVICES, DTYPES
from hypothesis import given, settings
from hypothesis import strategies as st

import kcache_ops
from kcache_ops import reference as R

pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest: outputs start as NaN

BITS = [2, 4]


def make_rows(shape, dtype, device):
    """[..., D] of fresh random values: each row its own spread and offset, so that the rows'
    scales and mins span several binades (the bfloat16 rounding of both matters)."""
    lead = (*shape[:-1], 1)
    spread = torch.rand(lead, device=device) * 4 + 0.01  # [..., 1]
    offset = torch.randn(lead, device=device) * 3  # [..., 1]
    return (torch.randn(shape, device=device) * spread + offset).to(dtype)


def check_quantize(v, bits):
    """quantize_rows(v, bits) on v's device equals the reference bit for bit; outputs contiguous,
    of the documented shapes, dtypes and device."""
    lead, D = v.shape[:-1], v.shape[-1]
    codes, meta = kcache_ops.quantize_rows(v, bits)
    assert codes.shape == (*lead, D * bits // 8) and codes.dtype == torch.uint8
    assert meta.shape == (*lead, 2) and meta.dtype == torch.bfloat16
    assert codes.device == v.device and meta.device == v.device
    assert codes.is_contiguous() and meta.is_contiguous()
    ref_codes, ref_meta = R.quantize_rows(v.cpu(), bits)
    assert torch.equal(meta.cpu(), ref_meta)
    assert torch.equal(codes.cpu(), ref_codes)
    return codes, meta


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("D", [64, 128, 4, 8, 72, 200])
def test_matches_reference(device, dtype, bits, D):
    check_quantize(make_rows((3, 5, 97, D), dtype, device), bits)


@pytest.mark.parametrize("D", [2, 6, 66])
def test_four_bits_takes_even_head_dims(device, dtype, D):
    """4 bits: two codes per byte, so any even D (not a multiple of 4) is accepted."""
    check_quantize(make_rows((7, D), dtype, device), 4)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("lead", [(), (1,), (5,), (1, 1, 1), (2, 3, 1, 5), (2, 0, 3)],
                         ids=str)
def test_leading_shapes(device, bits, lead):
    """One row without leading dims, single rows, odd sizes, four leading dims, no rows."""
    check_quantize(make_rows((*lead, 64), torch.float32, device), bits)


@pytest.mark.parametrize("bits", BITS)
def test_strided_inputs(device, dtype, bits):
    """The prefill hand-off's [:, :, :T] slice of a [B, Hkv, S, D] buffer, transposed views, a
    view with a stride-0 (expanded) dim, a slice along D, one row, and five leading dims that do
    not merge (more than the CUDA kernel indexes: its launcher copies v): strides are honoured."""
    B, Hkv, S, T, D = 2, 3, 50, 37, 128
    buf = make_rows((B, Hkv, S, D), dtype, device)
    five = make_rows((2, 3, 2, 3, 2, 64), dtype, device).permute(4, 3, 2, 1, 0, 5)
    views = [buf[:, :, :T], buf.transpose(1, 2), buf[:, 1:, 5:9].transpose(0, 2),
             buf[:, :1].expand(B, 4, S, D), buf[..., 32:96], buf[0, 0, 3], five]
    for v in views:
        assert not v.is_contiguous() or v.dim() == 1
        check_quantize(v, bits)


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_error(device, dtype, bits):
    """|dequant(codes) − v| <= scale / 2 + the bfloat16 rounding of min and of scale (half an ulp,
    at most 2^-8 relative; scale's times the levels, so relative to max − min) + float32 slack."""
    v = make_rows((4, 6, 33, 128), dtype, device)
    codes, meta = kcache_ops.quantize_rows(v, bits)
    back = R.dequantize_rows(codes.cpu(), meta.cpu(), 128)  # [..., D] float32
    x = v.cpu().float()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)  # [..., 1]
    scale = meta.cpu().float()[..., :1]
    magnitude = torch.maximum(lo.abs(), hi.abs()).clamp(min=1)  # [..., 1]
    bound = scale / 2 + (lo.abs() + (hi - lo)) * 2.0 ** -8 + magnitude * 1e-6
    err = (back - x).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max()}"
    assert (err.amax(-1, keepdim=True) > scale / 4).any(), "bound is not tight enough to test"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_round_half_to_even(device, dtype):
    """Values exactly halfway between two codes round to the even code: min 0, max 3 (2 bits) or
    15 (4 bits) make scale 1, so v − min is the unrounded code."""
    row2 = torch.tensor([0, 3, 0.5, 1.5, 2.5, 1, 2, 0.5])
    row4 = torch.tensor([0, 15, 0.5, 1.5, 2.5, 13.5, 14.5, 7.5])
    codes2, _ = check_quantize(row2.to(dtype).to(device), 2)
    codes4, _ = check_quantize(row4.to(dtype).to(device), 4)
    assert codes2.tolist() == [0 | 3 << 2 | 0 << 4 | 2 << 6, 2 | 1 << 2 | 2 << 4 | 0 << 6]
    assert codes4.tolist() == [0 | 15 << 4, 0 | 2 << 4, 2 | 14 << 4, 14 | 8 << 4]


def test_constant_rows_get_scale_zero(device, dtype):
    """max = min: scale 0, every code 0, min the value (rounded to bfloat16)."""
    v = (torch.randn(6, 1, device=device) + 2).repeat(1, 64).to(dtype)
    codes, meta = check_quantize(v, 2)
    assert (codes == 0).all() and (meta[:, 0] == 0).all()
    assert torch.equal(meta[:, 1], v[:, 0].to(torch.bfloat16))


def signed_zero_rows(dtype, device):
    """[6, 64] rows whose min or max is a zero held as both -0 and +0, in both orders (which one
    an fmin keeps depends on the order): zeros and positives, zeros and negatives, zeros only."""
    v = make_rows((6, 64), torch.float32, "cpu").abs() + 0.5  # [6, 64], > 0
    v[0, 3], v[0, 40] = -0.0, 0.0
    v[1, 3], v[1, 40] = 0.0, -0.0
    v[2] = -v[2]
    v[2, 5], v[2, 60] = -0.0, 0.0
    v[3] = -v[3]
    v[3, 5], v[3, 60] = 0.0, -0.0
    v[4] = torch.where(torch.arange(64) % 3 == 0, -0.0, 0.0)
    v[5] = torch.where(torch.arange(64) % 3 == 0, 0.0, -0.0)
    return v.to(dtype).to(device)


def test_signed_zeros(device, dtype):
    """A zero min or max is taken as +0 whatever the signs of the row's zeros: the meta equals
    the reference's bit for bit (no -0 scale or min)."""
    for bits in BITS:
        _, meta = check_quantize(signed_zero_rows(dtype, device), bits)
        assert not torch.signbit(meta[[0, 1, 4, 5], 1]).any()  # the min, 0
        assert not torch.signbit(meta[[4, 5], 0]).any()  # the scale, 0


def extreme_rows(dtype, device):
    """[6, 64] finite rows near the float range: both signs up to 3.4e38 (a span past the float
    range), one sign only, all beyond 2^125, and one within it (untouched by the clamp)."""
    top = torch.finfo(dtype).max
    v = make_rows((6, 64), torch.float32, "cpu")  # [6, 64]
    v[0] = torch.linspace(-1, 1, 64) * top
    v[1] = torch.rand(64) * top
    v[2] = -torch.rand(64) * top
    v[3] = top
    v[4, ::2] = -top
    v[5] = v[5] * 1e36  # within ±2^125 ≈ 4.25e37
    return v.to(dtype).to(device)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_near_the_float_range_stay_finite(device, dtype, bits):
    """A finite row's max and min are clamped to ±2^125: scale, min and every dequantised value
    finite (a span past the float range gave an infinite scale, a NaN copy); bit for bit the
    reference; a row within the range is quantised as without the clamp."""
    v = extreme_rows(dtype, device)
    codes, meta = check_quantize(v, bits)
    assert meta.isfinite().all()
    assert R.dequantize_rows(codes.cpu(), meta.cpu(), 64).isfinite().all()
    within = v[5].float().cpu()
    step = ((within.max() - within.min()) / ((1 << bits) - 1)).to(torch.bfloat16)
    assert torch.equal(meta[5].cpu(), torch.stack([step, within.min().to(torch.bfloat16)]))


@pytest.mark.parametrize("bits", BITS)
def test_non_finite_input(device, bits):
    """As documented: a NaN element is left out of its row's min and max and gets code 0 (the
    reference on the row with that element at the row's min gives the same codes and meta); inf
    gives non-finite meta; every case returns outputs of the right shapes without failing."""
    v = make_rows((5, 64), torch.float32, device)
    v[1] = torch.randn(64, device=device)  # spread >> the bfloat16 rounding of its min
    v[1, 7] = float("nan")
    v[2, :] = float("nan")
    v[3, 9] = float("inf")
    v[4, 0] = float("-inf")
    codes, meta = kcache_ops.quantize_rows(v, bits)
    assert codes.shape == (5, 64 * bits // 8) and meta.shape == (5, 2)
    filled = v[1].cpu().clone()  # [D]
    filled[7] = filled.nan_to_num(float("inf")).min()
    ref_codes, ref_meta = R.quantize_rows(filled, bits)
    assert torch.equal(codes[1].cpu(), ref_codes) and torch.equal(meta[1].cpu(), ref_meta)
    assert (codes[2] == 0).all()
    assert meta[2, 0].item() == float("-inf") and meta[2, 1].item() == float("inf")
    assert not meta[3].isfinite().all() and not meta[4].isfinite().all()
    assert torch.equal(codes[0].cpu(), R.quantize_rows(v[0].cpu(), bits)[0])


def test_opcheck(device):
    v = make_rows((2, 3, 5, 64), torch.bfloat16, device)
    for bits in BITS:
        torch.library.opcheck(torch.ops.kcache_ops.quantize_rows.default, (v, bits))


@requires_cuda
@pytest.mark.parametrize("bits", BITS)
def test_cuda_graph_capture(bits):
    """The decode-step shape [B, Hkv, D] captured in a CUDA graph (no sync, no value-dependent
    allocation) and replayed on new values; and a prefill-sized [B, Hkv, T, D] slice."""
    v = make_rows((4, 8, 128), torch.bfloat16, "cuda")
    kcache_ops.quantize_rows(v, bits)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        codes, meta = kcache_ops.quantize_rows(v, bits)
    v.copy_(make_rows((4, 8, 128), torch.bfloat16, "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    ref_codes, ref_meta = R.quantize_rows(v.cpu(), bits)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(meta.cpu(), ref_meta)
    big = make_rows((2, 8, 4096, 128), torch.float16, "cuda")[:, :, :4001]
    check_quantize(big, bits)


@requires_cuda
@pytest.mark.parametrize("bits", BITS)
def test_cuda_matches_cpu_on_non_finite_input(bits):
    """The CUDA kernel and the CPU op follow the same non-finite rules, bit for bit."""
    v = make_rows((6, 128), torch.float32, "cpu")
    v[1, 7], v[2, :], v[3, 9], v[4, 0] = float("nan"), float("nan"), float("inf"), float("-inf")
    v[5, 3], v[5, 4] = float("inf"), float("-inf")
    got = kcache_ops.quantize_rows(v.cuda(), bits)
    want = kcache_ops.quantize_rows(v, bits)
    assert torch.equal(got[0].cpu(), want[0])
    assert torch.equal(got[1].cpu().view(torch.int16), want[1].view(torch.int16))


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(0, 7), min_size=0, max_size=4), groups=st.integers(1, 50),
       bits=st.sampled_from(BITS), dtype=st.sampled_from(DTYPES), transpose=st.booleans())
def test_random_shapes(lead, groups, bits, dtype, transpose):
    D = groups * 8 // bits
    for device in DEVICES:
        v = make_rows((*lead, D), dtype, device)
        if transpose and v.dim() >= 3:
            v = v.transpose(0, -2)
        check_quantize(v, bits)
