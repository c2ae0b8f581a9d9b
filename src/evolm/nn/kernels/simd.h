// Shared by the decode kernels (decode.cpp) and the whole-step kernel (decode_step.cpp): AVX-512 dot
// products of one weight row, 16-lane loads and stores of float32 / bf16 values, exp, and one-query
// attention of a key/value head's group of query heads.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <c10/util/BFloat16.h>

namespace evolm_simd {

constexpr int kAcc = 4;         // independent accumulators per row
// Software prefetch kPrefetch bytes ahead of the loads, into L2 (T1). Measured over the decode benchmark's
// weights, as a share of a 2-thread sum() over the same bytes: on Zen 4, bf16 0.59 -> 0.90 and float32
// 0.86 -> 0.92 against prefetching 2 KB ahead into L1 (T0), which fills L1's miss buffers with lines the
// next loads need anyway; 2, 3, 6 and 8 KB ahead and prefetching into L3 (T2) were no better.
constexpr int kPrefetch = 4096;

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p) + kPrefetch, _MM_HINT_T1); }

// The first kPrefetch bytes of a thread's share, which the loop's own prefetches never cover: a new
// stream starts with its first 4 KB (usually one memory page) in flight instead of one miss at a time.
inline void prefetch_start(const void* begin, const void* end) {
  const char *p = static_cast<const char*>(begin), *e = static_cast<const char*>(end);
  for (int64_t b = 0; b < kPrefetch && p + b < e; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
}

// Dot product of one float32 weight row with x (length k).
inline float dot_f32(const float* w, const float* x, int64_t k) {
  __m512 a[kAcc];
  for (int i = 0; i < kAcc; ++i) a[i] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 * kAcc <= k; j += 16 * kAcc)
    for (int i = 0; i < kAcc; ++i) {
      prefetch(w + j + 16 * i);
      a[i] = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 16 * i), _mm512_loadu_ps(x + j + 16 * i), a[i]);
    }
  for (; j + 16 <= k; j += 16) a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(w + j), _mm512_loadu_ps(x + j), a[0]);
  if (j < k) {
    const __mmask16 m = (__mmask16)((1u << (k - j)) - 1u);
    a[1] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + j), _mm512_maskz_loadu_ps(m, x + j), a[1]);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
}

// Dot product of one bf16 weight row with x (length k), summed in float32.
inline float dot_bf16(const uint16_t* w, const uint16_t* x, int64_t k) {
  __m512 a[kAcc];
  for (int i = 0; i < kAcc; ++i) a[i] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 * kAcc <= k; j += 32 * kAcc)
    for (int i = 0; i < kAcc; ++i) {
      prefetch(w + j + 32 * i);
      a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)_mm512_loadu_si512(w + j + 32 * i),
                              (__m512bh)_mm512_loadu_si512(x + j + 32 * i));
    }
  for (; j + 32 <= k; j += 32)
    a[0] = _mm512_dpbf16_ps(a[0], (__m512bh)_mm512_loadu_si512(w + j), (__m512bh)_mm512_loadu_si512(x + j));
  if (j < k) {  // masked-off lanes load zeros: their products add nothing
    const __mmask32 m = (__mmask32)((1ull << (k - j)) - 1ull);
    a[1] = _mm512_dpbf16_ps(a[1], (__m512bh)_mm512_maskz_loadu_epi16(m, w + j),
                            (__m512bh)_mm512_maskz_loadu_epi16(m, x + j));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
}


inline float dot_row(const float* w, const float* x, int64_t k) { return dot_f32(w, x, k); }
inline float dot_row(const uint16_t* w, const uint16_t* x, int64_t k) { return dot_bf16(w, x, k); }

// Up to 16 values (lanes outside mask m read as 0), as float32; stores round back to the element type.
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {  // rounded to nearest even
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}
// v rounded to the element type and back (float32: unchanged): what storing and reloading it gives.
inline __m512 round16(__m512 v, const float*) { return v; }
inline __m512 round16(__m512 v, const c10::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

// exp(x) for float32 lanes: 2^(x log2 e) split into an integer power (applied exactly by vscalefps)
// and 2^f, |f| <= 0.5, from a degree-6 polynomial (relative error ~2e-7). -inf lanes give 0.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // below this exp underflows to 0 anyway
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));  // f ln 2
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// One (batch row, key/value head): its G query heads over S keys. Keys and values are read once per
// query head from L1/L2 (a head's cache rows are S x D values); four accumulator registers per pass.
template <typename T>
void attend_group(const T* qb, const T* kb, const T* vb, const bool* keep, int64_t G, int64_t S, int64_t D,
                  int64_t Dv, float scale, float* scores, T* ob) {
  float* sc = scores;  // S floats, reused for each query head
  for (int64_t g = 0; g < G; ++g) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < S; ++s) {
      if (keep && !keep[s]) {
        sc[s] = -std::numeric_limits<float>::infinity();
        continue;
      }
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const T* kr = kb + s * D;
      const T* qr = qb + g * D;
      int64_t d = 0;
      for (; d + 64 <= D; d += 64) {
        a0 = _mm512_fmadd_ps(load16(qr + d, 0xFFFF), load16(kr + d, 0xFFFF), a0);
        a1 = _mm512_fmadd_ps(load16(qr + d + 16, 0xFFFF), load16(kr + d + 16, 0xFFFF), a1);
        a2 = _mm512_fmadd_ps(load16(qr + d + 32, 0xFFFF), load16(kr + d + 32, 0xFFFF), a2);
        a3 = _mm512_fmadd_ps(load16(qr + d + 48, 0xFFFF), load16(kr + d + 48, 0xFFFF), a3);
      }
      for (; d < D; d += 16) {
        const __mmask16 m = tail_mask(D - d);
        a0 = _mm512_fmadd_ps(load16(qr + d, m), load16(kr + d, m), a0);
      }
      const float x = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) * scale;
      sc[s] = x;
      mx = std::max(mx, x);
    }
    __m512 total = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; s += 16) {  // probabilities (unnormalised); masked keys give exp(-inf) = 0
      const __mmask16 m = tail_mask(S - s);
      const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + s), _mm512_set1_ps(mx));
      const __m512 e = _mm512_maskz_mov_ps(m & _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), exp16(x));
      _mm512_mask_storeu_ps(sc + s, m, e);
      total = _mm512_add_ps(total, e);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(total);
    for (int64_t d = 0; d < Dv; d += 64) {  // output columns d .. d+63
      const __mmask16 m0 = tail_mask(Dv - d), m1 = tail_mask(Dv - d - 16), m2 = tail_mask(Dv - d - 32),
                      m3 = tail_mask(Dv - d - 48);
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t s = 0; s < S; ++s) {
        if (sc[s] == 0.0f) continue;  // masked (or underflowed) keys add nothing
        const __m512 pv = _mm512_set1_ps(sc[s]);
        const T* vr = vb + s * Dv + d;
        a0 = _mm512_fmadd_ps(pv, load16(vr, m0), a0);
        if (m1) a1 = _mm512_fmadd_ps(pv, load16(vr + 16, m1), a1);
        if (m2) a2 = _mm512_fmadd_ps(pv, load16(vr + 32, m2), a2);
        if (m3) a3 = _mm512_fmadd_ps(pv, load16(vr + 48, m3), a3);
      }
      const __m512 iv = _mm512_set1_ps(inv);
      T* o = ob + g * Dv + d;
      store16(o, _mm512_mul_ps(a0, iv), m0);
      if (m1) store16(o + 16, _mm512_mul_ps(a1, iv), m1);
      if (m2) store16(o + 32, _mm512_mul_ps(a2, iv), m2);
      if (m3) store16(o + 48, _mm512_mul_ps(a3, iv), m3);
    }
  }
}

}  // namespace evolm_simd
