"""Sparsification rules: per-token keep-masks over the last (feature) dimension.

The semantics are the paper's released rule code, bit for bit (see the golden vectors):

* ``topp``: ``a = |x| ** power`` (in the input dtype), sort descending, cumulative sum in
  float64, target ``p * total`` (total = the last cumulative sum), ``idx`` = first position
  whose cumulative sum reaches the target, threshold ``t = sorted[idx]``, keep ``a >= t``.
* ``maxp``: keep ``|x| >= p * max|x|`` (the product in the input dtype).
* ``topk``: ``k = int(D * p)`` (at least 1), keep ``|x| >=`` the k-th largest ``|x|``.

``topp`` runs on every token of every FFN layer, so besides the straightforward sort-based
reference (``topp_threshold_reference``) there are exact sort-free paths on CPU, where a
sort costs more than the FFN layer itself:

* 16-bit activations (bfloat16, float16: the usual inference dtypes): a radix select on the
  bit patterns (non-negative floats order like their integer bits), two histogram passes of
  bucket sums per row (exact in float32 at these dtypes);
* float32: the same two passes on the top 16 bits (float64 sums), then a sort of only the few
  entries in the threshold's bucket;
* wide float64 rows: a bracketed search that sorts only a strided sample and the few entries
  near the threshold.

All prove per row that their float64 sums, added in another order, cannot round to another
decision than the sequential cumulative sum would; rows where that proof fails are
recomputed with the full sort.

Every rule is a threshold per row (``rule_threshold``): keep ``a >= threshold``.

Non-finite rows (a NaN or an infinity among a token's magnitudes) are never sparsified: no rule
can rank them, and a comparison with NaN is false, so masking would silently zero the NaN and
report the token as sparse. They pass through unchanged (the NaN propagates as in the dense
model), their keep-mask is all True, and their kept count is -1 (``NONFINITE``), which the
recorder counts apart from the sparsity.
``zero_below`` applies it, zeroing and counting on the bit patterns in a few integer passes,
without a boolean mask. The hooks call ``sparsify_and_count``, which on CPU hands top-p to the
fused kernel of ``common.core.fused_topp`` (the same radix select, threshold, zeroing and counts
per row in one pass) and takes these tensor-wide paths otherwise.
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache

import torch

from common.core import fused_topp

RULES = ("topp", "maxp", "topk")
NONFINITE = -1  # the kept count of a row that holds a NaN or an infinity (passed through unsparsified)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Unit roundoff of float64; bounds the error of any float64 summation order.
_F64_UNIT = 2.0 ** -53
# The bracketed top-p pays off only on wide rows; below this the full sort is as cheap.
_BRACKET_MIN_WIDTH = 1024
_CHUNK_ELEMENTS = 1 << 20
_MAX_CHUNK_ROWS = 1 << 15  # the radix select ranks entries by ``row << 15`` in int32


def _plain_number(value, name: str) -> float:
    """A Python float from a real number (numpy scalars included) or a one-element tensor; a
    one-line error otherwise (booleans included: True is not a threshold)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def validate_rule(rule: str, value: float, power: float = 1.0) -> None:
    """Raise a one-line ValueError for a rule, value or power the rules cannot apply."""
    if rule not in RULES:
        raise ValueError(f"unknown sparsification rule {rule!r}; choose one of {', '.join(RULES)}")
    value, power = _plain_number(value, "rule value p"), _plain_number(power, "power q")
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise ValueError(f"rule value p={value!r} is outside [0, 1]; give a threshold between 0 and 1")
    if not (1.0 <= power < math.inf):
        raise ValueError(f"power q={power!r} must be a finite number >= 1 (q=1 is plain top-p)")
    if power != 1.0 and rule != "topp":
        raise ValueError(f"power q={power} applies only to rule 'topp', not {rule!r}")


def _validate_tensor(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"sparsification needs a floating tensor (float16/bfloat16/float32), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"sparsification needs a tensor of shape [..., D] with D > 0, got {tuple(x.shape)}")


def magnitudes(x: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """|x| ** power in the input dtype, the quantity every rule ranks by."""
    a = x.abs()
    return a if power == 1.0 else a.pow(power)


def topp_threshold_reference(a: torch.Tensor, p: float) -> torch.Tensor:
    """The paper's top-p threshold per row of non-negative ``a`` [N, D]: full sort + float64 cumsum."""
    sorted_a = torch.sort(a, dim=-1, descending=True).values
    cumulative = sorted_a.double().cumsum(dim=-1)
    target = p * cumulative[:, -1:]
    reached = cumulative >= target
    idx = reached.to(torch.uint8).argmax(dim=-1, keepdim=True)  # first True, 0 if none
    return sorted_a.gather(-1, idx)


def _first_index_at_least(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Index (int32) of the first entry >= target per row of a non-decreasing [N, M] tensor (M if none)."""
    return torch.searchsorted(values, target, right=False, out_int32=True)


def _topp_threshold_bracketed(a: torch.Tensor, p: float) -> torch.Tensor:
    """Exact top-p threshold per row of non-negative ``a`` [N, D] (0 < p < 1), without a full sort.

    1. Sort a strided sample and take a value bracket [low, high) around the sample's own
       top-p crossing.
    2. Gather only the entries inside the bracket (padded with zeros, which sort last and add
       nothing), sort them, and continue the float64 prefix sum from the sum of entries >= high.
    3. Accept a row only if the decision provably matches the sequential float64 cumsum: every
       position whose sum lies within the rounding margin of the target carries the same value.
    Rows that fail are recomputed with the reference.
    """
    n_rows, width = a.shape
    stride = 8 if width < 4096 else 16
    sample = a[:, ::stride]
    # Sample ranks searched on each side of the sample's crossing: ~1.6 standard deviations
    # of a rank estimate from n samples, measured to leave <1% of rows to the fallback.
    half_window = max(16, int(1.6 * sample.shape[-1] ** 0.5))
    sample_sorted = torch.sort(sample, dim=-1, descending=True).values
    sample_cum = sample_sorted.double().cumsum(dim=-1)
    sample_idx = _first_index_at_least(sample_cum, p * sample_cum[:, -1:]).clamp_max(sample.shape[-1] - 1)
    hi_pos = sample_idx - half_window
    lo_pos = sample_idx + half_window
    last = sample.shape[-1] - 1
    high = torch.where(hi_pos >= 0, sample_sorted.gather(-1, hi_pos.clamp(0, last)),
                       torch.full_like(sample_sorted[:, :1], float("inf")))
    low = torch.where(lo_pos <= last, sample_sorted.gather(-1, lo_pos.clamp(0, last)),
                      torch.zeros_like(sample_sorted[:, :1]))

    above = a >= high
    inside = (a >= low) & ~above
    a64 = a.double()
    total = a64.sum(dim=-1, keepdim=True)
    sum_above = (a64 * above).sum(dim=-1, keepdim=True)  # a product: torch.where is slow on CPU

    width_inside = int(inside.sum(dim=-1, dtype=torch.int32).max()) if n_rows else 0
    if width_inside == 0 or width_inside > width // 2:
        return topp_threshold_reference(a, p)
    return _threshold_among_candidates(a, p, inside, sum_above, total)


def _threshold_among_candidates(a: torch.Tensor, p: float, inside: torch.Tensor, sum_above: torch.Tensor,
                                total: torch.Tensor) -> torch.Tensor:
    """The exact threshold of each row when it lies among the ``inside`` entries [N, D].

    ``sum_above`` [N, 1] is the float64 sum of the entries above every inside entry, ``total``
    the row's. The inside entries are compacted into [N, max count] (padded with zeros, which
    sort last and add nothing), sorted, and the float64 prefix sum continued from ``sum_above``.
    A row is accepted only if every position whose sum lies within the rounding margin of the
    target carries the same value, so the decision provably matches the paper's sequential
    float64 cumsum; other rows (and non-finite ones) are recomputed with the reference.
    """
    n_rows, width = a.shape
    row, col = inside.nonzero(as_tuple=True)
    counts = torch.bincount(row, minlength=n_rows)  # from the few inside entries, not another pass
    width_inside = max(int(counts.max()), 1)
    slot = torch.arange(row.numel(), device=a.device) - (counts.cumsum(0) - counts)[row]
    packed = torch.zeros(n_rows, width_inside, dtype=a.dtype, device=a.device)
    packed[row, slot] = a[row, col]
    packed = torch.sort(packed, dim=-1, descending=True).values
    cumulative = sum_above + packed.double().cumsum(dim=-1)
    target = p * total
    margin = 4.0 * width * _F64_UNIT * total
    j_lo = _first_index_at_least(cumulative, target - margin)
    j_hi = _first_index_at_least(cumulative, target + margin)
    t_lo = packed.gather(-1, j_lo.clamp_max(width_inside - 1))
    t_hi = packed.gather(-1, j_hi.clamp_max(width_inside - 1))
    last_slot = (counts - 1).clamp_min(0).unsqueeze(-1)
    # target - margin is NaN for a non-finite total, so such rows are never ok.
    ok = (sum_above < target - margin) & (j_hi <= last_slot) & (t_lo == t_hi)
    threshold = t_hi
    if not bool(ok.all()):
        bad = ~ok.squeeze(-1)
        threshold = threshold.clone()
        threshold[bad] = topp_threshold_reference(a[bad], p)
    return threshold


def _reach(at_least: torch.Tensor, sums: torch.Tensor, target: torch.Tensor):
    """The first bucket where ``at_least`` [N, B] (non-decreasing float64 running sums over buckets
    in descending key order) reaches ``target`` [N, 1] (the last if none does): its position
    [N, 1] and the float64 sums of the entries above it and of those at or above it (``sums``
    [N, B]: the buckets' own sums)."""
    position = _first_index_at_least(at_least, target).clamp_max_(sums.shape[-1] - 1)
    at_or_above = at_least.gather(-1, position)
    return position, at_or_above - sums.gather(-1, position).double(), at_or_above


_SPREAD = 16  # bins that the entries outside the second pass's bucket cycle through, per side


@lru_cache(maxsize=256)
def _row_offsets(n_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row constants [N, 1] (int32) of ``_radix_select``, made once per row count: they would
    cost several small operations on every call (never modify them in place)."""
    row = torch.arange(n_rows, device=device, dtype=torch.int32).unsqueeze(-1)
    return row << 15, (row << 15) | 0x7FFF, (row << 8) + _SPREAD


@lru_cache(maxsize=64)
def _outside_bins(width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column clamp bounds [1, D] (int32) of ``_radix_select``'s second pass: the entries
    below / above the chosen bucket land in one of ``_SPREAD`` bins on each side, by column,
    not all in one. bincount adds in a plain loop, and consecutive additions to the same bin
    wait on each other: with most entries outside the bucket, one bin per side makes the pass
    about twice as slow."""
    spread = torch.arange(width, device=device, dtype=torch.int32).unsqueeze(0) % _SPREAD
    return -1 - spread, 128 + spread


def _radix_select(keys: torch.Tensor, values: torch.Tensor, p: float):
    """Two radix passes over 15-bit order keys [N, D] (monotone in ``values`` [N, D]).

    ``keys`` (int32, N < 2^16) must be a fresh tensor: it is overwritten with each entry's rank
    ``(row << 15) + (0x7FFF - key)``, which gives every row its own range (one bincount serves
    all rows) and puts the buckets in descending key order (the running sums of entries ``>=``
    a bucket are then plain cumulative sums). Each pass sums the entries per bucket
    (``bincount``, accumulating in the dtype of ``values``: float64, or float32 where that is
    exact, see ``_topp_threshold_radix``) and picks the highest bucket where the running float64
    sum reaches ``p * total``: first by the top 8 bits (256 bins per row), then by the low 7 bits
    inside that bucket (bins 16..143 of the row's 256; the entries above / below the bucket land
    in the bins around them, never read, see ``_outside_bins``). Temporaries are updated in
    place (on CPU a fresh [N, D] buffer costs about as much as the operation writing it) and the
    per-row bookkeeping is kept to a few operations: the hooks run this on every layer. Returns
    the threshold's rank (as in ``keys``) [N, 1], the float64 sums of the entries above it and
    at or above it, and the row totals.
    """
    n_rows = keys.shape[0]
    row_keys, rank_base, bin_base = _row_offsets(n_rows, keys.device)
    rank = torch.sub(rank_base, keys, out=keys)
    weights = values.reshape(-1)
    index = rank >> 7  # row * 256 + the bucket's position from the top
    flat_index = index.view(-1)
    sums = torch.bincount(flat_index, weights=weights, minlength=n_rows << 8).view(n_rows, 256)
    at_least = sums.cumsum(-1, dtype=torch.float64)  # [j]: the sum of the entries in the j + 1 highest buckets
    total = at_least[:, -1:]
    target = p * total
    high, sum_above, _ = _reach(at_least, sums, target)
    first = row_keys | (high << 7)  # the rank of the chosen bucket's highest key
    below, above = _outside_bins(keys.shape[-1], keys.device)
    torch.sub(rank, first, out=index).clamp_(below, above).add_(bin_base)  # the bucket's keys -> bins 16..143
    sums = torch.bincount(flat_index, weights=weights, minlength=n_rows << 8).view(n_rows, 256)
    sums = sums[:, _SPREAD:_SPREAD + 128]
    at_least = sums.cumsum(-1, dtype=torch.float64).add_(sum_above)
    low, sum_above, at_or_above = _reach(at_least, sums, target)
    return first + low, sum_above, at_or_above, total


_SIGNIFICANT_BITS = {torch.bfloat16: 8, torch.float16: 11}  # with the implicit leading bit


def _topp_threshold_radix(a: torch.Tensor, p: float) -> torch.Tensor:
    """Exact top-p threshold per row of non-negative 16-bit ``a`` [N, D] (0 < p < 1), no sort.

    Non-negative floats order like their bit patterns, and the threshold is the largest value
    ``v`` whose sum of entries ``>= v`` reaches ``p * total``; two radix passes
    (``_radix_select``) resolve all 15 bits. Their bucket sums are exact in float32 (half the
    memory of float64, and a faster bincount): a bucket's entries are multiples of its smallest
    step with at most ``s`` significant bits (8 for bfloat16, 11 for float16), so up to
    ``2^(24 - s)`` of them add up without rounding. A row is accepted only if the sums of
    entries ``> v`` and ``>= v`` lie outside the rounding margin of the target (so the
    sequential float64 cumsum decides the same); other rows (non-finite and all-zero ones
    included) are recomputed with the reference.
    """
    width = a.shape[-1]
    values = a.float() if width <= 2 ** (24 - _SIGNIFICANT_BITS[a.dtype]) else a.double()
    rank, sum_above, at_or_above, total = _radix_select(a.view(torch.int16).to(torch.int32), values, p)
    threshold = (0x7FFF - (rank & 0x7FFF)).to(torch.int16).view(a.dtype)  # the key back from its rank
    target = p * total
    margin = total * (4.0 * width * _F64_UNIT)
    # target - margin is NaN for a non-finite total, so such rows are never ok.
    ok = (sum_above < target - margin) & (at_or_above >= target + margin)
    if not bool(ok.all()):
        bad = ~ok.squeeze(-1)
        threshold = threshold.clone()
        threshold[bad] = topp_threshold_reference(a[bad], p)
    return threshold


def _topp_threshold_radix32(a: torch.Tensor, p: float) -> torch.Tensor:
    """Exact top-p threshold per row of non-negative float32 ``a`` [N, D] (0 < p < 1), no full sort.

    The top 16 bits of a non-negative float32 (its bfloat16 truncation) order the values in
    buckets of about 0.8%; two radix passes on them (``_radix_select``) find the bucket of the
    threshold and the sum of the entries above it. Only that bucket's few entries are sorted,
    continuing the float64 prefix sum; a row is accepted only if every position whose sum lies
    within the rounding margin of the target carries the same value (as in the bracketed
    search), other rows are recomputed with the reference.
    """
    keys = a.view(torch.int32) >> 16  # the top 15 value bits; _radix_select turns them into ranks in place
    rank, sum_above, _, total = _radix_select(keys, a.double(), p)
    return _threshold_among_candidates(a, p, keys == rank, sum_above, total)


def _topp_threshold_full(a: torch.Tensor) -> torch.Tensor:
    """Top-p threshold at p = 1 without sorting.

    The sequential float64 cumsum first reaches the total at the last non-zero entry unless
    that entry is too small to change the running sum (absorbed). Entries >= total * 2^-49
    always change a float64 sum, so for rows whose smallest non-zero entry is that large the
    threshold is the smallest non-zero entry (all-zero rows: 0, which keeps everything, as the
    reference does). Other rows use the reference.
    """
    positive = a > 0
    smallest = torch.where(positive, a, torch.full_like(a, float("inf"))).amin(dim=-1, keepdim=True)
    total = a.sum(dim=-1, keepdim=True, dtype=torch.float64)
    threshold = torch.where(torch.isinf(smallest), torch.zeros_like(smallest), smallest)
    absorbed = smallest.double() < total * 2.0 ** -49
    if bool(absorbed.any()):
        rows = absorbed.squeeze(-1)
        threshold = threshold.clone()
        threshold[rows] = topp_threshold_reference(a[rows], 1.0)
    return threshold


def _in_row_chunks(threshold_fn, a: torch.Tensor, p: float) -> torch.Tensor:
    """Row chunks keep the working set (float64 copies, histograms) small and in cache."""
    rows_per_chunk = max(1, min(_CHUNK_ELEMENTS // a.shape[-1], _MAX_CHUNK_ROWS))
    if a.shape[0] <= rows_per_chunk:
        return threshold_fn(a, p)
    return torch.cat([threshold_fn(chunk, p) for chunk in a.split(rows_per_chunk)])


def topp_threshold(a: torch.Tensor, p: float) -> torch.Tensor:
    """Top-p threshold per row of non-negative ``a`` [N, D], identical to the paper's rule."""
    if p <= 0.0:
        return a.amax(dim=-1, keepdim=True)  # target 0 is reached at the first (largest) entry
    if p >= 1.0:
        return _topp_threshold_full(a)
    if a.device.type == "cpu" and a.shape[0] > 0:
        if a.dtype in (torch.bfloat16, torch.float16):
            return _in_row_chunks(_topp_threshold_radix, a, p)
        if a.dtype == torch.float32:
            return _in_row_chunks(_topp_threshold_radix32, a, p)
        if a.shape[-1] >= _BRACKET_MIN_WIDTH:
            return _in_row_chunks(_topp_threshold_bracketed, a, p)
    return topp_threshold_reference(a, p)


def rule_threshold(a: torch.Tensor, rule: str, value: float) -> torch.Tensor:
    """The per-row threshold [N, 1] of a rule over magnitudes ``a`` [N, D]: keep ``a >= threshold``."""
    if rule == "topp":
        return topp_threshold(a, value)
    if rule == "maxp":
        return value * a.amax(dim=-1, keepdim=True)  # the product in the input dtype
    k = max(int(a.shape[-1] * value), 1)
    return torch.topk(a, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)


def keep_threshold(x: torch.Tensor, rule: str = "topp", value: float = 1.0,
                   power: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The magnitudes ``a = |x| ** power`` as rows [N, D] of ``x`` [..., D] and the rule's threshold
    per row [N, 1]: the keep-mask is ``a >= threshold`` (``keep_mask``; ``zero_below`` applies it)."""
    validate_rule(rule, value, power)
    _validate_tensor(x)
    a = magnitudes(x.reshape(-1, x.shape[-1]), power)
    return a, rule_threshold(a, rule, float(value))


def nonfinite_rows(a: torch.Tensor) -> torch.Tensor:
    """[N] True where a row of ``a`` [N, D] holds a NaN or an infinity."""
    return ~torch.isfinite(a).all(dim=-1)


def keep_mask(x: torch.Tensor, rule: str = "topp", value: float = 1.0, power: float = 1.0) -> torch.Tensor:
    """Boolean mask (True = kept) per token over the last dimension of ``x`` [..., D]; all True on
    non-finite rows, which pass through unsparsified."""
    a, threshold = keep_threshold(x, rule, value, power)
    return ((a >= threshold) | nonfinite_rows(a).unsqueeze(-1)).reshape(x.shape)


def kept_counts(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Kept count per token [...] (int32) of a keep-mask [..., D] applied to ``x`` [..., D], with
    ``NONFINITE`` for tokens whose ``x`` holds a NaN or an infinity (for callers that build the
    mask themselves and record it)."""
    kept = mask.sum(dim=-1, dtype=torch.int32)
    bad = ~torch.isfinite(x).all(dim=-1)
    return kept.masked_fill(bad, NONFINITE)


# Per float dtype: the signed integer as wide, the shift that spreads its sign bit, and +inf's bits.
_SAME_WIDTH_INT = {dtype: (ints, torch.iinfo(ints).bits - 1, int(torch.tensor(math.inf, dtype=dtype).view(ints)))
                   for dtype, ints in ((torch.float16, torch.int16), (torch.bfloat16, torch.int16),
                                       (torch.float32, torch.int32), (torch.float64, torch.int64))}


def _finite_magnitudes(bits: torch.Tensor, inf_bits: int) -> bool:
    """Whether the bit patterns of non-negative magnitudes are all finite: below +inf's, and not
    negative (a NaN made by ``pow`` may carry the sign bit), in one pass."""
    low, high = torch.aminmax(bits)
    return int(low) >= 0 and int(high) < inf_bits


def zero_below(x: torch.Tensor, a: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [..., D] with the entries outside the keep-mask ``a >= threshold`` (``a`` [N, D] and
    ``threshold`` [N, 1] from ``keep_threshold``) set to zero, exactly ``x.masked_fill(~mask, 0)``,
    and the kept count per token [...] (int32), from one pass over the mask. Rows of ``a`` holding
    a NaN or an infinity are returned unchanged with the count ``NONFINITE``.

    On CPU, boolean masks, masked_fill and torch.where are several times slower than integer
    arithmetic, so when ``a`` is finite the mask is built on the bit patterns: non-negative
    floats order like their bits, so ``(bits(threshold) - 1 - bits(a)) >> (width - 1)`` is all
    ones for kept entries and 0 otherwise (no overflow: both are below the bits of +inf), and
    ``bits(x) & it`` is ``x`` or +0. Tensors with infinite or NaN magnitudes take the boolean
    mask, and so do other devices (the finiteness check would synchronize them) and inputs that
    need a gradient (bit operations have none).
    """
    rows = x.reshape(-1, x.shape[-1])
    ints, sign, inf_bits = _SAME_WIDTH_INT[a.dtype]
    integer_path = a.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())
    if integer_path and a.numel() and _finite_magnitudes(a.view(ints), inf_bits):
        keep = torch.sub(threshold.view(ints) - 1, a.view(ints)).bitwise_right_shift_(sign)  # -1 kept, 0 dropped
        # Summed in its own type (no converted copy) where the count fits.
        count_dtype = ints if a.shape[-1] <= torch.iinfo(ints).max else torch.int32
        kept = keep.sum(dim=-1, dtype=count_dtype).neg_().to(torch.int32)
        out = keep.bitwise_and_(rows.view(ints)).view(x.dtype)  # in place: no second [N, D] buffer
    else:
        bad = nonfinite_rows(a).unsqueeze(-1)
        mask = (a >= threshold) | bad
        out = rows.masked_fill(~mask, 0)
        kept = mask.sum(dim=-1, dtype=torch.int32).masked_fill_(bad.squeeze(-1), NONFINITE)
    return out.reshape(x.shape), kept.reshape(x.shape[:-1])


def sparsify_and_count(x: torch.Tensor, rule: str = "topp", value: float = 1.0,
                       power: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [..., D] with the entries outside the rule's keep-mask set to zero and the kept count
    per token [...] (int32; ``NONFINITE`` for rows passed through because they hold a NaN or an
    infinity): ``zero_below(x, *keep_threshold(x, ...))``, bit for bit.

    Top-p on CPU takes the fused kernel where it applies (``common.core.fused_topp``: one pass per
    row, in cache); the rows it cannot decide exactly are recomputed here with the full sort.
    """
    validate_rule(rule, value, power)
    _validate_tensor(x)
    value, power = float(value), float(power)
    if fused_topp.applies(x, rule, value, power):
        rows = x.reshape(-1, x.shape[-1])
        fused = fused_topp.sparsify_rows(rows, value)
        if fused is not None:
            sparse, kept, accepted = fused
            if not bool(accepted.all()):
                left = ~accepted
                a = magnitudes(rows[left])
                sparse[left], kept[left] = zero_below(rows[left], a, topp_threshold_reference(a, value))
            return sparse.reshape(x.shape), kept.reshape(x.shape[:-1])
    return zero_below(x, *keep_threshold(x, rule, value, power))


def sparsify(x: torch.Tensor, rule: str = "topp", value: float = 1.0, power: float = 1.0) -> torch.Tensor:
    """``x`` with the entries outside the rule's keep-mask set to zero (same dtype and device)."""
    return sparsify_and_count(x, rule, value, power)[0]
