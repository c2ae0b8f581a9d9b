// A whole decode step of a pre-norm Llama-style decoder at batch 1 in one native call: the class
// torch.classes.evolm_kernels.DecodePlan (loaded by evolm/nn/decode_kernels.py, driven by
// evolm/infer/native_step.py) holds a model's and a cache's tensors, checked once, and runs steps:
//
//   DecodePlan(Tensor[] layers, Tensor[] k_cache, Tensor[] v_cache, Tensor embed, Tensor norm, Tensor head,
//              Tensor cos, Tensor sin, int n_heads, float eps, float scale)
//   .step(int token, int pos) -> (Tensor logits, Tensor next, Tensor finite)
//   .greedy(int token, int pos, int n, int[] eos) -> (Tensor tokens, bool nonfinite)
//
// Why. At batch 1 a step reads every weight once, so its speed limit is memory bandwidth (Williams et al.,
// 2009). Run as ~85 product calls and ~100 small ops from Python or a compiled graph, the memory sits idle
// between calls and each thread's stream restarts at every call; here the step is one OpenMP parallel
// region (the approach of llama.cpp's graph compute on a fixed thread pool). Each thread takes a
// contiguous share of every product's rows; stages that need the whole of the previous stage's output
// meet at a barrier, and a thread waiting there prefetches the start of its share of the next weight, so
// the memory keeps streaming through the wait.
//
// Per layer (x the residual stream, in the model's dtype):
//   h = rmsnorm(x)                        every thread, for itself (no barrier)
//   q, k, v = h Wq^T + bq, ...            rows of [Wq; Wk; Wv] split across threads     | barrier
//   rope(q), rope(k); cache[pos] = k, v   heads split across threads                    | barrier
//   o = attention(q, cache[0..pos])       query heads split                             | barrier
//   x += o Wo^T                           rows split, each thread adds its rows         | barrier
//   h = rmsnorm(x); a = silu(h Wg^T) * (h Wu^T)   the inner index split                 | barrier
//   x += a Wd^T                           rows split                                    | barrier
// then logits = rmsnorm(x) Head^T (rows split) with each thread's argmax and finiteness, combined.
//
// Numerics follow the module path (evolm.nn.norm / rope / mlp under the decode kernels of decode.cpp):
// products and norms in float32, every intermediate rounded to the model's dtype where the module path
// stores one, so a bf16 step computes what the modules compute up to the order of float32 sums.
//
// layers: 12 tensors per layer, [in_norm, Wq, Wk, Wv, bq, bk, bv, Wo, post_norm, Wg, Wu, Wd]; a bias
// is a float32 vector or an empty tensor for none. Caches (1, K, S, D) contiguous, the model's dtype.
// cos/sin: (positions, R) rotary tables in the model's dtype, R <= D rotating the first R channels of
// each head in the "rotate half" layout (GPT-NeoX / Hugging Face).

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <thread>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "simd.h"

namespace {

using namespace evolm_simd;

// Bytes of its next weight share a thread prefetches (into L2) while it waits at a barrier.
// (Measured on the decode benchmark: 32 KB to 256 KB, and prefetching the output projection's share during
// attention as well, all within noise of each other.)
constexpr int64_t kWaitPrefetch = 64 * 1024;
// Pauses (~30-40 ns each) a waiting thread spins before it starts yielding its core.
constexpr int64_t kSpinsBeforeYield = 20000;

// A spin barrier (a count and a generation number) for the threads of one parallel region. While it waits, a thread
// prefetches the next region it will stream (`Prefetcher`), so waiting keeps memory busy.
struct alignas(64) Barrier {
  std::atomic<int> count{0};
  char pad[64 - sizeof(std::atomic<int>)];
  std::atomic<int> generation{0};
};

struct Prefetcher {
  const char* p = nullptr;
  const char* end = nullptr;
  void next(const void* start, int64_t n) {
    p = static_cast<const char*>(start);
    end = p + std::min(n, kWaitPrefetch);
  }
  bool pump() {
    if (p >= end) return false;
    _mm_prefetch(p, _MM_HINT_T1);
    p += 64;
    return true;
  }
};

void wait(Barrier& b, int n, Prefetcher& pf) {
  if (n == 1) return;
  const int g = b.generation.load(std::memory_order_acquire);
  if (b.count.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
    b.count.store(0, std::memory_order_relaxed);
    b.generation.store(g + 1, std::memory_order_release);
    return;
  }
  for (int64_t spins = 0; b.generation.load(std::memory_order_acquire) == g; ++spins) {
    if (pf.pump()) continue;
    _mm_pause();
    if (spins > kSpinsBeforeYield) std::this_thread::yield();  // more threads than free cores: let others run
  }
}

// [lo, hi) of thread t's contiguous share of n items.
inline void share(int64_t n, int t, int nt, int64_t& lo, int64_t& hi) {
  lo = n * t / nt;
  hi = n * (t + 1) / nt;
}

// Storage type of T as the dot products read it.
template <typename T>
struct Raw;
template <>
struct Raw<float> {
  using type = float;
};
template <>
struct Raw<c10::BFloat16> {
  using type = uint16_t;
};

template <typename T>
inline float f32(T v) {
  return static_cast<float>(v);
}
template <typename T>
inline const typename Raw<T>::type* raw(const T* p) {
  return reinterpret_cast<const typename Raw<T>::type*>(p);
}

// y[o] = dot(W[o], x) + b[o], rounded to T, for rows [lo, hi) of W (n x k).
template <typename T>
void rows(const T* w, const float* b, const T* x, int64_t k, int64_t lo, int64_t hi, T* y) {
  if (lo >= hi) return;
  prefetch_start(w + lo * k, w + hi * k);
  for (int64_t o = lo; o < hi; ++o) y[o] = T(dot_row(raw(w + o * k), raw(x), k) + (b ? b[o] : 0.0f));
}

// RMSNorm (Zhang & Sennrich, 2019) as evolm.nn.norm.RMSNorm: float32 statistics, x * rsqrt(mean(x^2) + eps)
// rounded to T, times the weight, rounded again.
template <typename T>
void rmsnorm(const T* x, const T* w, int64_t n, float eps, T* out) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = load16(x + i, tail_mask(n - i));
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 r = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(n) + eps));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    store16(out + i, _mm512_mul_ps(load16(w + i, m), round16(_mm512_mul_ps(load16(x + i, m), r), x)), m);
  }
}

// x[lo:hi] += y[lo:hi], rounded to T (a residual connection).
template <typename T>
void add(T* x, const T* y, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; i += 16) {
    const __mmask16 m = tail_mask(hi - i);
    store16(x + i, _mm512_add_ps(load16(x + i, m), load16(y + i, m)), m);
  }
}

// out[lo:hi] = silu(g) * u (SwiGLU's gate; Shazeer, 2020), silu rounded to T first as F.silu's output is.
template <typename T>
void swiglu(const T* g, const T* u, int64_t lo, int64_t hi, T* out) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = lo; i < hi; i += 16) {
    const __mmask16 m = tail_mask(hi - i);
    const __m512 x = load16(g + i, m);
    const __m512 s = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    store16(out + i, _mm512_mul_ps(round16(s, g), load16(u + i, m)), m);
  }
}

// Rotary embedding (Su et al., 2021) of one head in place, "rotate half" pairs (i, i + R/2), as
// evolm.nn.rope.apply_rope: x * cos + rotate_half(x) * sin with each product and the sum rounded to T.
template <typename T>
void rope(T* v, const T* cos, const T* sin, int64_t R) {
  const int64_t h = R / 2;
  for (int64_t i = 0; i < h; i += 16) {
    const __mmask16 m = tail_mask(h - i);
    const __m512 a = load16(v + i, m), b = load16(v + h + i, m);
    const __m512 lo = _mm512_sub_ps(round16(_mm512_mul_ps(a, load16(cos + i, m)), v),
                                    round16(_mm512_mul_ps(b, load16(sin + i, m)), v));
    const __m512 hi = _mm512_add_ps(round16(_mm512_mul_ps(b, load16(cos + h + i, m)), v),
                                    round16(_mm512_mul_ps(a, load16(sin + h + i, m)), v));
    store16(v + i, lo, m);
    store16(v + h + i, hi, m);
  }
}

struct Layer {
  const void *in_norm, *wq, *wk, *wv, *wo, *post_norm, *wg, *wu, *wd;
  const float *bq, *bk, *bv;
  void *kc, *vc;
};

template <typename T>
void run_step(const std::vector<Layer>& layers, const T* embed, const T* norm, const T* head, const T* cos,
              const T* sin, int64_t token, int64_t pos, int64_t C, int64_t H, int64_t K, int64_t D, int64_t R,
              int64_t F, int64_t V, int64_t S, float eps, float scale, T* logits, int64_t* next, bool* finite) {
  const int64_t G = H / K, Nq = H * D, Nk = K * D;
  std::vector<T> x(embed + token * C, embed + (token + 1) * C);
  std::vector<T> qkv(Nq + 2 * Nk), att(Nq), gate(F), up(F), act(F), y(C);
  T *q = qkv.data(), *k = q + Nq, *v = k + Nk;
  const T* cs = cos + pos * R;
  const T* sn = sin + pos * R;
  const int nt = std::max(1, at::get_num_threads());
  std::vector<float> best(nt);
  std::vector<int64_t> arg(nt);
  std::vector<char> ok(nt);
  int team = 1;  // threads OpenMP gave the region: fewer than nt when nested or under OMP_THREAD_LIMIT
  Barrier bar;

#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    if (t == 0) team = n;
    std::vector<T> h(std::max(C, F));
    std::vector<float> scores(pos + 1);
    Prefetcher pf;
    int64_t lo, hi;
    for (const Layer& L : layers) {
      // q, k, v: one range over the rows of [Wq; Wk; Wv].
      rmsnorm(x.data(), static_cast<const T*>(L.in_norm), C, eps, h.data());
      share(Nq + 2 * Nk, t, n, lo, hi);
      rows(static_cast<const T*>(L.wq), L.bq, h.data(), C, std::min(lo, Nq), std::min(hi, Nq), q);
      rows(static_cast<const T*>(L.wk), L.bk, h.data(), C, std::clamp(lo - Nq, int64_t{0}, Nk),
           std::clamp(hi - Nq, int64_t{0}, Nk), k);
      rows(static_cast<const T*>(L.wv), L.bv, h.data(), C, std::clamp(lo - Nq - Nk, int64_t{0}, Nk),
           std::clamp(hi - Nq - Nk, int64_t{0}, Nk), v);
      int64_t olo, ohi;
      share(C, t, n, olo, ohi);
      pf.next(static_cast<const T*>(L.wo) + olo * Nq, (ohi - olo) * Nq * static_cast<int64_t>(sizeof(T)));
      wait(bar, n, pf);
      // Rotary embedding of this thread's query heads and key/value heads; keys and values into the cache.
      share(H, t, n, lo, hi);
      for (int64_t i = lo; i < hi; ++i) rope(q + i * D, cs, sn, R);
      share(K, t, n, lo, hi);
      for (int64_t j = lo; j < hi; ++j) {
        rope(k + j * D, cs, sn, R);
        T* kd = static_cast<T*>(L.kc) + (j * S + pos) * D;
        T* vd = static_cast<T*>(L.vc) + (j * S + pos) * D;
        std::copy(k + j * D, k + (j + 1) * D, kd);
        std::copy(v + j * D, v + (j + 1) * D, vd);
      }
      wait(bar, n, pf);
      // Attention of this thread's query heads over positions 0..pos, a key/value head's group at a time.
      share(H, t, n, lo, hi);
      for (int64_t i = lo; i < hi;) {
        const int64_t j = i / G, end = std::min(hi, (j + 1) * G);
        attend_group<T>(q + i * D, static_cast<const T*>(L.kc) + j * S * D, static_cast<const T*>(L.vc) + j * S * D,
                        nullptr, end - i, pos + 1, D, D, scale, scores.data(), att.data() + i * D);
        i = end;
      }
      wait(bar, n, pf);
      // x += att Wo^T, each thread its rows; then the MLP's gate and up rows of its share of the inner index.
      rows(static_cast<const T*>(L.wo), nullptr, att.data(), Nq, olo, ohi, y.data());
      add(x.data(), y.data(), olo, ohi);
      int64_t flo, fhi;
      share(F, t, n, flo, fhi);
      pf.next(static_cast<const T*>(L.wg) + flo * C, (fhi - flo) * C * static_cast<int64_t>(sizeof(T)));
      wait(bar, n, pf);
      rmsnorm(x.data(), static_cast<const T*>(L.post_norm), C, eps, h.data());
      rows(static_cast<const T*>(L.wg), nullptr, h.data(), C, flo, fhi, gate.data());
      rows(static_cast<const T*>(L.wu), nullptr, h.data(), C, flo, fhi, up.data());
      swiglu(gate.data(), up.data(), flo, fhi, act.data());
      pf.next(static_cast<const T*>(L.wd) + olo * F, (ohi - olo) * F * static_cast<int64_t>(sizeof(T)));
      wait(bar, n, pf);
      rows(static_cast<const T*>(L.wd), nullptr, act.data(), F, olo, ohi, y.data());
      add(x.data(), y.data(), olo, ohi);
      if (&L != &layers.back()) {
        const Layer& N = *(&L + 1);
        int64_t nlo, nhi;
        share(Nq + 2 * Nk, t, n, nlo, nhi);
        const T* first = nlo < Nq ? static_cast<const T*>(N.wq) + nlo * C
                         : nlo < Nq + Nk ? static_cast<const T*>(N.wk) + (nlo - Nq) * C
                                         : static_cast<const T*>(N.wv) + (nlo - Nq - Nk) * C;
        pf.next(first, (nhi - nlo) * C * static_cast<int64_t>(sizeof(T)));
      } else {
        int64_t vlo, vhi;
        share(V, t, n, vlo, vhi);
        pf.next(head + vlo * C, (vhi - vlo) * C * static_cast<int64_t>(sizeof(T)));
      }
      wait(bar, n, pf);
    }
    // Logits of this thread's vocabulary rows, their argmax (first index of the largest) and finiteness.
    rmsnorm(x.data(), norm, C, eps, h.data());
    share(V, t, n, lo, hi);
    rows(head, nullptr, h.data(), C, lo, hi, logits);
    float m = -std::numeric_limits<float>::infinity();
    int64_t a = lo;
    bool fin = true;
    for (int64_t o = lo; o < hi; ++o) {
      const float z = f32(logits[o]);
      fin = fin && std::isfinite(z);
      if (z > m) {
        m = z;
        a = o;
      }
    }
    best[t] = m;
    arg[t] = a;
    ok[t] = fin;
  }
  *next = arg[0];
  *finite = true;
  float m = best[0];
  for (int i = 0; i < team; ++i) {
    *finite = *finite && ok[i];
    if (best[i] > m) {
      m = best[i];
      *next = arg[i];
    }
  }
}

const void* ptr(const at::Tensor& t) { return t.numel() ? t.data_ptr() : nullptr; }

at::Tensor as_tensor(const std::vector<int64_t>& v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t;
}

// The tensors of one model and cache, checked once; step() runs one decode step over them. A class
// rather than an operator taking the ~170 tensors each step: converting and checking them cost ~50 us
// a call, ~1% of a step of the decode benchmark's model.
struct DecodePlan : torch::CustomClassHolder {
  static constexpr size_t kPerLayer = 12;
  std::vector<at::Tensor> tensors;  // kept alive for the raw pointers below
  std::vector<Layer> layers;
  at::Tensor embed, norm, head, cos, sin;
  int64_t C, H, K, D, R, F, V, S;
  double eps, scale;

  DecodePlan(std::vector<at::Tensor> layer_tensors, std::vector<at::Tensor> k_cache, std::vector<at::Tensor> v_cache,
             at::Tensor embed_, at::Tensor norm_, at::Tensor head_, at::Tensor cos_, at::Tensor sin_, int64_t n_heads,
             double eps_, double scale_)
      : embed(std::move(embed_)), norm(std::move(norm_)), head(std::move(head_)), cos(std::move(cos_)),
        sin(std::move(sin_)), H(n_heads), eps(eps_), scale(scale_) {
    const auto dtype = embed.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "evolm::DecodePlan: float32 or bfloat16 only, got ",
                dtype);
    const size_t n_layers = k_cache.size();
    TORCH_CHECK(n_layers > 0 && layer_tensors.size() == kPerLayer * n_layers && v_cache.size() == n_layers,
                "evolm::DecodePlan: ", layer_tensors.size(), " layer tensors (12 per layer) for ", n_layers, " caches");
    for (const at::Tensor* t : {&embed, &norm, &head, &cos, &sin})
      TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == dtype,
                  "evolm::DecodePlan: embed, norm, head and rotary tables must be contiguous CPU ", dtype, " tensors");
    TORCH_CHECK(embed.dim() == 2, "evolm::DecodePlan: embed must be a (V, C) matrix");
    C = embed.size(1);
    TORCH_CHECK(head.dim() == 2 && head.size(1) == C, "evolm::DecodePlan: head must be a (V, ", C, ") matrix");
    V = head.size(0);
    TORCH_CHECK(norm.numel() == C, "evolm::DecodePlan: the final norm must have ", C, " values");
    const at::Tensor& kc0 = k_cache[0];
    TORCH_CHECK(kc0.dim() == 4 && kc0.size(0) == 1, "evolm::DecodePlan: caches must be (1, K, S, D), got ", kc0.sizes());
    K = kc0.size(1), S = kc0.size(2), D = kc0.size(3);
    TORCH_CHECK(H > 0 && H % K == 0, "evolm::DecodePlan: ", K, " key/value heads do not divide ", H, " heads");
    TORCH_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes() && cos.size(0) >= S && cos.size(1) <= D &&
                    cos.size(1) % 2 == 0,
                "evolm::DecodePlan: rotary tables must be (positions >= ", S, ", R <= ", D, ", R even), got ",
                cos.sizes());
    R = cos.size(1);
    F = layer_tensors[9].dim() == 2 ? layer_tensors[9].size(0) : 0;
    for (size_t l = 0; l < n_layers; ++l) {
      const at::Tensor* p = &layer_tensors[kPerLayer * l];
      const std::vector<int64_t> want[] = {{C}, {H * D, C}, {K * D, C}, {K * D, C}, {}, {}, {}, {C, H * D}, {C},
                                           {F, C}, {F, C}, {C, F}};
      for (size_t i = 0; i < kPerLayer; ++i) {
        TORCH_CHECK(p[i].device().is_cpu() && p[i].is_contiguous(), "evolm::DecodePlan: layer ", l, " tensor ", i,
                    " must be a contiguous CPU tensor");
        if (i >= 4 && i <= 6) {  // biases: float32 (n,) or empty
          const int64_t n = i == 4 ? H * D : K * D;
          TORCH_CHECK(p[i].numel() == 0 || (p[i].numel() == n && p[i].scalar_type() == at::kFloat),
                      "evolm::DecodePlan: layer ", l, " tensor ", i, " must be an empty tensor or a float32 bias of ",
                      n);
          continue;
        }
        TORCH_CHECK(p[i].sizes() == at::IntArrayRef(want[i]) && p[i].scalar_type() == dtype,
                    "evolm::DecodePlan: layer ", l, " tensor ", i, " must be a ", dtype, " tensor of ",
                    at::IntArrayRef(want[i]), ", got ", p[i].scalar_type(), " ", p[i].sizes());
      }
      for (const at::Tensor* c : {&k_cache[l], &v_cache[l]})
        TORCH_CHECK(c->sizes() == kc0.sizes() && c->scalar_type() == dtype && c->is_contiguous() && c->device().is_cpu(),
                    "evolm::DecodePlan: layer ", l, " cache must be a contiguous CPU ", dtype, " tensor of ",
                    kc0.sizes());
      layers.push_back({ptr(p[0]), ptr(p[1]), ptr(p[2]), ptr(p[3]), ptr(p[7]), ptr(p[8]), ptr(p[9]), ptr(p[10]),
                        ptr(p[11]), static_cast<const float*>(ptr(p[4])), static_cast<const float*>(ptr(p[5])),
                        static_cast<const float*>(ptr(p[6])), k_cache[l].data_ptr(), v_cache[l].data_ptr()});
    }
    tensors = std::move(layer_tensors);
    tensors.insert(tensors.end(), k_cache.begin(), k_cache.end());
    tensors.insert(tensors.end(), v_cache.begin(), v_cache.end());
  }

  // One step into preallocated outputs: logits (V values), the argmax and whether all logits are finite.
  void run(int64_t token, int64_t pos, at::Tensor& logits, int64_t* next, bool* finite) {
    TORCH_CHECK(token >= 0 && token < embed.size(0), "evolm::DecodePlan: token ", token, " outside 0..",
                embed.size(0) - 1);
    TORCH_CHECK(pos >= 0 && pos < S, "evolm::DecodePlan: position ", pos, " outside the cache's ", S, " slots");
    if (embed.scalar_type() == at::kFloat)
      run_step<float>(layers, embed.data_ptr<float>(), norm.data_ptr<float>(), head.data_ptr<float>(),
                      cos.data_ptr<float>(), sin.data_ptr<float>(), token, pos, C, H, K, D, R, F, V, S,
                      static_cast<float>(eps), static_cast<float>(scale), logits.data_ptr<float>(), next, finite);
    else
      run_step<c10::BFloat16>(layers, embed.data_ptr<c10::BFloat16>(), norm.data_ptr<c10::BFloat16>(),
                              head.data_ptr<c10::BFloat16>(), cos.data_ptr<c10::BFloat16>(),
                              sin.data_ptr<c10::BFloat16>(), token, pos, C, H, K, D, R, F, V, S,
                              static_cast<float>(eps), static_cast<float>(scale), logits.data_ptr<c10::BFloat16>(),
                              next, finite);
  }

  // Feed `token` at cache slot `pos`: (logits (1, V) in the model's dtype, argmax (1,), all finite (1,)).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> step(int64_t token, int64_t pos) {
    at::Tensor logits = at::empty({1, V}, embed.options());
    at::Tensor next = at::empty({1}, embed.options().dtype(at::kLong));
    at::Tensor finite = at::empty({1}, embed.options().dtype(at::kBool));
    run(token, pos, logits, next.data_ptr<int64_t>(), finite.data_ptr<bool>());
    return {logits, next, finite};
  }

  // Greedy decoding of up to n tokens after `token` at slot `pos`, without returning to Python between
  // steps (whose code and data a step's weight stream has evicted from the caches: ~0.1 ms a step here).
  // Stops after a token in `eos`, or before a step whose logits are not all finite. Returns the tokens
  // chosen and whether it stopped at non-finite logits; a step ran (and wrote the cache) for each token
  // returned, plus the non-finite one.
  std::tuple<at::Tensor, bool> greedy(int64_t token, int64_t pos, int64_t n, std::vector<int64_t> eos) {
    TORCH_CHECK(n >= 0 && pos + n <= S, "evolm::DecodePlan: ", n, " steps from position ", pos, " overflow the cache's ",
                S, " slots");
    at::Tensor logits = at::empty({1, V}, embed.options());
    std::vector<int64_t> out;
    out.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      int64_t next = 0;
      bool finite = true;
      run(token, pos + i, logits, &next, &finite);
      if (!finite) return {as_tensor(out), true};
      out.push_back(next);
      if (std::find(eos.begin(), eos.end(), next) != eos.end()) break;
      token = next;
    }
    return {as_tensor(out), false};
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(evolm_kernels, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
                       at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, double, double>())
      .def("step", &DecodePlan::step)
      .def("greedy", &DecodePlan::greedy);
}
