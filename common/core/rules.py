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
  float64 sums per row;
* float32: the same two passes on the top 16 bits, then a sort of only the few entries in the
  threshold's bucket;
* wide float64 rows: a bracketed search that sorts only a strided sample and the few entries
  near the threshold.

All prove per row that their float64 sums, added in another order, cannot round to another
decision than the sequential cumulative sum would; rows where that proof fails are
recomputed with the full sort.
"""

from __future__ import annotations

import math

import torch

RULES = ("topp", "maxp", "topk")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Unit roundoff of float64; bounds the error of any float64 summation order.
_F64_UNIT = 2.0 ** -53
# The bracketed top-p pays off only on wide rows; below this the full sort is as cheap.
_BRACKET_MIN_WIDTH = 1024
_CHUNK_ELEMENTS = 1 << 20


def _plain_number(value, name: str) -> float:
    """A Python float from a number or a one-element tensor; a one-line error otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
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
    """Index of the first entry >= target per row of a non-decreasing [N, M] tensor (M if none)."""
    return torch.searchsorted(values, target, right=False)


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

    counts = inside.sum(dim=-1)
    width_inside = int(counts.max()) if n_rows else 0
    if width_inside == 0 or width_inside > width // 2:
        return topp_threshold_reference(a, p)
    return _threshold_among_candidates(a, p, inside, counts, sum_above, total)


def _threshold_among_candidates(a: torch.Tensor, p: float, inside: torch.Tensor, counts: torch.Tensor,
                                sum_above: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The exact threshold of each row when it lies among the ``inside`` entries [N, D].

    ``sum_above`` [N, 1] is the float64 sum of the entries above every inside entry, ``total``
    the row's. The inside entries are compacted into [N, max count] (padded with zeros, which
    sort last and add nothing), sorted, and the float64 prefix sum continued from ``sum_above``.
    A row is accepted only if every position whose sum lies within the rounding margin of the
    target carries the same value, so the decision provably matches the paper's sequential
    float64 cumsum; other rows (and non-finite ones) are recomputed with the reference.
    """
    n_rows, width = a.shape
    width_inside = max(int(counts.max()), 1)
    row, col = inside.nonzero(as_tuple=True)
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
    ok = (sum_above < target - margin) & (j_hi <= last_slot) & (t_lo == t_hi) & torch.isfinite(total)
    threshold = t_hi
    if not bool(ok.all()):
        bad = ~ok.squeeze(-1)
        threshold = threshold.clone()
        threshold[bad] = topp_threshold_reference(a[bad], p)
    return threshold


# Bits of the non-negative 16-bit float patterns resolved per radix pass, from the top.
_RADIX_LEVELS = (8, 7)


def _radix_select(keys: torch.Tensor, a64: torch.Tensor, p: float):
    """Radix passes over 15-bit order keys [N, D] (int32, monotone in the values ``a64``).

    Each pass sums the entries per bucket of the next bits of the key (float64 ``bincount``;
    entries outside the prefix chosen so far land in a bucket below or above it, never read),
    picks the highest bucket where the running sum of entries ``>=`` it reaches ``p * total``,
    and narrows the prefix. Returns the key prefix of the threshold [N, 1], the sums of the
    entries above it and in it, and the row totals.
    """
    n_rows = keys.shape[0]
    row = torch.arange(n_rows, device=keys.device, dtype=torch.int32).unsqueeze(-1)
    prefix = torch.zeros_like(row)
    total = target = sum_above = bucket_sum = None
    shift = sum(_RADIX_LEVELS)
    for bits in _RADIX_LEVELS:
        shift -= bits
        n_buckets = 1 << bits
        first = row * (n_buckets + 2)  # this row's bins: below, the n_buckets under the prefix, above
        index = ((keys >> shift) + (first + 1 - (prefix << bits))).clamp_(first, first + n_buckets + 1)
        sums = torch.bincount(index.reshape(-1), weights=a64.reshape(-1),
                              minlength=n_rows * (n_buckets + 2)).view(n_rows, n_buckets + 2)
        if total is None:
            total = sums.sum(dim=-1, keepdim=True)
            target, sum_above = p * total, torch.zeros_like(total)
        sums = sums[:, 1:n_buckets + 1]
        at_least = sums.flip(-1).cumsum(-1).flip(-1) + sum_above  # sum of entries in buckets >= b
        chosen = ((at_least >= target).sum(dim=-1, keepdim=True) - 1).clamp_min(0)  # at_least is non-increasing
        bucket_sum = sums.gather(-1, chosen)
        sum_above = at_least.gather(-1, chosen) - bucket_sum
        prefix = (prefix << bits) | chosen.to(torch.int32)
    return prefix, sum_above, bucket_sum, total


def _topp_threshold_radix(a: torch.Tensor, p: float) -> torch.Tensor:
    """Exact top-p threshold per row of non-negative 16-bit ``a`` [N, D] (0 < p < 1), no sort.

    Non-negative floats order like their bit patterns, and the threshold is the largest value
    ``v`` whose sum of entries ``>= v`` reaches ``p * total``; two radix passes
    (``_radix_select``) resolve all 15 bits. A row is accepted only if the sums of entries
    ``> v`` and ``>= v`` lie outside the rounding margin of the target (so the sequential
    float64 cumsum decides the same); other rows (and non-finite ones) are recomputed with the
    reference.
    """
    width = a.shape[-1]
    prefix, sum_above, bucket_sum, total = _radix_select(a.view(torch.int16).to(torch.int32), a.double(), p)
    threshold = prefix.to(torch.int16).view(a.dtype)
    target = p * total
    margin = 4.0 * width * _F64_UNIT * total
    ok = (sum_above < target - margin) & (sum_above + bucket_sum >= target + margin) & torch.isfinite(total)
    zero_rows = total == 0  # the reference keeps everything: threshold 0
    if bool(zero_rows.any()):
        threshold = torch.where(zero_rows, torch.zeros_like(threshold), threshold)
        ok = ok | zero_rows
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
    high = a.view(torch.int32) >> 16
    prefix, sum_above, _, total = _radix_select(high, a.double(), p)
    inside = high == prefix
    return _threshold_among_candidates(a, p, inside, inside.sum(dim=-1), sum_above, total)


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
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // a.shape[-1])
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


def keep_mask(x: torch.Tensor, rule: str = "topp", value: float = 1.0, power: float = 1.0) -> torch.Tensor:
    """Boolean mask (True = kept) per token over the last dimension of ``x`` [..., D]."""
    validate_rule(rule, value, power)
    _validate_tensor(x)
    value = float(value)
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if rule == "topp":
        a = magnitudes(rows, power)
        mask = a >= topp_threshold(a, value)
    elif rule == "maxp":
        a = rows.abs()
        mask = a >= value * a.amax(dim=-1, keepdim=True)
    else:
        a = rows.abs()
        k = max(int(shape[-1] * value), 1)
        kth_largest = torch.topk(a, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        mask = a >= kth_largest
    return mask.reshape(shape)


def zero_outside(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x.masked_fill(~mask, 0)``, computed on CPU as ``x * mask``: masked_fill (and torch.where)
    with a boolean mask is some 20x slower there than a product. The two agree up to the sign of
    zeros (``-x * 0 = -0.0``, equal to 0.0) unless ``x`` has NaN or infinite entries, where the
    product would give NaN: such tensors take masked_fill."""
    if x.device.type != "cpu":
        return x.masked_fill(~mask, 0)
    out = x * mask.to(x.dtype)
    if not bool(torch.isfinite(out.sum(dtype=torch.float64))):
        return x.masked_fill(~mask, 0)
    return out


def sparsify(x: torch.Tensor, rule: str = "topp", value: float = 1.0, power: float = 1.0) -> torch.Tensor:
    """``x`` with the entries outside the rule's keep-mask set to zero (same dtype and device)."""
    return zero_outside(x, keep_mask(x, rule, value, power))
