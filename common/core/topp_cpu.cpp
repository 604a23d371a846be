// The top-p rule fused on CPU: per row of activations, the exact threshold, the zeroing and the
// kept count in one parallel loop, each row staying in the core's cache.
//
// Built on first use by common/core/fused_topp.py (torch.utils.cpp_extension). The algorithm is
// common/core/rules.py's radix select, per row instead of per tensor:
//
//  1. Bucket sums by the top 8 of 15 order bits of |x| (the binade), in float64; a bucket's
//     entries are multiples of its smallest step with at most 24 significant bits, so its sum is
//     exact whatever the order of additions.
//  2. Running float64 sums over buckets from the top pick the bucket where p * total is reached;
//     a second pass sums that bucket's entries by the low 7 order bits and picks the 15-bit key.
//     16-bit formats: all 15 bits are the value, so the key is the threshold. float32: the few
//     entries with that key are sorted and the prefix sum continued, as the Python path does.
//  3. A row is accepted only if the float64 sums of the entries above the threshold and at or
//     above it lie outside the rounding margin 4 * width * 2^-53 * total of the target, so the
//     paper's sequential float64 cumsum over the sorted row decides the same. Other rows (all
//     zero, non-finite, or too close to call) are flagged; the caller recomputes them with the
//     full sort.
//  4. Kept entries are |x| >= threshold, compared on the bit patterns (non-negative floats order
//     like their bits); dropped ones become +0, as masked_fill writes.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

namespace {

constexpr int kCopies = 4;  // interleaved histograms: consecutive entries rarely wait on one bin

struct BFloat16Format {
  using Bits = uint16_t;
  static constexpr bool kKeyIsValue = true;
  static Bits magnitude(Bits bits) { return bits & 0x7FFF; }
  static uint32_t key(Bits magnitude) { return magnitude; }
  static double value(Bits magnitude) {
    const uint32_t u = uint32_t(magnitude) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};

struct HalfFormat {
  using Bits = uint16_t;
  static constexpr bool kKeyIsValue = true;
  static Bits magnitude(Bits bits) { return bits & 0x7FFF; }
  static uint32_t key(Bits magnitude) { return magnitude; }
  static double value(Bits magnitude) { return c10::detail::fp16_ieee_to_fp32_value(magnitude); }
};

struct Float32Format {
  using Bits = uint32_t;
  static constexpr bool kKeyIsValue = false;  // the key is the top 15 of 31 magnitude bits
  static Bits magnitude(Bits bits) { return bits & 0x7FFFFFFFu; }
  static uint32_t key(Bits magnitude) { return magnitude >> 16; }
  static double value(Bits magnitude) {
    float f;
    std::memcpy(&f, &magnitude, sizeof f);
    return f;
  }
};

// The threshold's magnitude bits of one row, or false if the row must take the full sort.
template <typename Format>
bool row_threshold(const typename Format::Bits* x, int64_t width, double p,
                   std::vector<typename Format::Bits>& candidates, typename Format::Bits* threshold) {
  using Bits = typename Format::Bits;
  double sums[kCopies][256];
  std::memset(sums, 0, sizeof sums);
  int64_t j = 0;
  for (; j + kCopies <= width; j += kCopies) {
    for (int c = 0; c < kCopies; ++c) {
      const Bits m = Format::magnitude(x[j + c]);
      sums[c][Format::key(m) >> 7] += Format::value(m);
    }
  }
  for (; j < width; ++j) {
    const Bits m = Format::magnitude(x[j]);
    sums[0][Format::key(m) >> 7] += Format::value(m);
  }
  double bucket[256];
  double total = 0.0;
  for (int b = 255; b >= 0; --b) {
    bucket[b] = (sums[0][b] + sums[1][b]) + (sums[2][b] + sums[3][b]);  // exact: see the header
    total += bucket[b];
  }
  if (!(total > 0.0) || !std::isfinite(total)) return false;
  const double target = p * total;
  const double margin = total * (4.0 * double(width) * 0x1p-53);

  double above = 0.0;
  int high = -1;
  for (int b = 255; b >= 0; --b) {
    if (above + bucket[b] >= target) { high = b; break; }
    above += bucket[b];
  }
  if (high < 0) return false;

  // Second pass: the chosen bucket's entries by their low 7 key bits; the others go to bin 128.
  double low_sums[kCopies][129];
  std::memset(low_sums, 0, sizeof low_sums);
  const uint32_t high_key = uint32_t(high);
  for (j = 0; j + kCopies <= width; j += kCopies) {
    for (int c = 0; c < kCopies; ++c) {
      const Bits m = Format::magnitude(x[j + c]);
      const uint32_t k = Format::key(m);
      low_sums[c][(k >> 7) == high_key ? (k & 0x7F) : 128] += Format::value(m);
    }
  }
  for (; j < width; ++j) {
    const Bits m = Format::magnitude(x[j]);
    const uint32_t k = Format::key(m);
    low_sums[0][(k >> 7) == high_key ? (k & 0x7F) : 128] += Format::value(m);
  }
  int low = -1;
  double at_or_above = above;
  for (int s = 127; s >= 0; --s) {
    const double sum = (low_sums[0][s] + low_sums[1][s]) + (low_sums[2][s] + low_sums[3][s]);
    if (sum == 0.0) continue;
    if (above + sum >= target) { low = s; at_or_above = above + sum; break; }
    above += sum;
  }
  if (low < 0 || !(above < target - margin)) return false;
  const uint32_t key = (high_key << 7) | uint32_t(low);

  if constexpr (Format::kKeyIsValue) {
    if (!(at_or_above >= target + margin)) return false;
    *threshold = Bits(key);
    return true;
  } else {
    // The entries with this key, sorted descending; the prefix sum continued from ``above``.
    candidates.clear();
    for (j = 0; j < width; ++j) {
      const Bits m = Format::magnitude(x[j]);
      if (Format::key(m) == key) candidates.push_back(m);
    }
    std::sort(candidates.begin(), candidates.end(), std::greater<Bits>());
    const double lower = target - margin, upper = target + margin;
    double running = above;
    int64_t j_lo = -1, j_hi = -1;
    for (int64_t i = 0; i < int64_t(candidates.size()); ++i) {
      running += Format::value(candidates[i]);
      if (j_lo < 0 && running >= lower) j_lo = i;
      if (running >= upper) { j_hi = i; break; }
    }
    // Every position whose sum may round to either side of the target carries one value.
    if (j_lo < 0 || j_hi < 0 || candidates[j_lo] != candidates[j_hi]) return false;
    *threshold = candidates[j_hi];
    return true;
  }
}

template <typename Format>
void sparsify_rows(const torch::Tensor& rows, double p, torch::Tensor& out, torch::Tensor& kept,
                   torch::Tensor& ok) {
  using Bits = typename Format::Bits;
  const int64_t n_rows = rows.size(0), width = rows.size(1);
  const Bits* x = reinterpret_cast<const Bits*>(rows.data_ptr());
  Bits* o = reinterpret_cast<Bits*>(out.data_ptr());
  int32_t* counts = kept.data_ptr<int32_t>();
  bool* accepted = ok.data_ptr<bool>();
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<Bits> candidates;
    for (int64_t r = begin; r < end; ++r) {
      const Bits* row = x + r * width;
      Bits* out_row = o + r * width;
      Bits threshold = 0;
      accepted[r] = row_threshold<Format>(row, width, p, candidates, &threshold);
      int32_t count = 0;
      if (accepted[r]) {
        for (int64_t j = 0; j < width; ++j) {
          const bool keep = Format::magnitude(row[j]) >= threshold;
          out_row[j] = keep ? row[j] : Bits(0);
          count += keep;
        }
      }
      counts[r] = count;
    }
  });
}

}  // namespace

// rows [N, D] (bfloat16, float16 or float32 on CPU), 0 < p < 1 ->
// (sparse [N, D], kept count [N] int32, accepted [N] bool); rows not accepted are left undefined.
std::vector<torch::Tensor> topp_sparsify_rows(torch::Tensor rows, double p) {
  TORCH_CHECK(rows.device().is_cpu() && rows.dim() == 2, "rows must be a 2-D CPU tensor");
  TORCH_CHECK(p > 0.0 && p < 1.0, "p must lie strictly between 0 and 1");
  rows = rows.contiguous();
  auto out = torch::empty_like(rows);
  auto kept = torch::empty({rows.size(0)}, rows.options().dtype(torch::kInt32));
  auto ok = torch::empty({rows.size(0)}, rows.options().dtype(torch::kBool));
  switch (rows.scalar_type()) {
    case torch::kBFloat16: sparsify_rows<BFloat16Format>(rows, p, out, kept, ok); break;
    case torch::kHalf: sparsify_rows<HalfFormat>(rows, p, out, kept, ok); break;
    case torch::kFloat: sparsify_rows<Float32Format>(rows, p, out, kept, ok); break;
    default: TORCH_CHECK(false, "rows must be bfloat16, float16 or float32");
  }
  return {out, kept, ok};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topp_sparsify_rows", &topp_sparsify_rows,
        "per-row top-p threshold, zeroing and kept count (CPU; rows not accepted need the full sort)");
}
