// Sparse GEMV on CPU: per token, pick the kept inputs (|x| >= threshold, or a given mask) and stream
// only their rows of an input-major weight [in, out], accumulating in float32.
//
// Built on first use by common/execution/sparse_gemv.py (torch.utils.cpp_extension, -march=native,
// the extension's name carries a hash of the CPU's flags). One pass per token:
//
//  1. Selection: the kept inputs' indices and values, branch-free; a token whose input holds a NaN
//     or an infinity is not sparsified: it is reported back (the caller computes it densely).
//  2. Accumulation: kept rows in groups (8), one FMA per row and output vector, the output
//     block staying in L1; the next group's rows are prefetched while the current one streams.
//     With more than one thread, each thread takes a contiguous block of output columns (every
//     column's sum has the same order whatever the thread count).
//
// bfloat16 weights accumulate in float32. With AVX512-BF16, two kept rows are interleaved in
// registers and multiplied by VDPBF16PS (products of two bf16 are exact in float32); the
// accumulator then holds each 32-column chunk in the instruction's pair order, undone at the end.
//
// The bundled kernel is the CATS intermediate: the gate is computed densely by the caller, the
// neurons with |act(gate)| >= threshold are kept, and for each kept neuron j one contiguous row of
// the bundle [I, 2H] = [W_up[j, :], W_down[:, j]] is read: the up dot product, then the down axpy.
// There the kept neurons are split between threads, each with its own partial sum.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SPARSE_GEMV_AVX512 1
#endif
#if defined(SPARSE_GEMV_AVX512) && defined(__AVX512BF16__)
#define SPARSE_GEMV_AVX512_BF16 1
#endif

namespace {

using bf16 = c10::BFloat16;
// Build-time knobs (a measurement may compile variants with -D): the prefetch's cache level and
// the kept rows accumulated per pass over an output block.
#ifndef SPARSE_GEMV_LOCALITY
#define SPARSE_GEMV_LOCALITY 2  // __builtin_prefetch's temporal locality: 3 = L1, 2 = L2, 1 = L3, -1 = off
#endif
#ifndef SPARSE_GEMV_GROUP
#define SPARSE_GEMV_GROUP 8
#endif
constexpr int kGroup = SPARSE_GEMV_GROUP;  // kept rows accumulated per pass over an output block
constexpr int64_t kChunk = 32;  // column blocks of different threads start at multiples of this

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return static_cast<float>(v); }
inline uint16_t bits(bf16 v) { return v.x; }

inline void prefetch(const void* p) {
#if (defined(__GNUC__) || defined(__clang__)) && SPARSE_GEMV_LOCALITY >= 0
  __builtin_prefetch(p, 0, SPARSE_GEMV_LOCALITY);
#else
  (void)p;
#endif
}

// The accumulator of a row of outputs is in "pair order" only for bfloat16 with AVX512-BF16.
template <typename T>
struct Paired : std::false_type {};
#if defined(SPARSE_GEMV_AVX512_BF16)
template <>
struct Paired<bf16> : std::true_type {};
#endif

// Position in a pair-ordered accumulator of output column c: within each 32-column chunk, the
// first 16 floats hold columns 8l+0..3 (l = 0..3), the next 16 columns 8l+4..7.
inline int64_t pair_position(int64_t c) {
  const int64_t base = c & ~int64_t(31), e = c & 31, lane = e >> 3, j = e & 7;
  return base + (j < 4 ? lane * 4 + j : 16 + lane * 4 + (j - 4));
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// ---- accumulation: acc[c0:c1] += sum_r v[r] * row[r][c0:c1] ------------------------------------

template <int R>
inline void accumulate(const float* const* row, const float* v, const float* const* next, int64_t c0,
                       int64_t c1, float* acc) {
#if defined(SPARSE_GEMV_AVX512)
  __m512 scale[R];
  for (int r = 0; r < R; ++r) scale[r] = _mm512_set1_ps(v[r]);
  int64_t c = c0;
  for (; c + 16 <= c1; c += 16) {
    __m512 a = _mm512_loadu_ps(acc + c);
    for (int r = 0; r < R; ++r) {
      a = _mm512_fmadd_ps(scale[r], _mm512_loadu_ps(row[r] + c), a);
      prefetch(next[r] + c);
    }
    _mm512_storeu_ps(acc + c, a);
  }
  if (c < c1) {
    const __mmask16 m = static_cast<__mmask16>((1u << (c1 - c)) - 1);
    __m512 a = _mm512_maskz_loadu_ps(m, acc + c);
    for (int r = 0; r < R; ++r) a = _mm512_fmadd_ps(scale[r], _mm512_maskz_loadu_ps(m, row[r] + c), a);
    _mm512_mask_storeu_ps(acc + c, m, a);
  }
#else
  for (int64_t c = c0; c < c1; ++c) {
    float a = acc[c];
    for (int r = 0; r < R; ++r) a = std::fma(v[r], row[r][c], a);
    acc[c] = a;
  }
  (void)next;
#endif
}

template <int R>
inline void accumulate(const bf16* const* row, const float* v, const bf16* const* next, int64_t c0, int64_t c1,
                       float* acc) {
#if defined(SPARSE_GEMV_AVX512_BF16)
  // Rows in pairs: unpack interleaves two rows' columns, VDPBF16PS multiplies each pair by the
  // pair of values and adds both products to one float32 lane. An odd last row pairs with zeros.
  constexpr int P = (R + 1) / 2;
  __m512i scale[P];
  for (int p = 0; p < P; ++p) {
    const uint32_t low = bits(bf16(v[2 * p]));
    const uint32_t high = 2 * p + 1 < R ? bits(bf16(v[2 * p + 1])) : 0u;
    scale[p] = _mm512_set1_epi32(static_cast<int>(low | (high << 16)));
  }
  for (int64_t c = c0; c < c1; c += 32) {  // c0 is a multiple of 32; acc is padded to one
    const __mmask32 m = c + 32 <= c1 ? ~__mmask32(0) : static_cast<__mmask32>((1ull << (c1 - c)) - 1);
    __m512 lo = _mm512_loadu_ps(acc + c), hi = _mm512_loadu_ps(acc + c + 16);
    for (int p = 0; p < P; ++p) {
      const __m512i a = _mm512_maskz_loadu_epi16(m, row[2 * p] + c);
      const __m512i b = 2 * p + 1 < R ? _mm512_maskz_loadu_epi16(m, row[2 * p + 1] + c) : _mm512_setzero_si512();
      lo = _mm512_dpbf16_ps(lo, (__m512bh)_mm512_unpacklo_epi16(a, b), (__m512bh)scale[p]);
      hi = _mm512_dpbf16_ps(hi, (__m512bh)_mm512_unpackhi_epi16(a, b), (__m512bh)scale[p]);
      prefetch(next[2 * p] + c);
      if (2 * p + 1 < R) prefetch(next[2 * p + 1] + c);
    }
    _mm512_storeu_ps(acc + c, lo);
    _mm512_storeu_ps(acc + c + 16, hi);
  }
#elif defined(SPARSE_GEMV_AVX512)
  __m512 scale[R];
  for (int r = 0; r < R; ++r) scale[r] = _mm512_set1_ps(v[r]);
  for (int64_t c = c0; c < c1; c += 16) {
    const __mmask16 m = c + 16 <= c1 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (c1 - c)) - 1);
    __m512 a = _mm512_maskz_loadu_ps(m, acc + c);
    for (int r = 0; r < R; ++r) {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, row[r] + c));
      a = _mm512_fmadd_ps(scale[r], _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), a);
      prefetch(next[r] + c);
    }
    _mm512_mask_storeu_ps(acc + c, m, a);
  }
#else
  for (int64_t c = c0; c < c1; ++c) {
    float a = acc[c];
    for (int r = 0; r < R; ++r) a = std::fma(v[r], to_float(row[r][c]), a);
    acc[c] = a;
  }
  (void)next;
#endif
}

// Up to kGroup rows at once, dispatched to the unrolled accumulate<R>.
template <typename T>
inline void accumulate_group(int count, const T* const* row, const float* v, const T* const* next, int64_t c0,
                             int64_t c1, float* acc) {
  while (count > 8) {
    accumulate<8>(row, v, next, c0, c1, acc);
    row += 8, v += 8, next += 8, count -= 8;
  }
  switch (count) {
    case 8: accumulate<8>(row, v, next, c0, c1, acc); break;
    case 7: accumulate<7>(row, v, next, c0, c1, acc); break;
    case 6: accumulate<6>(row, v, next, c0, c1, acc); break;
    case 5: accumulate<5>(row, v, next, c0, c1, acc); break;
    case 4: accumulate<4>(row, v, next, c0, c1, acc); break;
    case 3: accumulate<3>(row, v, next, c0, c1, acc); break;
    case 2: accumulate<2>(row, v, next, c0, c1, acc); break;
    case 1: accumulate<1>(row, v, next, c0, c1, acc); break;
    default: break;
  }
}

// ---- dot products: u[r] = row[r][0:n] . x[0:n] --------------------------------------------------

template <int R>
inline void dots(const float* const* row, const float* x, int64_t n, const float* const* next, float* u) {
#if defined(SPARSE_GEMV_AVX512)
  __m512 s[R];
  for (int r = 0; r < R; ++r) s[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = c + 16 <= n ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - c)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + c);
    for (int r = 0; r < R; ++r) {
      s[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, row[r] + c), xv, s[r]);
      prefetch(next[r] + c);
    }
  }
  for (int r = 0; r < R; ++r) u[r] = _mm512_reduce_add_ps(s[r]);
#else
  for (int r = 0; r < R; ++r) {
    float s = 0.0f;
    for (int64_t c = 0; c < n; ++c) s = std::fma(row[r][c], x[c], s);
    u[r] = s;
  }
  (void)next;
#endif
}

template <int R>
inline void dots(const bf16* const* row, const bf16* x, int64_t n, const bf16* const* next, float* u) {
#if defined(SPARSE_GEMV_AVX512_BF16)
  __m512 s[R];
  for (int r = 0; r < R; ++r) s[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 32) {
    const __mmask32 m = c + 32 <= n ? ~__mmask32(0) : static_cast<__mmask32>((1ull << (n - c)) - 1);
    const __m512i xv = _mm512_maskz_loadu_epi16(m, x + c);
    for (int r = 0; r < R; ++r) {
      s[r] = _mm512_dpbf16_ps(s[r], (__m512bh)_mm512_maskz_loadu_epi16(m, row[r] + c), (__m512bh)xv);
      prefetch(next[r] + c);
    }
  }
  for (int r = 0; r < R; ++r) u[r] = _mm512_reduce_add_ps(s[r]);
#elif defined(SPARSE_GEMV_AVX512)
  __m512 s[R];
  for (int r = 0; r < R; ++r) s[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = c + 16 <= n ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - c)) - 1);
    const __m512i xw = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x + c));
    const __m512 xv = _mm512_castsi512_ps(_mm512_slli_epi32(xw, 16));
    for (int r = 0; r < R; ++r) {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, row[r] + c));
      s[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), xv, s[r]);
      prefetch(next[r] + c);
    }
  }
  for (int r = 0; r < R; ++r) u[r] = _mm512_reduce_add_ps(s[r]);
#else
  for (int r = 0; r < R; ++r) {
    float s = 0.0f;
    for (int64_t c = 0; c < n; ++c) s = std::fma(to_float(row[r][c]), to_float(x[c]), s);
    u[r] = s;
  }
  (void)next;
#endif
}

template <typename T>
inline void dots_group(int count, const T* const* row, const T* x, int64_t n, const T* const* next, float* u) {
  while (count > 8) {
    dots<8>(row, x, n, next, u);
    row += 8, next += 8, u += 8, count -= 8;
  }
  switch (count) {
    case 8: dots<8>(row, x, n, next, u); break;
    case 7: dots<7>(row, x, n, next, u); break;
    case 6: dots<6>(row, x, n, next, u); break;
    case 5: dots<5>(row, x, n, next, u); break;
    case 4: dots<4>(row, x, n, next, u); break;
    case 3: dots<3>(row, x, n, next, u); break;
    case 2: dots<2>(row, x, n, next, u); break;
    case 1: dots<1>(row, x, n, next, u); break;
    default: break;
  }
}

// ---- selection ------------------------------------------------------------------------------------

// The kept entries of one token: indices and float values, in input order.
struct Kept {
  std::vector<int32_t> index;
  std::vector<float> value;
  int64_t count = 0;
  bool finite = true;
};

// Keep |x| >= threshold (a NaN compares false with "<", so it is kept; its row is reported
// non-finite anyway), or the entries of mask when it is given. Branch-free; with AVX-512, 16 entries
// per step: one compare, and the kept indices and values packed by a register compress (the
// memory-destination compress is microcoded on some CPUs).
#if defined(SPARSE_GEMV_AVX512)
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16* p, __mmask16 m) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
#endif

template <typename T>
void select(const T* x, const bool* mask, int64_t n, float threshold, Kept& kept) {
  if (int64_t(kept.index.size()) < n + 16) {  // room for a full vector store past the last kept entry
    kept.index.resize(n + 16);
    kept.value.resize(n + 16);
  }
  int32_t* index = kept.index.data();
  float* value = kept.value.data();
  const float largest = std::numeric_limits<float>::max();
  int64_t k = 0, j = 0;
  bool finite = true;
#if defined(SPARSE_GEMV_AVX512)
  const __m512 limit = _mm512_set1_ps(largest), bound = _mm512_set1_ps(threshold);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __mmask16 all_finite = 0xFFFF;
  for (; j < n; j += 16) {
    const __mmask16 in = j + 16 <= n ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 v = load16(x + j, in);
    const __m512 a = _mm512_abs_ps(v);
    all_finite &= _mm512_mask_cmp_ps_mask(in, a, limit, _CMP_LE_OQ) | static_cast<__mmask16>(~in);
    __mmask16 keep;
    if (mask != nullptr) {
      keep = _mm512_mask_test_epi32_mask(in, _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(in, mask + j)),
                                         _mm512_set1_epi32(0xFF));
    } else {
      keep = _mm512_mask_cmp_ps_mask(in, a, bound, _CMP_NLT_UQ);  // !(a < threshold): NaN kept
    }
    const __m512i at = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(j)));
    _mm512_storeu_si512(index + k, _mm512_maskz_compress_epi32(keep, at));
    _mm512_storeu_ps(value + k, _mm512_maskz_compress_ps(keep, v));
    k += __builtin_popcount(static_cast<unsigned>(keep));
  }
  finite = all_finite == 0xFFFF;
#endif
  for (; j < n; ++j) {
    const float v = to_float(x[j]);
    const float a = std::fabs(v);
    finite &= a <= largest;  // false for an infinity and for NaN
    index[k] = static_cast<int32_t>(j);
    value[k] = v;
    k += mask != nullptr ? static_cast<int64_t>(mask[j]) : static_cast<int64_t>(!(a < threshold));
  }
  kept.count = k;
  kept.finite = finite;
}

template <typename T>
bool row_finite(const T* x, int64_t n) {
  const float largest = std::numeric_limits<float>::max();
  bool finite = true;
  for (int64_t j = 0; j < n; ++j) finite &= std::fabs(to_float(x[j])) <= largest;
  return finite;
}

// ---- output ---------------------------------------------------------------------------------------

// out[0:n] = acc (+ bias), undoing the pair order where the accumulator has it.
template <typename T>
void finish_row(const float* acc, const T* bias, int64_t c0, int64_t c1, T* out) {
  for (int64_t c = c0; c < c1; ++c) {
    const float a = acc[Paired<T>::value ? pair_position(c) : c];
    out[c] = T(bias != nullptr ? a + to_float(bias[c]) : a);
  }
}

// Column blocks for the threads: multiples of kChunk, as many as threads (one when single).
std::vector<int64_t> column_blocks(int64_t columns) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = (columns + kChunk - 1) / kChunk;
  const int64_t blocks = std::max<int64_t>(1, std::min(threads, chunks));
  const int64_t per_block = (chunks + blocks - 1) / blocks * kChunk;
  std::vector<int64_t> bounds;
  for (int64_t c = 0; c < columns; c += per_block) bounds.push_back(c);
  bounds.push_back(columns);
  return bounds;
}

// ---- GEMV -----------------------------------------------------------------------------------------

template <typename T>
std::tuple<torch::Tensor, int64_t, std::vector<int64_t>> gemv(const torch::Tensor& x, const torch::Tensor& rows,
                                                              double threshold, const torch::Tensor* mask,
                                                              const torch::Tensor* bias) {
  const int64_t inputs = x.size(-1), tokens = inputs > 0 ? x.numel() / inputs : 0, columns = rows.size(1);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* wp = reinterpret_cast<const T*>(rows.data_ptr());
  const bool* mp = mask != nullptr ? mask->data_ptr<bool>() : nullptr;
  const T* bp = bias != nullptr ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
  std::vector<int64_t> shape = x.sizes().vec();  // x's leading shape, the outputs as the last axis
  shape.back() = columns;
  auto out = torch::empty(shape, x.options());
  T* op = reinterpret_cast<T*>(out.data_ptr());

  // buffers of the calling thread, reused by its later calls (no allocation per decode token); the
  // worker threads reach them through these references (a thread_local named inside the parallel
  // region would be the worker's own)
  static thread_local std::vector<Kept> kept_buffer;
  static thread_local std::vector<float> acc_buffer;
  if (int64_t(kept_buffer.size()) < tokens) kept_buffer.resize(tokens);
  std::vector<Kept>& kept = kept_buffer;
  std::vector<float>& acc = acc_buffer;
  std::vector<int64_t> nonfinite;
  int64_t kept_total = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    select(xp + t * inputs, mp != nullptr ? mp + t * inputs : nullptr, inputs, static_cast<float>(threshold),
           kept[t]);
    if (kept[t].finite) {
      kept_total += kept[t].count;
    } else {
      nonfinite.push_back(t);
      kept[t].count = 0;  // computed densely by the caller
    }
  }

  const int64_t padded = round_up(columns, kChunk);
  acc.assign(static_cast<size_t>(tokens * padded), 0.0f);
  const std::vector<int64_t> bounds = column_blocks(columns);
  const int64_t blocks = int64_t(bounds.size()) - 1;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = bounds[b], c1 = bounds[b + 1];
      for (int64_t t = 0; t < tokens; ++t) {
        float* a = acc.data() + t * padded;
        const Kept& k = kept[t];
        const T* group[kGroup];
        const T* next[kGroup];
        for (int64_t g = 0; g < k.count; g += kGroup) {
          const int count = static_cast<int>(std::min<int64_t>(kGroup, k.count - g));
          const int64_t n = g + kGroup;
          for (int r = 0; r < count; ++r) {
            group[r] = wp + int64_t(k.index[g + r]) * columns;
            next[r] = n + r < k.count ? wp + int64_t(k.index[n + r]) * columns : group[r];
          }
          accumulate_group(count, group, k.value.data() + g, next, c0, c1, a);
        }
        finish_row<T>(a, bp, c0, c1, op + t * columns);
      }
    }
  });
  return {out, kept_total, nonfinite};
}

// ---- the bundled CATS intermediate ----------------------------------------------------------------

template <typename T>
std::tuple<torch::Tensor, int64_t, std::vector<int64_t>> bundled(const torch::Tensor& x, const torch::Tensor& gate,
                                                                 const torch::Tensor& bundle, double threshold,
                                                                 const torch::Tensor* mask,
                                                                 const torch::Tensor* up_bias,
                                                                 const torch::Tensor* down_bias) {
  const int64_t tokens = x.size(0), hidden = x.size(1), neurons = gate.size(1), width = bundle.size(1);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* gp = reinterpret_cast<const T*>(gate.data_ptr());
  const T* wp = reinterpret_cast<const T*>(bundle.data_ptr());
  const bool* mp = mask != nullptr ? mask->data_ptr<bool>() : nullptr;
  const T* ub = up_bias != nullptr ? reinterpret_cast<const T*>(up_bias->data_ptr()) : nullptr;
  const T* db = down_bias != nullptr ? reinterpret_cast<const T*>(down_bias->data_ptr()) : nullptr;
  auto out = torch::empty({tokens, hidden}, x.options());
  T* op = reinterpret_cast<T*>(out.data_ptr());

  const int64_t padded = round_up(hidden, kChunk);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<int64_t> nonfinite;
  int64_t kept_total = 0;
  static thread_local Kept kept_buffer;  // the calling thread's, reused; referenced as in gemv
  static thread_local std::vector<float> partial_buffer;
  Kept& k = kept_buffer;
  std::vector<float>& partial = partial_buffer;
  for (int64_t t = 0; t < tokens; ++t) {
    const T* xt = xp + t * hidden;
    select(gp + t * neurons, mp != nullptr ? mp + t * neurons : nullptr, neurons, static_cast<float>(threshold), k);
    if (!k.finite || !row_finite(xt, hidden)) {
      nonfinite.push_back(t);
      for (int64_t c = 0; c < hidden; ++c) op[t * hidden + c] = T(0.0f);
      continue;
    }
    kept_total += k.count;
    // kept neurons split into contiguous ranges, one per thread, each with its own partial sum
    const int64_t parts = std::max<int64_t>(1, std::min(threads, (k.count + kGroup - 1) / kGroup));
    const int64_t per_part = (k.count + parts - 1) / parts;
    partial.assign(static_cast<size_t>(parts * padded), 0.0f);
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t part = p0; part < p1; ++part) {
        float* a = partial.data() + part * padded;
        const int64_t begin = part * per_part, end = std::min(k.count, begin + per_part);
        const T* up[kGroup];
        const T* down[kGroup];
        const T* next_up[kGroup];
        const T* next_down[kGroup];
        float h[kGroup];
        for (int64_t g = begin; g < end; g += kGroup) {
          const int count = static_cast<int>(std::min<int64_t>(kGroup, end - g));
          const int64_t n = g + kGroup;
          for (int r = 0; r < count; ++r) {
            up[r] = wp + int64_t(k.index[g + r]) * width;
            down[r] = up[r] + hidden;
            next_up[r] = n + r < end ? wp + int64_t(k.index[n + r]) * width : up[r];
            next_down[r] = next_up[r] + hidden;
          }
          dots_group(count, up, xt, hidden, next_up, h);
          for (int r = 0; r < count; ++r) {
            const int64_t j = k.index[g + r];
            // as the dense model rounds: up(x) and act(gate) * up(x) in the weights' dtype
            const float u = to_float(T(ub != nullptr ? h[r] + to_float(ub[j]) : h[r]));
            h[r] = to_float(T(k.value[g + r] * u));
          }
          accumulate_group(count, down, h, next_down, 0, hidden, a);
        }
      }
    });
    for (int64_t part = 1; part < parts; ++part) {
      const float* from = partial.data() + part * padded;
      for (int64_t c = 0; c < padded; ++c) partial[c] += from[c];
    }
    finish_row<T>(partial.data(), db, 0, hidden, op + t * hidden);
  }
  return {out, kept_total, nonfinite};
}

void check_operands(const torch::Tensor& x, const torch::Tensor& weights, int64_t inputs, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && weights.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && weights.dim() == 2, what, ": x must be [..., in] and the weights 2-D");
  TORCH_CHECK(x.scalar_type() == weights.scalar_type(), what, ": x and the weights must share a dtype");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, what,
              ": float32 or bfloat16 only");
  TORCH_CHECK(x.size(-1) == inputs, what, ": x has ", x.size(-1), " features, the weights expect ", inputs);
  TORCH_CHECK(weights.is_contiguous(), what, ": the weights must be contiguous");
}

void check_vector(const std::optional<torch::Tensor>& v, const torch::Tensor& x, int64_t size, const char* what) {
  if (!v.has_value()) return;
  TORCH_CHECK(v->dim() == 1 && v->size(0) == size && v->is_contiguous() && v->scalar_type() == x.scalar_type(),
              what, ": a contiguous vector of ", size, " in the weights' dtype");
}

void check_mask(const std::optional<torch::Tensor>& mask, const torch::Tensor& of, const char* what) {
  if (!mask.has_value()) return;
  TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->is_contiguous() && mask->dim() >= 1 &&
              mask->numel() == of.numel() && mask->size(-1) == of.size(-1), what,
              ": the mask must be a contiguous bool tensor with its activations' rows");
}

}  // namespace

// x [..., I] (any leading shape: T token rows), rows [I, O] (input-major), keep |x| >= threshold (or
// mask [T, I] when given), bias [O] -> (out [..., O], kept entries over finite tokens, the token rows
// holding a NaN or an infinity: their output rows are left for the caller to compute densely).
std::tuple<torch::Tensor, int64_t, std::vector<int64_t>> sparse_gemv(torch::Tensor x, torch::Tensor rows,
                                                                     double threshold,
                                                                     std::optional<torch::Tensor> mask,
                                                                     std::optional<torch::Tensor> bias) {
  check_operands(x, rows, rows.size(0), "sparse_gemv");
  x = x.contiguous();  // x itself when it is (a decode step's [1, 1, I] is one token row)
  check_mask(mask, x, "sparse_gemv");
  check_vector(bias, x, rows.size(1), "sparse_gemv bias");
  const torch::Tensor* m = mask.has_value() ? &*mask : nullptr;
  const torch::Tensor* b = bias.has_value() ? &*bias : nullptr;
  if (x.scalar_type() == torch::kFloat) return gemv<float>(x, rows, threshold, m, b);
  return gemv<bf16>(x, rows, threshold, m, b);
}

// x [T, H], gate = act(W_gate x) [T, I], bundle [I, 2H] = [W_up | W_down^T], keep |gate| >= threshold
// (or mask [T, I]) -> (down(gate * up(x)) over the kept neurons [T, H], kept neurons over finite
// tokens, tokens whose x or gate holds a NaN or an infinity).
std::tuple<torch::Tensor, int64_t, std::vector<int64_t>> bundled_glu(torch::Tensor x, torch::Tensor gate,
                                                                     torch::Tensor bundle, double threshold,
                                                                     std::optional<torch::Tensor> mask,
                                                                     std::optional<torch::Tensor> up_bias,
                                                                     std::optional<torch::Tensor> down_bias) {
  check_operands(x, bundle, bundle.size(1) / 2, "bundled_glu");
  TORCH_CHECK(x.dim() == 2, "bundled_glu: x must be [tokens, H]");
  TORCH_CHECK(bundle.size(1) % 2 == 0, "bundled_glu: the bundle must be [I, 2H]");
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == x.size(0) && gate.size(1) == bundle.size(0) &&
              gate.scalar_type() == x.scalar_type(), "bundled_glu: gate must be [tokens, I] in x's dtype");
  x = x.contiguous();
  gate = gate.contiguous();
  check_mask(mask, gate, "bundled_glu");
  check_vector(up_bias, x, bundle.size(0), "bundled_glu up bias");
  check_vector(down_bias, x, x.size(1), "bundled_glu down bias");
  const torch::Tensor* m = mask.has_value() ? &*mask : nullptr;
  const torch::Tensor* ub = up_bias.has_value() ? &*up_bias : nullptr;
  const torch::Tensor* db = down_bias.has_value() ? &*down_bias : nullptr;
  if (x.scalar_type() == torch::kFloat) return bundled<float>(x, gate, bundle, threshold, m, ub, db);
  return bundled<bf16>(x, gate, bundle, threshold, m, ub, db);
}

std::string instruction_set() {
#if defined(SPARSE_GEMV_AVX512_BF16)
  return "avx512-bf16";
#elif defined(SPARSE_GEMV_AVX512)
  return "avx512";
#else
  return "portable";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_gemv", &sparse_gemv,
        "x [..., I], rows [I, O], threshold, mask [T, I], bias -> (out [..., O], kept, nonfinite token rows)",
        pybind11::arg("x"), pybind11::arg("rows"), pybind11::arg("threshold"), pybind11::arg("mask") = pybind11::none(),
        pybind11::arg("bias") = pybind11::none(), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("bundled_glu", &bundled_glu,
        "x [T, H], gate [T, I], bundle [I, 2H], threshold, mask, up_bias, down_bias -> (out, kept, nonfinite tokens)",
        pybind11::arg("x"), pybind11::arg("gate"), pybind11::arg("bundle"), pybind11::arg("threshold"),
        pybind11::arg("mask") = pybind11::none(), pybind11::arg("up_bias") = pybind11::none(),
        pybind11::arg("down_bias") = pybind11::none(), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("instruction_set", &instruction_set, "the vector instructions this build uses");
}
