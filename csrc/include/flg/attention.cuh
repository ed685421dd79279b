// CUDA kernels of attention (math and layout in flg/attention.h). Two kernels, both
// flash-attention style (one pass over K/V per query tile, online softmax in fp32,
// nothing of size Sq x Skv ever stored):
//
// * attention_tc_kernel<T, kDMax> for float16 / bfloat16: tensor cores through
//   `mma.sync.m16n8k16` (fp32 accumulate). A block of 4 warps owns 64 query rows of one
//   (b, h), 16 per warp (one mma M tile). Q (64 x D), and one K and one V tile
//   (kBlockN x D) at a time, live in shared memory with the head dim zero-padded to a
//   multiple of 16 (the mma K dim). S = Q K^T and O += P V are register fragments; the
//   S accumulator fragment is re-packed in registers as the A operand of P V (the
//   m16n8k16 C layout of two adjacent 8-column tiles is the A layout of one 16-column
//   tile). Fragment layouts (PTX ISA, "mma.m16n8k16", f16/bf16): with g = lane / 4 and
//   t = lane % 4,
//     A (16x16, row major), 4 x b32:  {A[g][2t..2t+1]}, {A[g+8][2t..2t+1]},
//                                     {A[g][2t+8..2t+9]}, {A[g+8][2t+8..2t+9]}
//     B (16x8, "col"), 2 x b32:       {B[2t..2t+1][g]}, {B[2t+8..2t+9][g]}
//     C (16x8, fp32), 4 x f32:        C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]
//   (lower element of each b32 pair in the low 16 bits).
// * attention_simt_kernel<T, kDMax> for float32: CUDA cores, fp32 throughout. A block of
//   4 warps owns 32 query rows, 8 per warp; lane j scores key j of a 32-key tile, then the
//   warp accumulates P V with lane l owning output columns l, l + 32, ...
//
// kDMax in {64, 128, 256} is the head-dim bucket: it sizes the register arrays and
// shared memory; loops run over the actual head dim (a runtime bound inside fully
// unrolled loops, so the arrays stay in registers). D must be a multiple of 8 (16-byte
// rows for the vector loads).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "flg/attention.h"
#include "flg/cuda_common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "flgengine attention uses mma.sync.m16n8k16 with bf16: build for sm_80 or newer (CMAKE_CUDA_ARCHITECTURES)"
#endif

namespace flg {
namespace cuda {

// ---- tensor-core kernel (float16 / bfloat16) --------------------------------------

template <int kDMax>
struct AttnTCConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;              // query rows per block (16 per warp)
  static constexpr int kBlockN = kDMax <= 128 ? 64 : 32;   // keys per K/V tile (bounds the S registers)
  static constexpr int kLd = kDMax + 8;                    // smem row stride in elements (+16 B: no bank conflicts)
  static constexpr size_t kSmemBytes = static_cast<size_t>(kBlockM + 2 * kBlockN) * kLd * 2;
};

// c += a * b for one warp (m16n8k16, fp32 accumulate). Under FLG_HOST_EMULATION
// (csrc/emulate/: the kernels run on the CPU, one std::thread per CUDA thread) the
// specialisations come from the emulator instead of inline PTX.
template <typename T> __device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]);

#ifndef FLG_HOST_EMULATION
template <>
__device__ __forceinline__ void mma_16816<__half>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif  // FLG_HOST_EMULATION

// Two floats rounded to T and packed as one b32 operand, `lo` in the low 16 bits.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Two adjacent 16-bit elements (p 4-byte aligned) as one b32 operand.
template <typename T> __device__ __forceinline__ uint32_t ld_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Copies rows [row0, row0 + kRows) of one (b, h) slice (row r at src + r * stride_s) into
// shared memory, row r at dst + r * kLd: columns [0, d) from global memory, [d, dc) and
// every row at or past `rows` zero. d and dc are multiples of 8 (16-byte chunks); `vec`
// says 16-byte loads are aligned (base and strides), else the chunk goes element by element.
template <typename T, int kRows, int kLd, int kThreads>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride_s, int64_t row0, int64_t rows, int d,
                                          int dc, bool vec) {
  static_assert(sizeof(T) == 2, "16-bit tiles");
  const int chunks = dc / 8;
  for (int i = threadIdx.x; i < kRows * chunks; i += kThreads) {
    const int r = i / chunks, c = (i - r * chunks) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    const int64_t gr = row0 + r;
    if (gr < rows && c < d) {
      const T* gp = src + gr * stride_s + c;
      if (vec) {
        val = *reinterpret_cast<const uint4*>(gp);
      } else {
        T* e = reinterpret_cast<T*>(&val);
#pragma unroll
        for (int j = 0; j < 8; ++j) e[j] = gp[j];
      }
    }
    *reinterpret_cast<uint4*>(dst + r * kLd + c) = val;
  }
}

template <typename T, int kDMax>
__global__ void __launch_bounds__(AttnTCConfig<kDMax>::kThreads)
    attention_tc_kernel(AttentionParams p, bool vec_q, bool vec_k, bool vec_v) {
  using C = AttnTCConfig<kDMax>;
  constexpr int kLd = C::kLd, kBlockM = C::kBlockM, kBlockN = C::kBlockN, kThreads = C::kThreads;
  constexpr int kNT = kBlockN / 8;  // 8-key column tiles of S
  constexpr int kDT = kDMax / 8;    // 8-wide column tiles of O
  constexpr int kKC = kDMax / 16;   // 16-wide head-dim chunks (mma K) of Q K^T
  static_assert(kBlockN % 16 == 0 && kDMax % 16 == 0, "tile shapes");

  extern __shared__ __align__(16) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);  // kBlockM x kLd
  T* ks = qs + kBlockM * kLd;          // kBlockN x kLd
  T* vs = ks + kBlockN * kLd;          // kBlockN x kLd
  const uint16_t* vs16 = reinterpret_cast<const uint16_t*>(vs);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t b = blockIdx.z, h = blockIdx.y, m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int d = static_cast<int>(p.head_dim());
  const int dc = (d + 15) & ~15;  // head dim padded to the mma K dim
  const int nkc = dc / 16, ndt = d / 8;
  const T* q = p.q.ptr<const T>() + b * p.q.stride(0) + h * p.q.stride(2);
  const T* k = p.k.ptr<const T>() + b * p.k.stride(0) + h * p.k.stride(2);
  const T* v = p.v.ptr<const T>() + b * p.v.stride(0) + h * p.v.stride(2);

  load_tile<T, kBlockM, kLd, kThreads>(qs, q, p.q.stride(1), m0, p.seq_q(), d, dc, vec_q);

  float o[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  // Running max (log2 units) and this lane's partial row sums, for rows g ([0]) and g + 8 ([1]).
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  const float sl2 = p.scale * 1.4426950408889634f;  // exp(s * scale) = exp2(s * sl2)
  const T* qw = qs + warp * 16 * kLd;                 // this warp's 16 query rows

  for (int64_t n0 = 0; n0 < p.seq_kv(); n0 += kBlockN) {
    __syncthreads();  // every warp is done with the previous K/V tile (and the Q tile is written)
    load_tile<T, kBlockN, kLd, kThreads>(ks, k, p.k.stride(1), n0, p.seq_kv(), d, dc, vec_k);
    load_tile<T, kBlockN, kLd, kThreads>(vs, v, p.v.stride(1), n0, p.seq_kv(), d, dc, vec_v);
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x kBlockN keys.
    float s[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
    for (int kc = 0; kc < kKC; ++kc) {
      if (kc < nkc) {
        const T* qa = qw + g * kLd + kc * 16 + 2 * t;
        const uint32_t a[4] = {ld_pair(qa), ld_pair(qa + 8 * kLd), ld_pair(qa + 8), ld_pair(qa + 8 * kLd + 8)};
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          // B[kk][n] = K[key nt*8 + n][dim kc*16 + kk]: lane holds key g, dims 2t, 2t+1 (+8)
          const T* kb = ks + (nt * 8 + g) * kLd + kc * 16 + 2 * t;
          const uint32_t bf[2] = {ld_pair(kb), ld_pair(kb + 8)};
          mma_16816<T>(s[nt], a, bf);
        }
      }
    }

    // Online softmax. Element e of s[nt] is row g + 8 * (e >> 1), key n0 + nt*8 + 2t + (e & 1).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t key = n0 + nt * 8 + 2 * t + (e & 1);
        const float val = key < p.seq_kv() ? s[nt][e] * sl2 : -INFINITY;
        s[nt][e] = val;
        mx[e >> 1] = fmaxf(mx[e >> 1], val);
      }
    }
    float alpha[2], m_new[2], ls[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // the 4 lanes of a quad (same g) together hold all kBlockN keys of the row; key n0 is
      // always valid, so the max is finite
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      m_new[r] = fmaxf(m_run[r], mx[r]);
      alpha[r] = exp2f(m_run[r] - m_new[r]);  // 0 on the first tile (m_run = -inf)
      m_run[r] = m_new[r];
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = exp2f(s[nt][e] - m_new[e >> 1]);  // masked keys: exp2(-inf) = 0
        s[nt][e] = pe;
        ls[e >> 1] += pe;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + ls[r];
#pragma unroll
    for (int i = 0; i < kDT; ++i) {
      o[i][0] *= alpha[0];
      o[i][1] *= alpha[0];
      o[i][2] *= alpha[1];
      o[i][3] *= alpha[1];
    }

    // O += P V. The A fragment of keys [16kk, 16kk + 16) is the C fragments of S tiles 2kk, 2kk+1.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        if (dt < ndt) {
          // B[kk'][n] = V[key 16kk + kk'][dim dt*8 + n]: lane holds dim g, keys 2t, 2t+1 (+8)
          const uint16_t* vb = vs16 + (kk * 16 + 2 * t) * kLd + dt * 8 + g;
          const uint32_t bf[2] = {static_cast<uint32_t>(vb[0]) | (static_cast<uint32_t>(vb[kLd]) << 16),
                                  static_cast<uint32_t>(vb[8 * kLd]) | (static_cast<uint32_t>(vb[9 * kLd]) << 16)};
          mma_16816<T>(o[dt], a, bf);
        }
      }
    }
  }

  // Normalise by the full row sums (the quad's partial sums added) and store rows < Sq.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = 1.0f / l;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = m0 + warp * 16 + g + 8 * r;
    if (row < p.seq_q()) {
      T* orow = p.out.ptr<T>() + ((b * p.seq_q() + row) * p.heads() + h) * d;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        if (dt < ndt)
          *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t) = pack2<T>(o[dt][2 * r] * inv[r], o[dt][2 * r + 1] * inv[r]);
      }
    }
  }
}

// ---- CUDA-core kernel (float32) ----------------------------------------------------

template <int kDMax>
struct AttnSimtConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 8;                   // query rows per warp
  static constexpr int kBlockM = kRows * kWarps;    // query rows per block
  static constexpr int kBlockN = 32;                // keys per tile: one per lane
  static constexpr int kPer = kDMax / 32;           // output columns per lane
  static constexpr int kLdK = kDMax + 1;            // odd K row stride: lane j reads row j conflict-free
  static constexpr size_t kSmemFloats =
      static_cast<size_t>(kBlockM) * kDMax + static_cast<size_t>(kBlockN) * kLdK + static_cast<size_t>(kBlockN) * kDMax +
      static_cast<size_t>(kWarps) * kRows * kBlockN;
  static constexpr size_t kSmemBytes = kSmemFloats * sizeof(float);
};

template <typename T, int kDMax>
__global__ void __launch_bounds__(AttnSimtConfig<kDMax>::kThreads) attention_simt_kernel(AttentionParams p) {
  using C = AttnSimtConfig<kDMax>;
  constexpr int kRows = C::kRows, kBlockM = C::kBlockM, kBlockN = C::kBlockN, kPer = C::kPer, kLdK = C::kLdK;
  constexpr int kThreads = C::kThreads;
  static_assert(kDMax % 32 == 0, "head-dim bucket");

  extern __shared__ __align__(16) unsigned char smem[];
  float* qs = reinterpret_cast<float*>(smem);  // kBlockM x kDMax
  float* ks = qs + kBlockM * kDMax;            // kBlockN x kLdK
  float* vs = ks + kBlockN * kLdK;             // kBlockN x kDMax
  float* ps = vs + kBlockN * kDMax;            // kWarps x kRows x kBlockN probabilities

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t b = blockIdx.z, h = blockIdx.y, m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int d = static_cast<int>(p.head_dim());
  const T* q = p.q.ptr<const T>() + b * p.q.stride(0) + h * p.q.stride(2);
  const T* k = p.k.ptr<const T>() + b * p.k.stride(0) + h * p.k.stride(2);
  const T* v = p.v.ptr<const T>() + b * p.v.stride(0) + h * p.v.stride(2);

  for (int i = threadIdx.x; i < kBlockM * d; i += kThreads) {
    const int r = i / d, c = i - r * d;
    const int64_t gr = m0 + r;
    qs[r * kDMax + c] = gr < p.seq_q() ? to_f32(q[gr * p.q.stride(1) + c]) : 0.0f;
  }

  float o[kRows][kPer];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int i = 0; i < kPer; ++i) o[r][i] = 0.0f;
  float m_run[kRows], l_run[kRows];  // running max (log2 units), this lane's partial row sum
#pragma unroll
  for (int r = 0; r < kRows; ++r) m_run[r] = -INFINITY, l_run[r] = 0.0f;
  const float sl2 = p.scale * 1.4426950408889634f;
  const float* qw = qs + warp * kRows * kDMax;
  float* pw = ps + warp * kRows * kBlockN;

  for (int64_t n0 = 0; n0 < p.seq_kv(); n0 += kBlockN) {
    __syncthreads();  // previous tiles consumed, Q tile written
    for (int i = threadIdx.x; i < kBlockN * d; i += kThreads) {
      const int r = i / d, c = i - r * d;
      const int64_t gr = n0 + r;
      const bool ok = gr < p.seq_kv();
      ks[r * kLdK + c] = ok ? to_f32(k[gr * p.k.stride(1) + c]) : 0.0f;
      vs[r * kDMax + c] = ok ? to_f32(v[gr * p.v.stride(1) + c]) : 0.0f;
    }
    __syncthreads();

    // lane j: scores of key n0 + j against the warp's kRows queries
    float s[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) s[r] = 0.0f;
    const float* kr = ks + lane * kLdK;
    for (int c = 0; c < d; ++c) {
      const float kc = kr[c];
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] = fmaf(qw[r * kDMax + c], kc, s[r]);
    }
    const bool valid = n0 + lane < p.seq_kv();
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float x = valid ? s[r] * sl2 : -INFINITY;
      const float m_new = fmaxf(m_run[r], warp_max(x));  // finite: key n0 (lane 0) is valid
      const float alpha = exp2f(m_run[r] - m_new);
      const float pv = exp2f(x - m_new);
      l_run[r] = l_run[r] * alpha + pv;
      m_run[r] = m_new;
#pragma unroll
      for (int i = 0; i < kPer; ++i) o[r][i] *= alpha;
      pw[r * kBlockN + lane] = pv;
    }
    __syncwarp();
    const int nk = static_cast<int>(p.seq_kv() - n0 < kBlockN ? p.seq_kv() - n0 : kBlockN);
    for (int j = 0; j < nk; ++j) {
      const float* vrow = vs + j * kDMax;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float pj = pw[r * kBlockN + j];
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const int c = lane + 32 * i;
          if (c < d) o[r][i] = fmaf(pj, vrow[c], o[r][i]);
        }
      }
    }
    // pw is rewritten only after the next __syncthreads, which every lane reaches after this loop
  }

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float l = warp_sum(l_run[r]);
    const int64_t row = m0 + warp * kRows + r;
    if (row < p.seq_q()) {
      T* orow = p.out.ptr<T>() + ((b * p.seq_q() + row) * p.heads() + h) * d;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int c = lane + 32 * i;
        if (c < d) orow[c] = from_f32<T>(o[r][i] / l);
      }
    }
  }
}

// ---- launchers -------------------------------------------------------------------------
#ifndef FLG_HOST_EMULATION

template <typename Kernel>
inline cudaError_t allow_smem(Kernel kernel, size_t bytes, const char** stage) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  *stage = "cudaFuncSetAttribute(attention kernel, MaxDynamicSharedMemorySize)";
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// 16-byte loads of a (B, S, H, D) tensor's rows are aligned: base pointer and (b, s, h) strides.
inline bool aligned16(const Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data) % 16 == 0 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
         t.stride(2) % 8 == 0;
}

template <typename T, int kDMax>
inline cudaError_t launch_attention_tc(const AttentionParams& p, cudaStream_t stream, const char** stage) {
  using C = AttnTCConfig<kDMax>;
  cudaError_t err = allow_smem(attention_tc_kernel<T, kDMax>, C::kSmemBytes, stage);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.seq_q() + C::kBlockM - 1) / C::kBlockM), static_cast<unsigned>(p.heads()),
                  static_cast<unsigned>(p.batch()));
  *stage = "attention_tc_kernel launch";
  attention_tc_kernel<T, kDMax><<<grid, C::kThreads, C::kSmemBytes, stream>>>(
      p, aligned16(p.q), aligned16(p.k), aligned16(p.v));
  return cudaGetLastError();
}

template <typename T, int kDMax>
inline cudaError_t launch_attention_simt(const AttentionParams& p, cudaStream_t stream, const char** stage) {
  using C = AttnSimtConfig<kDMax>;
  cudaError_t err = allow_smem(attention_simt_kernel<T, kDMax>, C::kSmemBytes, stage);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.seq_q() + C::kBlockM - 1) / C::kBlockM), static_cast<unsigned>(p.heads()),
                  static_cast<unsigned>(p.batch()));
  *stage = "attention_simt_kernel launch";
  attention_simt_kernel<T, kDMax><<<grid, C::kThreads, C::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// float16 / bfloat16 take the tensor-core kernel, float32 the CUDA-core one.
template <typename T, int kDMax> struct AttnLaunch {
  static cudaError_t run(const AttentionParams& p, cudaStream_t stream, const char** stage) {
    return launch_attention_tc<T, kDMax>(p, stream, stage);
  }
};
template <int kDMax> struct AttnLaunch<float, kDMax> {
  static cudaError_t run(const AttentionParams& p, cudaStream_t stream, const char** stage) {
    return launch_attention_simt<float, kDMax>(p, stream, stage);
  }
};

// Picks the head-dim bucket; the caller checked D % 8 == 0, D <= 256, heads and batch
// within the grid's y / z limits.
template <typename T>
inline cudaError_t launch_attention(const AttentionParams& p, cudaStream_t stream, const char** stage) {
  if (p.seq_q() == 0 || p.batch() == 0) return cudaSuccess;
  if (p.head_dim() <= 64) return AttnLaunch<T, 64>::run(p, stream, stage);
  if (p.head_dim() <= 128) return AttnLaunch<T, 128>::run(p, stream, stage);
  return AttnLaunch<T, 256>::run(p, stream, stage);
}
#endif  // FLG_HOST_EMULATION

}  // namespace cuda
}  // namespace flg
