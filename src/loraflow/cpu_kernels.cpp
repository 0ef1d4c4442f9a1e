// Fused CPU kernels for training-mode dropout (loraflow/cpu_kernels.py builds and loads them).
//
// Why hand-written: on a CPU, torch's dropout draws its mask serially (mt19937, one draw per
// element) and every step around it (mask, cast, scale, multiply; the attention's bias, softmax,
// mask and their backward) is one more pass over memory. Here the mask is a pure function of
// (seed, element index): SplitMix64's output function over a counter, the generator of Java's
// SplittableRandom (Steele, Lea & Flood 2014). It is computed inside the pass that uses it, in
// the forward and again in the backward, so no mask is drawn serially, stored or read back.
// loraflow/dropout.py computes the same function with torch operations (the reference the tests
// compare these kernels with, bit for bit, and the fallback where no compiler is found).
//
// Element i is kept when its 32-bit word is below `kept` = round((1-p) * 2^32); survivors are
// scaled by 2^32 / kept. The words of elements 2j and 2j+1 are the low and high halves of
// mix(seed, j): one 64-bit mix serves two elements (the mix's 64-bit multiplies were most of the
// dropout kernel's time here: it took 3.5x a plain multiply pass). Arithmetic is fp32; bf16 is
// rounded to nearest even once.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <bit>
#include <cstring>
#include <vector>

namespace {

inline uint64_t mix(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

static_assert(std::endian::native == std::endian::little, "mask words are the halves of a 64-bit mix in memory");
typedef uint32_t __attribute__((__may_alias__)) word_t;

// The mask words of elements [first, first + n) in `mixes` (room for n / 2 + 1): returns word 0's address.
inline const word_t* mask_words(uint64_t seed, uint64_t first, int64_t n, uint64_t* mixes) {
  const uint64_t j0 = first >> 1;
  const int64_t m = static_cast<int64_t>(((first + n + 1) >> 1) - j0);
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) mixes[j] = mix(seed, j0 + j);
  return reinterpret_cast<const word_t*>(mixes) + (first & 1);
}

// kept in [0, 2^32] as a test on 32-bit words: word <= last, and nothing kept when kept is 0.
struct Keep {
  uint32_t last;
  float live;
  explicit Keep(uint64_t kept) : last(kept ? static_cast<uint32_t>(kept - 1) : 0), live(kept ? 1.0f : 0.0f) {}
  float operator()(uint32_t w) const { return w <= last ? live : 0.0f; }
};

// Loads and stores through fp32 (bf16 as its 16 high bits; round to nearest even on store), plain
// integer arithmetic the compiler vectorises.
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  p[i] = static_cast<uint16_t>(u >> 16);
}

// exp for x <= 0 (scores minus their row's maximum), Cephes' expf polynomial: written out so that
// the loops vectorise without -ffast-math (which would also change the process's denormal mode);
// -fno-trapping-math lets the compiler turn its selects into vector blends (measured 13x here).
inline float exp_nonpositive(float x) {
  const float xc = x > -87.0f ? x : -87.0f;
  const float y = xc * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(y - 0.5f);  // round to nearest for y <= 0
  const float nf = static_cast<float>(n);
  const float r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = __builtin_bit_cast(float, (n + 127) << 23);
  return p * scale * static_cast<float>(x > -87.0f);
}

// A row's scratch, 64-byte aligned (whole vector registers, no split loads).
template <typename E = float>
struct Scratch {
  E* data;
  explicit Scratch(int64_t n)
      : data(static_cast<E*>(std::aligned_alloc(64, ((n * sizeof(E) + 63) / 64) * 64))) {}
  ~Scratch() { std::free(data); }
  E& operator[](int64_t i) { return data[i]; }
};

template <typename T>
T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name, " must be float32 or bfloat16");
}

// f(i) for every element index, split over torch's threads, each chunk one vectorised loop.
template <typename F>
inline void elementwise(int64_t n, const F& f) {
  at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) f(i);
  });
}

constexpr int64_t kMaskChunk = 4096;  // elements whose mask words are made at a time (16 KB, in L1)

template <typename T>
void dropout_impl(const at::Tensor& x, at::Tensor& y, uint64_t seed, uint64_t kept, float scale) {
  const T* xp = ptr<T>(x);
  T* yp = ptr<T>(y);
  const Keep keep(kept);
  at::parallel_for(0, x.numel(), 16384, [&](int64_t b, int64_t e) {
    Scratch<uint64_t> mixes(kMaskChunk / 2 + 1);
    for (int64_t c = b; c < e; c += kMaskChunk) {
      const int64_t n = std::min(kMaskChunk, e - c);
      const word_t* w = mask_words(seed, c, n, mixes.data);
      const T* xc = xp + c;
      T* yc = yp + c;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(yc, i, load(xc, i) * (scale * keep(w[i])));
    }
  });
}

// Rows of `scores` [rows = B * H * Q, K]: element (row, k) has the global index
// ((bh * q_total) + q_off + q) * k_total + k_off + k, so a block of queries and keys draws the mask
// the whole [q_total, k_total] square would have drawn there.
struct Layout {
  int64_t heads, q, k, q_off, k_off, q_total, k_total, bias_batch;
  uint64_t index(int64_t row, int64_t k_) const {
    int64_t bh = row / q, qi = row % q;
    return static_cast<uint64_t>((bh * q_total + q_off + qi) * k_total + k_off + k_);
  }
  int64_t bias_row(int64_t row) const {  // bias [bias_batch, Q, K]: one per batch row, or shared
    int64_t b = row / (heads * q), qi = row % q;
    return (bias_batch == 1 ? 0 : b) * q + qi;
  }
};

template <typename T>
void softmax_dropout_fwd_impl(const at::Tensor& s, const at::Tensor* bias, at::Tensor& probs, at::Tensor& dropped,
                              uint64_t seed, uint64_t kept, const Layout& L) {
  const T* sp = ptr<T>(s);
  const T* bp = bias ? ptr<T>(*bias) : nullptr;
  T* pp = ptr<T>(probs);
  T* dp = ptr<T>(dropped);
  const int64_t K = L.k, rows = s.numel() / K;
  const Keep keep(kept);
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    Scratch v(K);
    Scratch<uint64_t> mixes(K / 2 + 1);
    for (int64_t r = b; r < e; ++r) {
      const T* srow = sp + r * K;
      const T* brow = bp ? bp + L.bias_row(r) * K : nullptr;
      float top = -3.0e38f;
      if (brow) {
#pragma omp simd reduction(max : top)
        for (int64_t k = 0; k < K; ++k) {
          v[k] = load(srow, k) + load(brow, k);
          top = v[k] > top ? v[k] : top;
        }
      } else {
#pragma omp simd reduction(max : top)
        for (int64_t k = 0; k < K; ++k) {
          v[k] = load(srow, k);
          top = v[k] > top ? v[k] : top;
        }
      }
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < K; ++k) {
        v[k] = exp_nonpositive(v[k] - top);
        sum += v[k];
      }
      const float inv = 1.0f / sum;
      const word_t* w = mask_words(seed, L.index(r, 0), K, mixes.data);
      T* prow = pp + r * K;
      T* drow = dp + r * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        store(prow, k, v[k] * inv);
        store(drow, k, load(prow, k) * keep(w[k]));
      }
    }
  });
}

template <typename T>
void softmax_dropout_bwd_impl(const at::Tensor& g, const at::Tensor& probs, at::Tensor& out, uint64_t seed,
                              uint64_t kept, const Layout& L) {
  const T* gp = ptr<T>(g);
  const T* pp = ptr<T>(probs);
  T* op = ptr<T>(out);
  const int64_t K = L.k, rows = g.numel() / K;
  const Keep keep(kept);
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    Scratch gm(K);
    Scratch<uint64_t> mixes(K / 2 + 1);
    for (int64_t r = b; r < e; ++r) {
      const T* grow = gp + r * K;
      const T* prow = pp + r * K;
      const word_t* w = mask_words(seed, L.index(r, 0), K, mixes.data);
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < K; ++k) {
        gm[k] = load(grow, k) * keep(w[k]);
        dot += gm[k] * load(prow, k);
      }
      T* orow = op + r * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) store(orow, k, load(prow, k) * (gm[k] - dot));
    }
  });
}

// GELU, tanh form: 0.5 x (1 + tanh(z)) = x * sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3), with
// the sigmoid from exp(-2|z|) (never overflows); one pass forward, one backward (torch's bf16 kernel
// takes ~0.7 ns an element here). `s` is sigmoid(2z); dz/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
inline float gelu_sigmoid(float x, float& dz) {
  const float c = 0.7978845608028654f, a = 0.044715f;
  const float z = c * (x + a * x * x * x);
  dz = c * (1.0f + 3.0f * a * x * x);
  const float e = exp_nonpositive(-2.0f * (z >= 0.0f ? z : -z));
  return (z >= 0.0f ? 1.0f : e) / (1.0f + e);
}

template <typename T>
void gelu_impl(const at::Tensor& x, at::Tensor& y) {
  const T* xp = ptr<T>(x);
  T* yp = ptr<T>(y);
  elementwise(x.numel(), [=](int64_t i) {
    const float v = load(xp, i);
    float dz;
    store(yp, i, v * gelu_sigmoid(v, dz));
  });
}

template <typename T>
void gelu_backward_impl(const at::Tensor& g, const at::Tensor& x, at::Tensor& out) {
  const T* gp = ptr<T>(g);
  const T* xp = ptr<T>(x);
  T* op = ptr<T>(out);
  elementwise(x.numel(), [=](int64_t i) {
    const float v = load(xp, i);
    float dz;
    const float sg = gelu_sigmoid(v, dz);
    store(op, i, load(gp, i) * (sg + v * 2.0f * sg * (1.0f - sg) * dz));
  });
}

// Per row of logits [n, V]: the loss -log softmax(row)[target] (fp32: max, sum of exponentials,
// log), and the row overwritten with its gradient softmax(row) - onehot(target), rounded once to the
// row's dtype. One read and one write of the logits instead of an fp32 copy and six passes over it.
template <typename T>
void cross_entropy_impl(at::Tensor& logits, const int64_t* targets, float* losses) {
  const int64_t n = logits.size(0), V = logits.size(1);
  T* lp = ptr<T>(logits);
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    Scratch v(V);
    for (int64_t r = b; r < e; ++r) {
      T* row = lp + r * V;
      const int64_t t = targets[r];
      float top = -3.0e38f;
#pragma omp simd reduction(max : top)
      for (int64_t k = 0; k < V; ++k) {
        v[k] = load(row, k);
        top = v[k] > top ? v[k] : top;
      }
      const float target = v[t];
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < V; ++k) {
        v[k] = exp_nonpositive(v[k] - top);
        sum += v[k];
      }
      losses[r] = top + std::log(sum) - target;
      const float inv = 1.0f / sum;
#pragma omp simd
      for (int64_t k = 0; k < V; ++k) store(row, k, v[k] * inv);
      store(row, t, v[t] * inv - 1.0f);
    }
  });
}

Layout layout(const at::Tensor& s, const c10::optional<at::Tensor>& bias, int64_t q_off, int64_t k_off,
              int64_t q_total, int64_t k_total) {
  TORCH_CHECK(s.dim() == 4, "scores must be [batch, heads, queries, keys]");
  Layout L{s.size(1), s.size(2), s.size(3), q_off, k_off, q_total, k_total, 1};
  if (bias) {
    check(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == s.scalar_type(), "bias must have the scores' dtype");
    TORCH_CHECK(bias->dim() == 3 && bias->size(1) == L.q && bias->size(2) == L.k &&
                (bias->size(0) == 1 || bias->size(0) == s.size(0)), "bias must be [1 or batch, queries, keys]");
    L.bias_batch = bias->size(0);
  }
  return L;
}

}  // namespace

at::Tensor dropout(const at::Tensor& x, int64_t seed, int64_t kept, double scale) {
  check(x, "x");
  at::Tensor y = at::empty_like(x);
  if (x.scalar_type() == at::kFloat)
    dropout_impl<float>(x, y, static_cast<uint64_t>(seed), static_cast<uint64_t>(kept), static_cast<float>(scale));
  else
    dropout_impl<uint16_t>(x, y, static_cast<uint64_t>(seed), static_cast<uint64_t>(kept), static_cast<float>(scale));
  return y;
}

std::vector<at::Tensor> softmax_dropout_forward(const at::Tensor& scores, const c10::optional<at::Tensor>& bias,
                                                int64_t seed, int64_t kept, int64_t q_off, int64_t k_off,
                                                int64_t q_total, int64_t k_total) {
  check(scores, "scores");
  Layout L = layout(scores, bias, q_off, k_off, q_total, k_total);
  at::Tensor probs = at::empty_like(scores), dropped = at::empty_like(scores);
  const at::Tensor* b = bias ? &*bias : nullptr;
  if (scores.scalar_type() == at::kFloat)
    softmax_dropout_fwd_impl<float>(scores, b, probs, dropped, seed, kept, L);
  else
    softmax_dropout_fwd_impl<uint16_t>(scores, b, probs, dropped, seed, kept, L);
  return {probs, dropped};
}

at::Tensor softmax_dropout_backward(const at::Tensor& grad, const at::Tensor& probs, int64_t seed, int64_t kept,
                                    int64_t q_off, int64_t k_off, int64_t q_total, int64_t k_total) {
  check(grad, "grad");
  check(probs, "probs");
  TORCH_CHECK(grad.sizes() == probs.sizes() && grad.scalar_type() == probs.scalar_type(),
              "grad must match probs");
  Layout L = layout(probs, c10::nullopt, q_off, k_off, q_total, k_total);
  at::Tensor out = at::empty_like(probs);
  if (probs.scalar_type() == at::kFloat)
    softmax_dropout_bwd_impl<float>(grad, probs, out, seed, kept, L);
  else
    softmax_dropout_bwd_impl<uint16_t>(grad, probs, out, seed, kept, L);
  return out;
}

at::Tensor cross_entropy_(at::Tensor& logits, const at::Tensor& targets) {
  check(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "logits must be [positions, vocabulary]");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.dim() == 1 &&
              targets.size(0) == logits.size(0), "targets must be a contiguous int64 [positions]");
  const int64_t V = logits.size(1);
  const int64_t* tp = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < targets.size(0); ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < V, "target ", tp[i], " outside the vocabulary of ", V);
  at::Tensor losses = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  if (logits.scalar_type() == at::kFloat)
    cross_entropy_impl<float>(logits, tp, losses.data_ptr<float>());
  else
    cross_entropy_impl<uint16_t>(logits, tp, losses.data_ptr<float>());
  return losses;
}

at::Tensor gelu(const at::Tensor& x) {
  check(x, "x");
  at::Tensor y = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) gelu_impl<float>(x, y);
  else gelu_impl<uint16_t>(x, y);
  return y;
}

at::Tensor gelu_backward(const at::Tensor& grad, const at::Tensor& x) {
  check(grad, "grad");
  check(x, "x");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), "grad must match x");
  at::Tensor out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) gelu_backward_impl<float>(grad, x, out);
  else gelu_backward_impl<uint16_t>(grad, x, out);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gelu", &gelu, "GELU, tanh approximation");
  m.def("gelu_backward", &gelu_backward, "its gradient");
  m.def("cross_entropy_", &cross_entropy_, "per-row loss; the logits overwritten with softmax - onehot");
  m.def("dropout", &dropout, "x * keep(seed, i) * scale");
  m.def("softmax_dropout_forward", &softmax_dropout_forward, "softmax(scores + bias) and its dropped copy");
  m.def("softmax_dropout_backward", &softmax_dropout_backward, "gradient of the scores");
}
