// Kernels for one decode step on AVX-512 CPUs, registered as torch operators (evolm_kernels::) for
// CPU and Meta tensors, so that a torch.compile graph calls each as one opaque op (loaded by
// evolm/nn/decode_kernels.py):
//
//   gemv(Tensor x, Tensor w, Tensor? b) -> Tensor            y = x W^T + b, a few rows x
//   gemv_group(Tensor x, Tensor[] ws, Tensor?[] bs) -> Tensor[]   y_i = x W_i^T + b_i in one call (q/k/v, gate/up)
//   decode_attention(Tensor q, Tensor k, Tensor v, Tensor? allowed, float scale) -> Tensor
//
// gemv. A decode step reads every weight once, so its speed is the rate at which one product streams its
// weight from memory. Each weight row is read front to back with four independent accumulators (the
// layout of a plain `sum()`, the read the bandwidth bound is measured with): one sequential stream
// per thread, no horizontal work until the row ends. bf16 rows use AVX512_BF16's dot-product
// instruction (pairs of bf16 products summed in float32); float32 rows use fused multiply-adds.
// Rows are split across threads with at::parallel_for (OpenMP, the pool PyTorch's own kernels use;
// the build must pass -fopenmp, without which at::parallel_for runs on one thread).
//
// decode_attention. softmax(scale q k^T) v for one query per (batch row, head) over a KV cache, one
// task per key/value head whose grouped query heads read its rows in place (from memory once, then
// from L1/L2), scores and sums in float32. Inductor
// would otherwise either call SDPA on float32 copies of the cache (bf16) or inline the query's rotary
// embedding into the loop over every cached key.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "simd.h"

namespace {

using namespace evolm_simd;

// One weight of a group: its rows, output and float32 bias (or null).
struct Segment {
  const void* w;
  void* y;
  const float* bias;
  int64_t n;
};

inline void store(float* y, float v) { *y = v; }
inline void store(c10::BFloat16* y, float v) { *y = c10::BFloat16(v); }

// y_i = x W_i^T + b_i for every segment i, all of in-features k, `rows` rows of x. The weights' rows are
// numbered one after another and split across threads as one range (contiguous shares: two threads
// streaming far-apart halves read faster here than threads taking interleaved chunks, and taking
// chunks dynamically to even out the finish measured no better), so a thread's share runs on from one
// weight into the next with no join between them.
template <typename T, typename Y>
void run_segments(const T* x, int64_t rows, int64_t k, const std::vector<Segment>& segs) {
  std::vector<int64_t> first(segs.size() + 1, 0);  // global index of each segment's first row
  for (size_t i = 0; i < segs.size(); ++i) first[i + 1] = first[i] + segs[i].n;
  // Split weight rows so that each thread's share is at least ~64 KB of weight.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(k * static_cast<int64_t>(sizeof(T)), 1));
  at::parallel_for(0, first.back(), grain, [&](int64_t lo, int64_t hi) {
    for (size_t i = 0; i < segs.size(); ++i) {
      const int64_t a = std::max(lo, first[i]) - first[i], b = std::min(hi, first[i + 1]) - first[i];
      if (a >= b) continue;
      const Segment& sg = segs[i];
      const T* w = static_cast<const T*>(sg.w);
      Y* y = static_cast<Y*>(sg.y);
      prefetch_start(w + a * k, w + b * k);
      for (int64_t o = a; o < b; ++o)
        for (int64_t r = 0; r < rows; ++r) store(y + r * sg.n + o, dot_row(w + o * k, x + r * k, k) + (sg.bias ? sg.bias[o] : 0.0f));
    }
  });
}

std::vector<at::Tensor> gemv_group_cpu(const at::Tensor& x_in, at::TensorList ws,
                                       const c10::List<std::optional<at::Tensor>>& bs) {
  TORCH_CHECK(!ws.empty(), "evolm::gemv: no weights given");
  TORCH_CHECK(bs.size() == ws.size(), "evolm::gemv: ", ws.size(), " weights but ", bs.size(), " biases (None for none)");
  TORCH_CHECK(x_in.dim() >= 1, "evolm::gemv: x must have at least one dimension");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "evolm::gemv: float32 or bfloat16 only, got ", dtype);
  const int64_t k = x_in.size(-1), rows = x_in.numel() / std::max<int64_t>(k, 1);
  const at::Tensor x = x_in.contiguous();
  std::vector<at::Tensor> outs, kept;  // kept: contiguous weights and float32 biases alive until the end
  std::vector<Segment> segs;
  for (size_t i = 0; i < ws.size(); ++i) {
    const at::Tensor& w_in = ws[i];
    TORCH_CHECK(w_in.dim() == 2, "evolm::gemv: weight must be 2-D (out, in), got ", w_in.sizes());
    TORCH_CHECK(w_in.size(1) == k, "evolm::gemv: x's last dimension (", k, ") must equal the weight's in-features (",
                w_in.size(1), ")");
    TORCH_CHECK(w_in.scalar_type() == dtype, "evolm::gemv: x is ", dtype, " but the weight is ", w_in.scalar_type());
    const at::Tensor w = w_in.contiguous();
    const int64_t n = w.size(0);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = n;
    outs.push_back(at::empty(shape, x.options()));
    const float* bias = nullptr;
    const std::optional<at::Tensor> b_in = bs.get(i);
    if (b_in.has_value() && b_in->defined()) {
      TORCH_CHECK(b_in->numel() == n, "evolm::gemv: bias has ", b_in->numel(), " values for ", n, " outputs");
      kept.push_back(b_in->to(at::kFloat).contiguous());
      bias = kept.back().data_ptr<float>();
    }
    kept.push_back(w);
    segs.push_back({w.data_ptr(), outs.back().data_ptr(), bias, n});
  }
  if (rows == 0) return outs;
  if (dtype == at::kFloat)
    run_segments<float, float>(x.data_ptr<float>(), rows, k, segs);
  else
    run_segments<uint16_t, c10::BFloat16>(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()), rows, k, segs);
  return outs;
}

at::Tensor gemv_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  c10::List<std::optional<at::Tensor>> bs;
  bs.push_back(b);
  return gemv_group_cpu(x, {w}, bs)[0];
}

template <typename T>
void attend_one_query(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* allowed,
                      int64_t allowed_batch_stride, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), K = k.size(1), S = k.size(2), Dv = v.size(3);
  const int64_t G = H / K;
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * K, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scores(S);
    for (int64_t bk = lo; bk < hi; ++bk) {
      const int64_t b = bk / K;
      attend_group<T>(qp + bk * G * D, kp + bk * S * D, vp + bk * S * Dv,
                      allowed ? allowed + b * allowed_batch_stride : nullptr, G, S, D, Dv, scale, scores.data(),
                      op + bk * G * Dv);
    }
  });
}

at::Tensor decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const std::optional<at::Tensor>& allowed_in, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "evolm::decode_attention: q, k, v must be (B, H, 1, D), (B, K, S, D), (B, K, S, Dv)");
  TORCH_CHECK(q_in.size(2) == 1, "evolm::decode_attention: one query per row, got ", q_in.size(2));
  TORCH_CHECK(k_in.size(0) == q_in.size(0) && v_in.size(0) == q_in.size(0) && k_in.size(1) == v_in.size(1) &&
                  k_in.size(2) == v_in.size(2) && k_in.size(3) == q_in.size(3),
              "evolm::decode_attention: shapes do not match: q ", q_in.sizes(), ", k ", k_in.sizes(), ", v ",
              v_in.sizes());
  TORCH_CHECK(k_in.size(1) > 0 && q_in.size(1) % k_in.size(1) == 0, "evolm::decode_attention: ", k_in.size(1),
              " key/value heads do not divide ", q_in.size(1), " query heads");
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(k_in.scalar_type() == dtype && v_in.scalar_type() == dtype && (dtype == at::kFloat || dtype == at::kBFloat16),
              "evolm::decode_attention: q, k, v must all be float32 or all bfloat16");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor allowed;
  const bool* ap = nullptr;
  int64_t a_stride = 0;
  const int64_t S = k.size(2);
  if (allowed_in.has_value() && allowed_in->defined()) {
    TORCH_CHECK(allowed_in->scalar_type() == at::kBool && allowed_in->size(-1) == S && allowed_in->numel() % S == 0,
                "evolm::decode_attention: allowed must be a bool mask (B or 1, 1, 1, S), got ", allowed_in->sizes());
    const int64_t rows = allowed_in->numel() / S;
    TORCH_CHECK(rows == 1 || rows == q.size(0), "evolm::decode_attention: allowed has ", rows, " rows for batch ",
                q.size(0));
    allowed = allowed_in->contiguous();
    ap = allowed.data_ptr<bool>();
    a_stride = rows == 1 ? 0 : S;
  }
  at::Tensor out = at::empty({q.size(0), q.size(1), 1, v.size(3)}, q.options());
  if (out.numel() == 0) return out;
  if (dtype == at::kFloat)
    attend_one_query<float>(q, k, v, ap, a_stride, static_cast<float>(scale), out);
  else
    attend_one_query<c10::BFloat16>(q, k, v, ap, a_stride, static_cast<float>(scale), out);
  return out;
}

at::Tensor decode_attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& allowed, double scale) {
  return at::empty({q.size(0), q.size(1), 1, v.size(3)}, q.options());
}

at::Tensor gemv_meta(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.size(0);
  return at::empty(shape, x.options());
}

std::vector<at::Tensor> gemv_group_meta(const at::Tensor& x, at::TensorList ws,
                                        const c10::List<std::optional<at::Tensor>>& bs) {
  std::vector<at::Tensor> outs;
  for (const at::Tensor& w : ws) outs.push_back(gemv_meta(x, w, std::nullopt));
  return outs;
}

}  // namespace

TORCH_LIBRARY(evolm_kernels, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor? b) -> Tensor");
  m.def("gemv_group(Tensor x, Tensor[] ws, Tensor?[] bs) -> Tensor[]");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? allowed, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(evolm_kernels, CPU, m) {
  m.impl("gemv", gemv_cpu);
  m.impl("gemv_group", gemv_group_cpu);
  m.impl("decode_attention", decode_attention_cpu);
}
TORCH_LIBRARY_IMPL(evolm_kernels, Meta, m) {
  m.impl("gemv", gemv_meta);
  m.impl("gemv_group", gemv_group_meta);
  m.impl("decode_attention", decode_attention_meta);
}
