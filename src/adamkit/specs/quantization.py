r"""Block-wise quantized optimizer states (``state_precision="int8"`` or ``"int4"``):
the format's specification and its NumPy reference.

A moment tensor :math:`x` is read in row-major order and cut into blocks of
:math:`B` elements (the last block of a tensor may be shorter: ragged tails and
one-element tensors are quantized like everything else): int8's first moment in
blocks of 256, int4's in blocks of 32, and both formats' second moments in blocks of
128.  Each block keeps one *scale* :math:`s` and a :math:`b`-bit code per element, a
level of :math:`r = |x| / s \in [0, 1]` (fp32, correctly rounded).  A first moment's
scale is the block's absolute maximum rounded up to bf16; a second moment's is the
absolute maximum itself, in fp32 (see *Scales* below).

First moment (``exp_avg``): a signed *power map*, :math:`K = 2^{b-1} - 1` levels
each side of zero, evenly spaced in :math:`\sqrt r`, finest near zero:

.. math::

    \text{code} = \operatorname{sign}(x)\,k + K, \quad k \in [0, K], \qquad
    \hat x = s \operatorname{sign}(x) (k / K)^2

Second moments (``exp_avg_sq``, ``exp_inf``, ``max_exp_avg_sq``): a small unsigned
*float* with :math:`E` exponent bits and :math:`M = b - E` mantissa bits (``e4m0``
for int4, or its root map for a block spreading below it; for int8 ``e5m3``, or the
finer ``e4m4`` for a block whose range it holds; see *Two maps* below), relative to the
block scale and without zero:

.. math::

    \hat x = s \cdot 2^{e + 1 - 2^E} (1 + f / 2^M), \qquad
    \text{code} = 2^M e + f, \quad e \in [0, 2^E - 1]

so levels run from :math:`2^{1 - 2^E} s` to :math:`s` (e5m3: :math:`2^{-31}`, 9.3
decades; e4m0: :math:`2^{-15}`, 4.5 decades) with a constant relative spacing
(:math:`2^{-M}` to :math:`2^{1-M}`): small second moments of a block keep their
relative precision, where a power map would crush them onto its lowest levels.  The
code of :math:`r` is read off its fp32 bits: its exponent field less
:math:`128 - 2^E`, and the top :math:`M` bits of its fraction; :math:`r` below the
lowest level takes code 0 (an overestimate: it only shrinks that element's update,
where a zero would make :math:`m / (\sqrt{\hat v} + \epsilon)` explode, the
"zero-point problem" of Li et al., 2023, *Memory Efficient Optimizers with 4-bit
States*).

**Two maps for int8.** A block of int8 second moments takes ``e4m4`` (levels from
:math:`2^{-15}` of its scale, 16 a binade) when fp32(smallest :math:`|x|` / scale)
is at least :math:`2^{-15}`, and ``e5m3`` (from :math:`2^{-31}`, 8 a binade)
otherwise; the stored scale is negated for an ``e4m4`` block (its sign bit names the
map; a scale is otherwise never negative).  Most blocks of a model span fewer than 4.5
decades of :math:`v` and get e4m4's finer spacing, which halves the variance of
stochastic rounding's noise; the others keep every element above the floor.  Both maps' levels are fp32
numbers, and e5m3's in :math:`[2^{-15}, 1]` are among e4m4's, so a block moving between
them is rounded between levels of the map it is stored in, exact in expectation.

**Two maps for int4.** Sixteen levels cannot hold both e4m0's spacing and a wider
range, so int4 keeps e4m0 for a block unless more than a quarter of its nonzero
elements (:data:`ROOT_MAP_SHARE`) have a ratio fp32(:math:`|x|` / scale) below
:math:`2^{-15}`, e4m0's lowest level (a zero :math:`v`, a param that has had no
gradient, needs no range: its update is 0 at any level); such a block
takes the *root map* ``e4m0sqrt``, the e4m0 code of :math:`\rho = \sqrt r` (fp32,
correctly rounded):

.. math::

    \hat x = s \cdot \left(2^{\text{code} - 15}\right)^2 = s \cdot 2^{2\,\text{code} - 30}

levels 4x apart down to :math:`2^{-30} s` (9 decades), rounded stochastically on
:math:`\rho`'s fp32 bits as e4m0 rounds :math:`r` (exact in expectation for
:math:`\sqrt v`, which the update divides by).  Its scale is negated, as int8's finer
map's is.  A block's quiet elements then keep their own :math:`v` instead of e4m0's
floor (with gradient scales spread over four decades, the median stored :math:`v` went
from 1.68x fp32's to 0.96x; with quiet elements six decades of :math:`v` below the
busy ones of their block, from 34x to 1.06x).  The share decides rather than the smallest
element: a block with a few elements below the floor keeps e4m0's finer spacing, whose
lower noise the update direction needs on real tasks (``benchmarks/int4_designs.py``).
The levels are powers of two times the scale in both maps, so the divisor of a
normalized first moment (below) is one number per block in either.  Kernels count the
elements below while they make e4m0's codes, from the ratio they compute anyway, and
make the root map's codes in a second pass for a block that takes it.

**Why the range.** A block's second moments spread over twice as many decades as
its gradients do.  Where the gradients' scales inside a block spread over three decades
or more (inputs or units that are rarely active beside busy ones), e4m4 alone held a
third of the elements at its floor, above their true :math:`v` (overestimated: their
updates shrink), and e5m3 alone, which reaches :math:`2^{-31}`, pays with a coarser
spacing everywhere: its noise made the steps a little longer on average (the mean of
:math:`1 / \sqrt{\hat v}` grows with the noise), and the panel's regression ended 1.5 %
below fp32's loss.  Measured in ``benchmarks/wide_range.py`` and ``benchmarks/fidelity.py``
(see ``docs/lean-memory.md``).

**Normalized first moment (int4).** int4 stores its first moment divided by a
divisor :math:`d` near the root of the second moment the same step stores,
:math:`u = \operatorname{fl}(m r)` with :math:`r \approx 1/d`, and reads it back as
:math:`m = \operatorname{fl}(\hat u\, d)` with the :math:`\hat v` it reads (the same
one).  :math:`d = 2^{\lfloor e/2 \rfloor}`, times :math:`\operatorname{fl}(\sqrt 2)`
for odd :math:`e`, the exponent of :math:`\hat v` (AdaMax, whose :math:`\hat v` is a
norm: :math:`d = 2^e`; :func:`first_moment_divisor`): :math:`\sqrt{\hat v} / d` is in
:math:`[1, \sqrt 2)`, and the same for every element of a block of :math:`\hat v`
(its values are its scale times powers of two), so the first moment is scaled as by
:math:`\sqrt{\hat v}` itself, for integer operations on :math:`\hat v`'s bits and a
multiply (a square root and a division cost int4's step 16 %; a power of two alone,
without the odd exponents' factor, left a factor :math:`\sqrt 2` between elements of a
block and 14 % more error on :math:`m` than the plain format on uniform gradients,
against 9 % with :math:`\sqrt{\hat v}`).  :math:`u` is of the order of an update for
every element, so a block's quiet elements are no longer rounded against its busy ones:
with :math:`m` itself under 15 levels, a quiet element's :math:`m` was stored as 0 or
as 1/49 of its block's largest, and only :math:`v`'s floor at :math:`2^{-15}` of its
block bounded the step that kick gave.  ADOPT's first moment averages
:math:`g / \sqrt v` and is normalized already: it is stored as it is
(:data:`PLAIN_FORMATS`).  A kernel stores the second moment first, reads its stored
values back, then multiplies; the key is ``exp_avg_int4_normalized``.

**Rounding.** A moment written by an optimizer step is rounded *stochastically*
between its two neighbouring levels :math:`lo \le r \le hi`, away from :math:`lo`
with probability :math:`(r - lo) / (hi - lo)`, so that the stored value is the exact
one in expectation.  Rounding to nearest would freeze a second moment: near
convergence, :math:`v` must decay by :math:`1 - \beta_2` (0.1 %) per step, far less
than half a level, so a nearest-rounded block requantizes to itself, step after step,
while the gradients shrink.  The random bits are those of :mod:`adamkit.specs.rounding`
(16 bits :math:`u` per element, a hash of seed, param, slot, step and element), so
every backend stores the same codes:

* second moments: add :math:`u \cdot 2^{L - 16}` to the fp32 bits of :math:`r`, with
  :math:`L = 23 - M` the fraction bits below the kept ones, then truncate them (the
  carry rounds up with the right probability; levels are the fp32 numbers with
  :math:`M` fraction bits, so this *is* value-domain stochastic rounding);
* first moment: between the levels :math:`L_k = (k c)^2`, :math:`c = 1/K` (fp32:
  :math:`c` rounded, then each product), :math:`k` the largest index with
  :math:`L_k \le r`, and up to :math:`k + 1` when
  :math:`2^{16} (r - L_k) \ge g_k (2^{16} - u)`, with the level gap
  :math:`g_k = L_{k+1} - L_k` (:math:`g_K = \infty`: the top level stays).  Nothing
  is divided but :math:`r`: kernels compute :math:`L` and :math:`g` (or read the
  tables :func:`signed_magnitudes`, :func:`signed_gaps`) and find :math:`k` from
  :math:`\lfloor K \sqrt r \rfloor` (any square root: one comparison either side
  corrects it).

**Scales.** A second moment must follow a slow decay, and its scale decides how
well it can.  Rounded up to bf16, the scale puts a block's largest element up to
0.4 % below the top level, where stochastic rounding sends it a level down now and
then, a noise every element of the block inherits.  So second moments keep their
block's exact absmax (fp32, 4 bytes a block): the largest element is the top level,
and a block decaying as a whole keeps its codes while the scale follows it.  Measured
on the decaying stream of ``tests/test_lean_tracking.py``
(``benchmarks/second_moment_bits.py``: 2000 steps, blocks of 128; median stored v /
fp32 v and the share of elements more than 2x off): e4m4 0.992, 0 % with an exact
scale, 0.965, 1.3 % under a bf16 one; e4m0 0.816, 30 % against 0.633, 52 %.  An
earlier int8 format kept bf16 scales and stored every ratio :math:`r \ge 1 - 2^{-8}`
as the top level (:data:`SNAP_TO_TOP`; e4m4 0.984, 1.5 %); within issue 37's budget
(2.05 bytes a param for both moments) fp32 scales on blocks of 128 now fit.  The
first moment keeps the bf16 ceiling (it moves by 10 % of the gradient a step, and the
noise a bf16 scale adds is small beside its rounding).

Blocks: int8's first moment in 256 (its 255 levels leave little to gain), int4's in
32: on the regression task of ``benchmarks/fidelity.py`` a first moment with 15
levels in blocks of 32 followed fp32's updates with about two thirds of the error of
blocks of 128, for 0.047 bytes a param more (int4: 1.094 bytes a param of state,
int8: 2.039).

Values converted once rather than stepped (a checkpoint loaded into a quantized
optimizer, a state converted between precisions) are rounded to nearest:
:math:`k = \lfloor K \sqrt r + \tfrac12 \rfloor`, and half of the dropped fraction
added before truncation for the float map.

Arithmetic is fp32 and correctly rounded at every operation (``|x| / s``, the
level products and differences, the comparison's two products), so every backend
produces the same codes.  A block whose scale is zero stores codes 0 (it dequantizes
to zeros); a block holding a NaN or an infinity stores the scale NaN (every element dequantizes to
NaN: a non-finite moment poisons its block).

**Overflow.** A finite gradient whose square overflows fp32 (:math:`|g| > 1.8 \cdot 10^{19}`)
makes :math:`v = +\infty`; fp32 Adam then moves that element by
:math:`m / (\sqrt{\infty} + \epsilon) = 0`, that step and every later one, and keeps
its weights finite.  A second moment is therefore stored no larger than the largest
finite scale its format holds (:func:`second_moment_ceiling`: bf16's largest number
under a bf16 scale, fp32's under an exact one, :math:`\approx 3.4 \cdot 10^{38}`), so
every weight stays finite.  The step that overflows moves the element by 0, as fp32
Adam (the update reads the fresh fp32 :math:`v`); later steps read the stored ceiling
and move it by :math:`\eta\, \hat m / \sqrt{\hat v} \approx \eta\, m / (1.8 \cdot 10^{19})`,
small unless :math:`|g|` was far beyond the overflow, where fp32 Adam moves it by 0.
A first moment under a bf16 scale has a ceiling too (bf16's largest number,
:math:`\approx 3.39 \cdot 10^{38}`, just below fp32's): a finite :math:`m` beyond it
(:math:`|g|` within 0.4 % of fp32's largest number) is stored at the ceiling with its
sign (:func:`held_at_ceiling`), where its scale would otherwise round up to infinity and
its block become NaN.
The other elements of its block fall below the map's lowest level (:math:`2^{1 - 2^E}`
of that scale) and are held there, so their updates all but stop until the block's
:math:`v` has decayed (fp32 Adam does not touch them).  A NaN, or an infinite gradient,
still poisons its block.

Packing: int8 codes are one byte each; int4 codes two to a byte, element
:math:`2j` in the low nibble and :math:`2j + 1` in the high one.  A state holds, per
moment, its codes (uint8, flat) and its scales (one per block; bf16 for the first
moment, fp32 for the second ones): ``exp_avg_int8`` and ``exp_avg_int8_scales``,
``exp_avg_sq_e5m3_e4m4`` and ``exp_avg_sq_e5m3_e4m4_scales`` (int4: ``_int4_normalized``
and ``_e4m0_e4m0sqrt``).

Older checkpoints load (:data:`LEGACY_FORMATS` reads them) and the optimizer
converts them at its next step: adamkit's first format kept the second moments in a
power map too (``exp_avg_sq_int8``: :math:`\hat x = s ((\text{code} + 1) / 2^b)^2`,
every code rounded to nearest); later ones kept int8's second moments in e4m4
(``exp_avg_sq_e4m4``) in blocks of 256 (bf16 or fp32 scales), then in blocks of 128
under bf16 scales snapped to the top, int4's second moments with bf16 scales (widened
to fp32 exactly), int4's first moment in blocks of 128, and not normalized, and int4's
second moments in e4m0 alone (both until 2026-12-06).

The block sizes were chosen by measured error on the moments of a real model
(``benchmarks/quantization_error.py``); the second moment's map and the rounding by
tracking fp32 Adam over thousands of steps of shrinking gradients
(``tests/test_lean_tracking.py``, ``benchmarks/fidelity.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

#: the moment slots that take the signed map; the others are non-negative
SIGNED_KEYS = frozenset({"exp_avg", "exp_avg_slow"})

#: the float map's exponent bits by default (int4's e4m0), and the exponent of its
#: smallest level (2^-15); a format's own are :attr:`QuantFormat.exponent_bits` and
#: :attr:`QuantFormat.min_exponent` (int8's e5m3: 5 and -31)
EXPONENT_BITS = 4
MIN_EXPONENT = -15


@dataclass(frozen=True)
class QuantFormat:
    """One quantized-state format: bits per code, elements per block, the first
    moment's power map, and the second moments' map (a small float, or for
    ``legacy`` checkpoints a power map)."""

    name: str
    bits: int
    block: int
    #: the second moments' block (None: ``block``) and whether their scales are exact
    second_block: int | None = None
    exact_second_scales: bool = True
    #: the second moments' float map: exponent bits E (levels from 2^(1 - 2^E) of the scale)
    exponent_bits: int = EXPONENT_BITS
    #: a finer float map (fewer exponent bits) for the blocks whose range it holds, or None
    fine_exponent_bits: int | None = None
    #: a wider map for the blocks that spread below the float map's lowest level: the
    #: float map's code of sqrt(r) (int4's ``e4m0sqrt``: levels 4x apart, from 2^-30;
    #: see *Two maps*); for a map without fraction bits
    root_map: bool = False
    power: int = 2
    legacy: bool = False
    #: the first moments are stored divided by the second moment's scale
    #: (:func:`first_moment_divisor`; see *Normalized first moment*)
    normalized_first_moment: bool = False

    @property
    def signed_levels(self) -> int:
        """K: the signed map's codes run over [-K, K]."""
        return (1 << (self.bits - 1)) - 1

    @property
    def unsigned_levels(self) -> int:
        """N: the legacy unsigned map's levels are 1/N, ..., N/N in the companded domain."""
        return 1 << self.bits

    @property
    def mantissa_bits(self) -> int:
        """M: the float map's fraction bits (3 for int8's e5m3, 0 for int4's e4m0)."""
        return self.bits - self.exponent_bits

    @property
    def min_exponent(self) -> int:
        """The exponent of the float map's lowest level: 1 - 2^E (-31 for e5m3, -15 for e4m0)."""
        return 1 - (1 << self.exponent_bits)

    def __post_init__(self):
        assert not (self.root_map and self.fine_exponent_bits is not None), "one second map at most"
        assert not self.root_map or self.mantissa_bits == 0, "a root map squares levels without fraction bits"

    @property
    def marks_map(self) -> bool:
        """Whether the second moments have a second map, named by a negative block
        scale: a finer one (int8's e4m4) or a wider one (int4's root map)."""
        return self.fine_exponent_bits is not None or self.root_map

    def float_map(self, marked: bool = False) -> tuple[int, int]:
        """(M, the exponent of the lowest level) of the second moments' float map, or of
        the map a negative scale names (``marked``): (3, -31) for e5m3, (4, -15) for e4m4,
        (0, -15) for e4m0 (a root map is the float map, applied to sqrt r)."""
        exponent_bits = self.fine_exponent_bits if marked and self.fine_exponent_bits else self.exponent_bits
        return self.bits - exponent_bits, 1 - (1 << exponent_bits)

    @property
    def unsigned_name(self) -> str:
        """The second moments' key suffix: the float map's name, e.g. ``e4m0``, and the
        second map's where the format has one (``e5m3_e4m4``, ``e4m0_e4m0sqrt``)."""
        if self.legacy:
            return self.name
        names = [f"e{e}m{self.bits - e}" for e in (self.exponent_bits, self.fine_exponent_bits) if e is not None]
        if self.root_map:
            names.append(f"{names[0]}sqrt")
        return "_".join(names)

    @property
    def signed_name(self) -> str:
        """The first moments' key suffix: the format's name, ``_normalized`` added where
        they are stored normalized (``int4_normalized``)."""
        return f"{self.name}_normalized" if self.normalized_first_moment else self.name

    def key_suffix(self, signed: bool) -> str:
        return self.signed_name if signed else self.unsigned_name

    def holds_like(self, other: QuantFormat, signed: bool) -> bool:
        """Whether a moment stored in ``other`` is stored as this format stores it (a
        second moment does not depend on how the first moment is normalized)."""
        if signed:
            return self == other
        return replace(self, normalized_first_moment=False) == replace(other, normalized_first_moment=False)

    def code_bytes(self, numel: int) -> int:
        return numel if self.bits == 8 else (numel + 1) // 2

    def block_of(self, signed: bool) -> int:
        """Elements per block of the first moment (``signed``) or of the second moments."""
        return self.block if signed or self.second_block is None else self.second_block

    def blocks(self, numel: int, signed: bool) -> int:
        return -(-numel // self.block_of(signed))

    def exact_scales(self, signed: bool) -> bool:
        """Whether a moment's block scales are its exact absmax (fp32: the second
        moments) rather than the absmax rounded up to bf16."""
        return not (signed or self.legacy) and self.exact_second_scales

    def snaps_to_top(self, signed: bool) -> bool:
        """Whether ratios within 2^-8 of the top level are stored as the top level (a
        second moment under a bf16 scale; see *Scales*)."""
        return not (signed or self.legacy or self.exact_second_scales)

    def scale_bytes(self, signed: bool) -> int:
        return 4 if self.exact_scales(signed) else 2

    def bytes_per_state(self, numel: int, signed: bool) -> int:
        """Bytes held for one quantized moment of ``numel`` elements (codes and scales)."""
        return self.code_bytes(numel) + self.scale_bytes(signed) * self.blocks(numel, signed)


FORMATS = {
    "int8": QuantFormat("int8", bits=8, block=256, second_block=128, exponent_bits=5, fine_exponent_bits=4),
    "int4": QuantFormat("int4", bits=4, block=32, second_block=128, root_map=True, normalized_first_moment=True),
}

#: the formats for an algorithm whose first moment is normalized already (ADOPT's
#: averages g / sqrt(v)): int4's first moment stored as it is (int4's format before
#: 2026-12-06, for every algorithm)
PLAIN_FORMATS = {name: replace(fmt, normalized_first_moment=False) for name, fmt in FORMATS.items()}

#: the share of a block's nonzero second moments below its float map's lowest level
#: beyond which the block takes a root map: more than a quarter (see *Two maps*)
ROOT_MAP_SHARE = 4


#: the divisor's exponents are held to [-126, 126], where it and its reciprocal are
#: normal fp32 numbers (a root's exponent is within [-64, 64] anyway)
DIVISOR_EXPONENT_LIMIT = 126


def format_for(state_precision: str, normalizes_first_moment: bool = True) -> QuantFormat:
    """The format ``state_precision`` stores an algorithm's moments in: its first moment
    plain where it is normalized already (``normalizes_first_moment`` False: ADOPT's)."""
    return FORMATS[state_precision] if normalizes_first_moment else PLAIN_FORMATS[state_precision]


#: fl(sqrt(2)) and fl(1 / sqrt(2)): the odd-exponent factors of a root's divisor
ROOT_TWO, ROOT_HALF = np.float32(np.sqrt(2.0)), np.float32(np.sqrt(0.5))


def first_moment_divisor(second: np.ndarray, root: bool, reciprocal: bool = False) -> np.ndarray:
    """The divisor d of a normalized first moment, per element, from the second moment v
    as stored (fp32), or (``reciprocal``) the factor r a first moment is multiplied by
    to store it: u = fl(m r), m = fl(u d).  With e the exponent of v (its exponent field
    less 127: -127 for zero and subnormals, 128 for infinity and NaN):

    * ``root`` (v an average of g^2): k = floor(e / 2), d = 2^k and r = 2^-k for even e,
      d = fl(sqrt 2) 2^k and r = fl(1 / sqrt 2) 2^-k for odd e;
    * a norm (AdaMax's v): k = e, d = 2^k, r = 2^-k;

    k held to [-126, 126].  d and r are exact products.  sqrt(v) / d (v / d for a norm)
    is within [1, sqrt 2) ([1, 2)), and it is *the same* for every element of a block
    of int4's v, whose values are its scale times powers of two: d is sqrt(v) over a
    factor common to the block, so the first moment's blocks (inside v's) are scaled
    as by sqrt(v) itself, for a few integer operations and a multiply."""
    bits = np.asarray(second, dtype=np.float32).view(np.uint32).astype(np.int64) & 0x7FFFFFFF
    e = (bits >> 23) - 127
    k = np.clip(e >> 1 if root else e, -DIVISOR_EXPONENT_LIMIT, DIVISOR_EXPONENT_LIMIT)
    power = (((127 - k) if reciprocal else (127 + k)) << 23).astype(np.uint32).view(np.float32)
    if not root:
        return power
    odd = (e & 1) == 1
    return np.where(odd, power * (ROOT_HALF if reciprocal else ROOT_TWO), power).astype(np.float32)


#: how older checkpoints hold their moments (read, then converted at the next step):
#: the power map of the first format; int8's e4m4 in blocks of 256 (bf16 or fp32
#: scales) and in blocks of 128 under bf16 scales snapped to the top; int4's first
#: moment in blocks of 128, and in blocks of 32 not normalized; int4's second moments
#: in e4m0 alone (until 2026-12-06)
LEGACY_FORMATS = {
    "int8": (
        QuantFormat("int8", 8, 256, legacy=True),
        QuantFormat("int8", 8, 256, second_block=128, exact_second_scales=False, exponent_bits=4),
        QuantFormat("int8", 8, 256, exponent_bits=4),
    ),
    "int4": (
        QuantFormat("int4", 4, 128, legacy=True),
        QuantFormat("int4", 4, 128),
        replace(PLAIN_FORMATS["int4"], root_map=False),
        replace(FORMATS["int4"], root_map=False),
    ),
}

#: a second moment's ratio at or above this is stored as the top level under a bf16 scale
SNAP_TO_TOP = np.float32(1 - 2.0**-8)


def is_quantized(state_precision: str | None) -> bool:
    return state_precision in FORMATS


def codes_key(key: str, fmt: QuantFormat) -> str:
    """The state key of moment ``key``'s codes, e.g. ``exp_avg_int8`` or ``exp_avg_sq_e4m0_e4m0sqrt``."""
    return f"{key}_{fmt.key_suffix(key in SIGNED_KEYS)}"


def scales_key(key: str, fmt: QuantFormat) -> str:
    """The state key of moment ``key``'s block scales, e.g. ``exp_avg_int8_scales``."""
    return f"{codes_key(key, fmt)}_scales"


# ---------------------------------------------------------------------------- reference


def _blocked(x: np.ndarray, block: int) -> np.ndarray:
    """x (flat) as rows of ``block`` elements, the ragged tail padded with zeros."""
    rows = -(-x.size // block)
    padded = np.zeros(rows * block, dtype=np.float32)
    padded[: x.size] = x
    return padded.reshape(rows, block)


def bfloat16_ceil(x: np.ndarray) -> np.ndarray:
    """Non-negative fp32 values rounded *up* to the next bfloat16 (as fp32 values)."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    up = np.where(bits & 0xFFFF, (bits + 0x10000) & 0xFFFF0000, bits).astype(np.uint32)
    return up.view(np.float32)


def block_scales(x: np.ndarray, block: int, exact: bool = False) -> np.ndarray:
    """Each block's absmax (fp32), rounded up to bf16 unless ``exact``; NaN for a
    block holding a NaN or an infinity, or whose absmax rounds up past bf16's range."""
    rows = _blocked(np.asarray(x, dtype=np.float32).ravel(), block)
    with np.errstate(invalid="ignore"):
        scales = np.abs(rows).max(axis=1)
        scales = scales if exact else bfloat16_ceil(scales)
    scales[~np.isfinite(rows).all(axis=1) | ~np.isfinite(scales)] = np.nan
    return scales


def fine_blocks(x: np.ndarray, scales: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    """Per block of second moments: whether the format's finer map holds it, i.e. its
    scale is positive and finite and fp32(smallest ``abs(x)`` / scale) is at least the
    finer map's lowest level (always False for a format without one)."""
    usable = np.isfinite(scales) & (scales > 0)
    if fmt.fine_exponent_bits is None:
        return np.zeros(scales.shape, dtype=bool)
    block = fmt.block_of(False)
    flat = np.abs(np.asarray(x, dtype=np.float32).ravel())
    padded = np.full(scales.size * block, np.inf, dtype=np.float32)
    padded[: flat.size] = flat
    smallest = padded.reshape(-1, block).min(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (smallest / np.where(usable, scales, np.float32(1))).astype(np.float32)
    return usable & (ratio >= np.float32(2.0 ** fmt.float_map(marked=True)[1]))


def root_blocks(x: np.ndarray, scales: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    """Per block of second moments: whether it takes the format's root map, i.e. its
    scale is positive and finite and more than a quarter of its nonzero ratios
    fp32(``abs(x)`` / scale) lie below the float map's lowest level (always False for a
    format without a root map)."""
    usable = np.isfinite(scales) & (scales > 0)
    if not fmt.root_map:
        return np.zeros(scales.shape, dtype=bool)
    block = fmt.block_of(False)
    flat = np.asarray(x, dtype=np.float32).ravel()
    r = _ratios(flat, np.where(usable, scales, np.float32(0)), block)
    padded = np.zeros(scales.size * block, dtype=np.float32)
    padded[: flat.size] = r
    rows = padded.reshape(-1, block)
    below = ((rows > 0) & (rows < np.float32(2.0**fmt.min_exponent))).sum(axis=1)
    return usable & (ROOT_MAP_SHARE * below > (rows > 0).sum(axis=1))


def marked_blocks(x: np.ndarray, scales: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    """Per block of second moments: whether it takes the format's second map (its
    finer map where the block's range fits it, its root map where the block spreads
    below the float map)."""
    return root_blocks(x, scales, fmt) if fmt.root_map else fine_blocks(x, scales, fmt)


def marked_scales(scales: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """Second-moment scales as stored: negative (the sign bit set) where the block takes
    the second map."""
    return np.where(marked, -scales, scales).astype(np.float32)


def _ratios(x: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """r = |x| / |s| per element, fp32 (0 in a block whose scale is zero or NaN)."""
    s = np.abs(np.repeat(scales, block)[: x.size])
    usable = np.isfinite(s) & (s > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(usable, np.abs(x) / np.where(usable, s, np.float32(1)), np.float32(0)).astype(np.float32)


def signed_magnitudes(fmt: QuantFormat) -> np.ndarray:
    """The signed map's levels L_k = (k c)^2, c = 1/K (fp32: c rounded, then each
    product) for k = 0..K, then +inf (K + 2 entries: a kernel may look one past the
    top).  Products rather than k / K: a kernel computes a level in two multiplies."""
    K = fmt.signed_levels
    t = (np.arange(K + 1).astype(np.float32) * (np.float32(1) / np.float32(K))).astype(np.float32)
    return np.append(t * t, np.float32(np.inf)).astype(np.float32)


def signed_gaps(fmt: QuantFormat) -> np.ndarray:
    """g_k = L_{k+1} - L_k (fp32) for k = 0..K, g_K = +inf: no level above the top."""
    levels = signed_magnitudes(fmt)
    gaps = (levels[1:] - levels[:-1]).astype(np.float32)
    gaps[-1] = np.inf
    return gaps


def _signed_codes(x: np.ndarray, r: np.ndarray, fmt: QuantFormat, bits16: np.ndarray | None) -> np.ndarray:
    K = fmt.signed_levels
    if bits16 is None:
        k = np.floor(np.float32(K) * np.sqrt(r) + np.float32(0.5)).astype(np.int64)
    else:  # the level below r, and up with probability (r - L_k) / g_k
        levels = signed_magnitudes(fmt)
        k = np.searchsorted(levels[: K + 1], r, side="right").astype(np.int64) - 1
        distance = ((r - levels[k]) * np.float32(65536)).astype(np.float32)
        threshold = signed_gaps(fmt)[k] * (np.float32(65536) - np.asarray(bits16, dtype=np.float32).reshape(r.shape))
        k = k + (distance >= threshold.astype(np.float32))
    return np.where(x < 0, -k, k) + K


def _float_codes(r: np.ndarray, fmt: QuantFormat, bits16: np.ndarray | None, marked: np.ndarray) -> np.ndarray:
    """The float map's codes of r (the second map's where ``marked``, per element: a
    root map's are the float map's codes of fp32 sqrt(r), correctly rounded)."""
    codes = np.zeros(r.shape, dtype=np.int64)
    for which in (False, True) if fmt.marks_map else (False,):
        mantissa, lowest = fmt.float_map(which)
        dropped = 23 - mantissa
        rooted = np.sqrt(r).astype(np.float32) if which and fmt.root_map else r
        bits = rooted.view(np.uint32).astype(np.int64)
        if bits16 is None:
            bits = bits + (1 << (dropped - 1))
        else:
            bits = bits + (np.asarray(bits16, dtype=np.int64).reshape(r.shape) << (dropped - 16))
        first = (127 + lowest) << mantissa
        codes = np.where(marked == which, np.clip((bits >> dropped) - first, 0, (1 << fmt.bits) - 1), codes)
    return codes


def _legacy_unsigned_codes(r: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    nearest = np.floor(np.float32(fmt.unsigned_levels) * np.sqrt(r) + np.float32(0.5)).astype(np.int64)
    return np.maximum(nearest - 1, 0)


def level_codes(
    x: np.ndarray, scales: np.ndarray, fmt: QuantFormat, signed: bool, bits16: np.ndarray | None = None
) -> np.ndarray:
    """Each element's code (int64, unpacked), given its block's scale (as stored: a
    negative second-moment scale selects the second map): rounded stochastically with
    the 16 random bits ``bits16`` of each element, or to nearest when ``bits16`` is None."""
    x = np.asarray(x, dtype=np.float32).ravel()
    r = _ratios(x, scales, fmt.block_of(signed))
    if fmt.snaps_to_top(signed):
        r = np.where(r >= SNAP_TO_TOP, np.float32(1), r).astype(np.float32)
    if signed:
        return _signed_codes(x, r, fmt, bits16)
    if fmt.legacy:
        return _legacy_unsigned_codes(r, fmt)
    return _float_codes(r, fmt, bits16, np.repeat(scales < 0, fmt.block_of(False))[: x.size])


def unsigned_levels(codes: np.ndarray, fmt: QuantFormat, marked: np.ndarray | bool = False) -> np.ndarray:
    """fp32 levels (fractions of the block scale) of second-moment codes, in the second
    map where ``marked`` (per element; a root map's level is the square of the float
    map's, 2^(2 (code + L)): the pattern (2 code + 127 + 2 L) << 23)."""
    codes = np.asarray(codes, dtype=np.int64)
    if fmt.legacy:
        t = (codes + 1).astype(np.float32) / np.float32(fmt.unsigned_levels)
        return (t * t).astype(np.float32)
    levels = np.zeros(codes.shape, dtype=np.float32)
    for which in (False, True) if fmt.marks_map else (False,):
        mantissa, lowest = fmt.float_map(which)
        if which and fmt.root_map:
            level = ((2 * codes + 127 + 2 * lowest) << 23).astype(np.uint32).view(np.float32)
        else:
            first = (127 + lowest) << mantissa
            level = ((codes + first) << (23 - mantissa)).astype(np.uint32).view(np.float32)
        levels = np.where(np.asarray(marked) == which, level, levels)
    return levels


def level_values(codes: np.ndarray, scales: np.ndarray, fmt: QuantFormat, signed: bool) -> np.ndarray:
    """The dequantized fp32 values of unpacked codes."""
    codes = np.asarray(codes, dtype=np.int64)
    if signed:
        k = codes - fmt.signed_levels
        level = np.sign(k).astype(np.float32) * signed_magnitudes(fmt)[np.abs(k)]
    s = np.repeat(scales, fmt.block_of(signed))[: codes.size]
    if not signed:  # a negative scale: the block's second map
        level, s = unsigned_levels(codes, fmt, s < 0), np.abs(s)
    return (s * level.astype(np.float32)).astype(np.float32)


def pack(codes: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    """Unpacked codes as the stored uint8 bytes (two per byte for int4)."""
    codes = np.asarray(codes, dtype=np.uint8).ravel()
    if fmt.bits == 8:
        return codes
    pairs = np.zeros(2 * fmt.code_bytes(codes.size), dtype=np.uint8)
    pairs[: codes.size] = codes
    return pairs[0::2] | (pairs[1::2] << 4)


def unpack(stored: np.ndarray, fmt: QuantFormat, numel: int) -> np.ndarray:
    stored = np.asarray(stored, dtype=np.uint8).ravel()
    if fmt.bits == 8:
        return stored[:numel].astype(np.int64)
    both = np.stack([stored & 0xF, stored >> 4], axis=1).ravel()
    return both[:numel].astype(np.int64)


def moment_ceiling(fmt: QuantFormat, signed: bool) -> np.float32:
    """The largest magnitude ``fmt`` stores a moment at (see *Overflow*): its largest
    finite block scale, bf16's largest number under a bf16 scale, fp32's under an exact one."""
    if fmt.exact_scales(signed):
        return np.float32(np.finfo(np.float32).max)
    return np.uint32(0x7F7F0000).view(np.float32)


def second_moment_ceiling(fmt: QuantFormat) -> np.float32:
    """The largest second moment ``fmt`` stores: :func:`moment_ceiling` of a second moment."""
    return moment_ceiling(fmt, False)


def held_at_ceiling(x: np.ndarray, fmt: QuantFormat, signed: bool) -> np.ndarray:
    """``x`` as a step stores it (see *Overflow*): a second moment above its ceiling at
    the ceiling (an infinite one too), a finite first moment beyond it at the ceiling with
    its sign (an infinite one stays infinite: it poisons its block); NaN stays NaN."""
    x = np.asarray(x, dtype=np.float32)
    if fmt.legacy:
        return x
    ceiling = moment_ceiling(fmt, signed)
    if not signed:
        return np.minimum(x, ceiling)
    return np.where(np.isfinite(x) & (np.abs(x) > ceiling), np.copysign(ceiling, x), x).astype(np.float32)


def quantize(
    x: np.ndarray, fmt: QuantFormat, signed: bool, bits16: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(stored codes, scales) of ``x`` (any shape; read in row-major order), rounded
    stochastically with ``bits16`` (one per element) or, without, to nearest; a moment
    beyond :func:`moment_ceiling` is stored as :func:`held_at_ceiling` holds it."""
    x = held_at_ceiling(x, fmt, signed)
    block = fmt.block_of(signed)
    scales = block_scales(x, block, exact=fmt.exact_scales(signed))
    if not signed:
        scales = marked_scales(scales, marked_blocks(x, scales, fmt))
    codes = level_codes(x, scales, fmt, signed, bits16)
    codes[np.repeat(~np.isfinite(scales), block)[: codes.size]] = 0
    return pack(codes, fmt), scales


def dequantize(stored: np.ndarray, scales: np.ndarray, fmt: QuantFormat, signed: bool, shape) -> np.ndarray:
    """fp32 values of ``shape`` from stored codes and scales."""
    numel = int(np.prod(shape, dtype=np.int64))
    return level_values(unpack(stored, fmt, numel), scales, fmt, signed).reshape(shape)


__all__ = [
    "DIVISOR_EXPONENT_LIMIT",
    "ROOT_HALF",
    "ROOT_TWO",
    "FORMATS",
    "LEGACY_FORMATS",
    "PLAIN_FORMATS",
    "ROOT_MAP_SHARE",
    "SIGNED_KEYS",
    "QuantFormat",
    "block_scales",
    "codes_key",
    "dequantize",
    "fine_blocks",
    "first_moment_divisor",
    "format_for",
    "is_quantized",
    "level_codes",
    "level_values",
    "marked_blocks",
    "marked_scales",
    "pack",
    "quantize",
    "root_blocks",
    "scales_key",
    "held_at_ceiling",
    "moment_ceiling",
    "second_moment_ceiling",
    "signed_gaps",
    "signed_magnitudes",
    "unpack",
    "unsigned_levels",
]
