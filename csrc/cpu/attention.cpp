// C++ CPU implementation of attention (math and layout in flg/attention.h).
// Blocked online softmax, fp32 throughout: OpenMP over (b, h, block of kTaskRows query
// rows); each task converts its Q rows to fp32 once, then streams K/V in tiles of kBlockN
// keys (converted to fp32 once per task, K transposed so the score loop runs over
// contiguous keys and vectorises without a reduction); per sub-block of kBlockM rows it
// computes the kBlockM x kBlockN scores, rescales its running max / sum / output rows and
// adds P V. Nothing of size Sq x Skv is stored.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "flg/attention.h"

namespace flg {
namespace cpu {
namespace {

constexpr int64_t kBlockM = 64;              // query rows per score tile
constexpr int64_t kTaskRows = 4 * kBlockM;   // query rows per task: they share each converted K/V tile
constexpr int64_t kBlockN = 64;              // keys per K/V tile

// The two hot loops are compiled twice: for the build's baseline ISA and, on x86-64 with
// GCC/Clang, with AVX2 + FMA, chosen at run time by CPU features.
#if defined(__GNUC__)
#define FLG_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FLG_ALWAYS_INLINE inline
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#define FLG_X86_AVX2_DISPATCH 1
#endif

// s[i * kBlockN + j] = scale * sum_c q[i * D + c] * kt[c * kBlockN + j] for i < nq, j < kBlockN.
// The kBlockN accumulators of a row stay in registers; the loop over j is contiguous.
FLG_ALWAYS_INLINE void tile_scores_body(float* s, const float* q, const float* kt, int64_t nq, int64_t D, float scale) {
  for (int64_t i = 0; i < nq; ++i) {
    const float* qi = q + i * D;
    float acc[kBlockN] = {};
    for (int64_t c = 0; c < D; ++c) {
      const float qc = qi[c];
      const float* kc = kt + c * kBlockN;
      for (int64_t j = 0; j < kBlockN; ++j) acc[j] += qc * kc[j];
    }
    float* si = s + i * kBlockN;
    for (int64_t j = 0; j < kBlockN; ++j) si[j] = acc[j] * scale;
  }
}

// acc[i * D + c] = alpha[i] * acc[i * D + c] + sum_{j < nk} p[i * kBlockN + j] * v[j * D + c],
// in column chunks of kChunk accumulators held in registers across the keys (GCC/Clang
// vector types: 8 floats = one AVX register, two SSE registers in the baseline build).
constexpr int64_t kChunk = 32;
#if defined(__GNUC__)
typedef float f32x8 __attribute__((vector_size(32), aligned(4)));  // unaligned loads / stores
FLG_ALWAYS_INLINE void pv_chunk(float* ai, float a, const float* pi, const float* v, int64_t nk, int64_t D) {
  f32x8 r0, r1, r2, r3;
  std::memcpy(&r0, ai, 32), std::memcpy(&r1, ai + 8, 32), std::memcpy(&r2, ai + 16, 32), std::memcpy(&r3, ai + 24, 32);
  r0 *= a, r1 *= a, r2 *= a, r3 *= a;
  for (int64_t j = 0; j < nk; ++j) {
    const float pj = pi[j];
    const f32x8* vj = reinterpret_cast<const f32x8*>(v + j * D);
    r0 += pj * vj[0], r1 += pj * vj[1], r2 += pj * vj[2], r3 += pj * vj[3];
  }
  std::memcpy(ai, &r0, 32), std::memcpy(ai + 8, &r1, 32), std::memcpy(ai + 16, &r2, 32), std::memcpy(ai + 24, &r3, 32);
}
#else
FLG_ALWAYS_INLINE void pv_chunk(float* ai, float a, const float* pi, const float* v, int64_t nk, int64_t D) {
  float r[kChunk];
  for (int64_t c = 0; c < kChunk; ++c) r[c] = ai[c] * a;
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t c = 0; c < kChunk; ++c) r[c] += pi[j] * v[j * D + c];
  for (int64_t c = 0; c < kChunk; ++c) ai[c] = r[c];
}
#endif

FLG_ALWAYS_INLINE void tile_pv_body(float* acc, const float* alpha, const float* p, const float* v, int64_t nq,
                                    int64_t nk, int64_t D) {
  for (int64_t i = 0; i < nq; ++i) {
    float* ai = acc + i * D;
    const float a = alpha[i];
    const float* pi = p + i * kBlockN;
    int64_t c0 = 0;
    for (; c0 + kChunk <= D; c0 += kChunk) pv_chunk(ai + c0, a, pi, v + c0, nk, D);
    if (c0 < D) {  // the last D % kChunk columns
      for (int64_t c = c0; c < D; ++c) ai[c] *= a;
      for (int64_t j = 0; j < nk; ++j) {
        const float pj = pi[j];
        const float* vj = v + j * D;
        for (int64_t c = c0; c < D; ++c) ai[c] += pj * vj[c];
      }
    }
  }
}

void tile_scores_base(float* s, const float* q, const float* kt, int64_t nq, int64_t D, float scale) {
  tile_scores_body(s, q, kt, nq, D, scale);
}
void tile_pv_base(float* acc, const float* alpha, const float* p, const float* v, int64_t nq, int64_t nk, int64_t D) {
  tile_pv_body(acc, alpha, p, v, nq, nk, D);
}

#ifdef FLG_X86_AVX2_DISPATCH
__attribute__((target("avx2,fma"))) void tile_scores_avx2(float* s, const float* q, const float* kt, int64_t nq,
                                                           int64_t D, float scale) {
  tile_scores_body(s, q, kt, nq, D, scale);
}
__attribute__((target("avx2,fma"))) void tile_pv_avx2(float* acc, const float* alpha, const float* p, const float* v,
                                                       int64_t nq, int64_t nk, int64_t D) {
  tile_pv_body(acc, alpha, p, v, nq, nk, D);
}
#endif

struct TileKernels {
  void (*scores)(float*, const float*, const float*, int64_t, int64_t, float);
  void (*pv)(float*, const float*, const float*, const float*, int64_t, int64_t, int64_t);
};

const TileKernels& tile_kernels() {
  static const TileKernels k = [] {
#ifdef FLG_X86_AVX2_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return TileKernels{tile_scores_avx2, tile_pv_avx2};
#endif
    return TileKernels{tile_scores_base, tile_pv_base};
  }();
  return k;
}

// dst[r * D + c] = src row r, column c, in fp32.
template <typename T>
void load_rows(float* dst, const T* src, int64_t stride_s, int64_t row0, int64_t nrows, int64_t D) {
  for (int64_t r = 0; r < nrows; ++r) {
    const T* s = src + (row0 + r) * stride_s;
    float* d = dst + r * D;
    for (int64_t c = 0; c < D; ++c) d[c] = Scalar<T>::load(s + c);
  }
}

// dst[c * kBlockN + r] = src row r, column c: the K tile transposed.
template <typename T>
void load_rows_transposed(float* dst, const T* src, int64_t stride_s, int64_t row0, int64_t nrows, int64_t D) {
  for (int64_t r = 0; r < nrows; ++r) {
    const T* s = src + (row0 + r) * stride_s;
    for (int64_t c = 0; c < D; ++c) dst[c * kBlockN + r] = Scalar<T>::load(s + c);
  }
}

template <typename T>
void run(const AttentionParams& p) {
  const int64_t D = p.head_dim(), Sq = p.seq_q(), Skv = p.seq_kv(), H = p.heads();
  const int64_t nqb = (Sq + kTaskRows - 1) / kTaskRows;
  const int64_t tasks = p.batch() * H * nqb;
  const float scale = p.scale;
  const TileKernels& kern = tile_kernels();
#pragma omp parallel
  {
    // kt: the K tile transposed (D x kBlockN); in a partial last tile the columns past its
    // last key hold earlier keys, whose scores are computed but never read
    std::vector<float> qf(kTaskRows * D), kt(kBlockN * D, 0.0f), vf(kBlockN * D), acc(kTaskRows * D);
    std::vector<float> sc(kBlockM * kBlockN), mrow(kTaskRows), lrow(kTaskRows), alpha(kTaskRows);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t qb = task % nqb, h = (task / nqb) % H, b = task / (nqb * H);
      const int64_t m0 = qb * kTaskRows, nq = std::min(kTaskRows, Sq - m0);
      const T* q = p.q.ptr<const T>() + b * p.q.stride(0) + h * p.q.stride(2);
      const T* k = p.k.ptr<const T>() + b * p.k.stride(0) + h * p.k.stride(2);
      const T* v = p.v.ptr<const T>() + b * p.v.stride(0) + h * p.v.stride(2);
      load_rows(qf.data(), q, p.q.stride(1), m0, nq, D);
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(mrow.begin(), mrow.end(), -std::numeric_limits<float>::infinity());
      std::fill(lrow.begin(), lrow.end(), 0.0f);
      for (int64_t n0 = 0; n0 < Skv; n0 += kBlockN) {
        const int64_t nk = std::min(kBlockN, Skv - n0);
        load_rows_transposed(kt.data(), k, p.k.stride(1), n0, nk, D);
        load_rows(vf.data(), v, p.v.stride(1), n0, nk, D);
        for (int64_t r0 = 0; r0 < nq; r0 += kBlockM) {
          const int64_t nr = std::min(kBlockM, nq - r0);
          kern.scores(sc.data(), qf.data() + r0 * D, kt.data(), nr, D, scale);
          for (int64_t i = 0; i < nr; ++i) {  // online softmax: running max, rescale, probabilities
            float* si = sc.data() + i * kBlockN;
            const int64_t row = r0 + i;
            float mx = -std::numeric_limits<float>::infinity();
            for (int64_t j = 0; j < nk; ++j) mx = std::max(mx, si[j]);
            const float m_new = std::max(mrow[row], mx);  // finite: nk >= 1
            alpha[row] = std::exp(mrow[row] - m_new);     // 0 on the first tile
            float lsum = 0.0f;
            for (int64_t j = 0; j < nk; ++j) {
              si[j] = std::exp(si[j] - m_new);
              lsum += si[j];
            }
            lrow[row] = lrow[row] * alpha[row] + lsum;
            mrow[row] = m_new;
          }
          kern.pv(acc.data() + r0 * D, alpha.data() + r0, sc.data(), vf.data(), nr, nk, D);
        }
      }
      for (int64_t i = 0; i < nq; ++i) {
        T* o = p.out.ptr<T>() + ((b * Sq + m0 + i) * H + h) * D;
        const float inv = 1.0f / lrow[i];
        const float* ai = acc.data() + i * D;
        for (int64_t c = 0; c < D; ++c) Scalar<T>::store(o + c, ai[c] * inv);
      }
    }
  }
}

}  // namespace

void attention(const AttentionParams& p) {
  require(check(p), "attention", "cpu");
  switch (p.q.dtype) {
    case DType::Float32: run<float>(p); break;
    case DType::Float16: run<Half16>(p); break;
    case DType::BFloat16: run<BFloat16>(p); break;
  }
}

}  // namespace cpu
}  // namespace flg
