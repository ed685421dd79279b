// Runs the CUDA kernels of flg/attention.cuh, flg/gated_residual_adaln.cuh and
// flg/qk_norm_rope.cuh on the CPU and checks them against float64 references, for machines
// without a GPU. Build and run (tests/test_native.py does this when a C++20 compiler is
// present):
//
//   g++ -std=c++20 -O1 -fno-strict-aliasing -pthread -DFLG_HOST_EMULATION -Icsrc/emulate/shim
//       -Icsrc/include csrc/emulate/kernels_emulate.cpp -o kernels_emulate
//   ./kernels_emulate            # one line per case, exit status 1 on a failure
//
// The kernels' own source runs unchanged except for `mma.sync.m16n8k16`, emulated here from
// the PTX ISA's fragment tables (written independently of the kernel), and the <<<>>>
// launchers, replaced by `launch` below (the launch geometry is repeated here: keep it in
// step). What this does not check: speed, memory-model subtleties beyond barriers, the
// machine code the real compiler emits, the launchers' CUDA calls.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "flg/attention.cuh"
#include "flg/gated_residual_adaln.cuh"
#include "flg/qk_norm_rope.cuh"

namespace flg {
namespace cuda {

// Dynamic shared memory of the kernel being emulated (one block at a time).
alignas(16) unsigned char smem[256 * 1024];

namespace {
struct MmaExchange {
  uint32_t a[4][32][4];
  uint32_t b[4][32][2];
};
MmaExchange mma_xch;

// PTX ISA, "Matrix fragments for mma.m16n8k16" with .f16 / .bf16 A and B, .f32 C/D;
// groupID = lane >> 2, threadID_in_group = lane % 4:
//   A: a0,a1: (groupID, 2*tig + {0,1}); a2,a3: (groupID + 8, ...); a4,a5: (groupID, 2*tig + 8 + {0,1});
//      a6,a7: (groupID + 8, 2*tig + 8 + {0,1}); a(2i) in the low half of register i.
//   B: b0,b1: (row 2*tig + {0,1}, col groupID); b2,b3: (row 2*tig + 8 + {0,1}, col groupID).
//   C: c0,c1: (groupID, 2*tig + {0,1}); c2,c3: (groupID + 8, 2*tig + {0,1}).
template <float (*ToF)(uint16_t)>
void emulate_mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) mma_xch.a[w][lane][i] = a[i];
  for (int i = 0; i < 2; ++i) mma_xch.b[w][lane][i] = b[i];
  __syncwarp();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    const uint32_t* ra = mma_xch.a[w][l];
    const uint32_t* rb = mma_xch.b[w][l];
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = ToF(static_cast<uint16_t>(ra[0] >> (16 * h)));
      A[g + 8][2 * t + h] = ToF(static_cast<uint16_t>(ra[1] >> (16 * h)));
      A[g][2 * t + 8 + h] = ToF(static_cast<uint16_t>(ra[2] >> (16 * h)));
      A[g + 8][2 * t + 8 + h] = ToF(static_cast<uint16_t>(ra[3] >> (16 * h)));
      B[2 * t + h][g] = ToF(static_cast<uint16_t>(rb[0] >> (16 * h)));
      B[2 * t + 8 + h][g] = ToF(static_cast<uint16_t>(rb[1] >> (16 * h)));
    }
  }
  __syncwarp();  // the exchange buffer is free again
  const int g = lane >> 2, t = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = c[e];
    for (int kk = 0; kk < 16; ++kk) acc += A[row][kk] * B[kk][col];
    c[e] = acc;
  }
}
}  // namespace

template <>
inline void mma_16816<__half>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  emulate_mma<&flg::half_to_float>(c, a, b);
}
template <>
inline void mma_16816<__nv_bfloat16>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  emulate_mma<&flg::bf16_to_float>(c, a, b);
}

}  // namespace cuda
}  // namespace flg

namespace {

using flg::AttentionParams;

template <typename F>
void launch(dim3 grid, int threads, F body) {
  blockDim = dim3(threads);
  gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(flg::cuda::smem, 0xff, sizeof(flg::cuda::smem));  // NaN: reads of unwritten smem show
        flg_emu::BlockState st;
        st.block = std::make_unique<std::barrier<>>(threads);
        for (int w = 0; w < threads / 32; ++w) st.warps.push_back(std::make_unique<std::barrier<>>(32));
        flg_emu::state = &st;
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t)
          ts.emplace_back([&, t] {
            threadIdx = dim3(t);
            blockIdx = dim3(x, y, z);
            body();
          });
        for (auto& th : ts) th.join();
      }
}

struct Case {
  int dtype;  // 0 float32 (CUDA-core kernel), 1 float16, 2 bfloat16 (tensor-core kernel)
  int64_t B, Sq, Skv, H, D;
  int layout;  // 0: contiguous (B, S, H, D); 1: (B, H, S, D) storage; 2: row stride padded by 3 (unaligned)
};

uint16_t store16(int dtype, float v) { return dtype == 1 ? flg::float_to_half(v) : flg::float_to_bf16(v); }
float load16(int dtype, uint16_t v) { return dtype == 1 ? flg::half_to_float(v) : flg::bf16_to_float(v); }

struct Tensor {
  std::vector<unsigned char> bytes;
  int64_t sb, ss, sh;
};

// A (B, S, H, D) tensor in the case's layout, filled from `vals` (row-major B, S, H, D)
// rounded to the dtype; `vals` is overwritten with the rounded values.
Tensor make(const Case& c, int64_t S, std::vector<double>& vals) {
  const int64_t B = c.B, H = c.H, D = c.D;
  Tensor t;
  if (c.layout == 0) t = {{}, S * H * D, H * D, D};
  else if (c.layout == 1) t = {{}, H * S * D, D, S * D};
  else t = {{}, S * (H * D + 3), H * D + 3, D};
  const size_t esz = c.dtype == 0 ? 4 : 2;
  t.bytes.assign((B * t.sb + 8) * esz, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) {
          double& v = vals[((b * S + s) * H + h) * D + d];
          const int64_t off = b * t.sb + s * t.ss + h * t.sh + d;
          if (c.dtype == 0) {
            float f = static_cast<float>(v);
            std::memcpy(t.bytes.data() + off * 4, &f, 4);
            v = f;
          } else {
            uint16_t u = store16(c.dtype, static_cast<float>(v));
            std::memcpy(t.bytes.data() + off * 2, &u, 2);
            v = load16(c.dtype, u);
          }
        }
  return t;
}

double run_case(const Case& c, std::mt19937& rng) {
  std::normal_distribution<double> nd(0.0, 1.0);
  const int64_t B = c.B, Sq = c.Sq, Skv = c.Skv, H = c.H, D = c.D;
  std::vector<double> q(B * Sq * H * D), k(B * Skv * H * D), v(B * Skv * H * D);
  for (auto* vec : {&q, &k, &v})
    for (double& x : *vec) x = nd(rng) * 1.5;
  Tensor tq = make(c, Sq, q), tk = make(c, Skv, k), tv = make(c, Skv, v);
  const size_t esz = c.dtype == 0 ? 4 : 2;
  std::vector<unsigned char> out(B * Sq * H * D * esz, 0xff);
  const auto dt = static_cast<flg::DType>(c.dtype);
  const AttentionParams p{.out = flg::make_tensor(out.data(), dt, {B, Sq, H, D}),
                          .q = flg::make_tensor(tq.bytes.data(), dt, {B, Sq, H, D}, {tq.sb, tq.ss, tq.sh, 1}),
                          .k = flg::make_tensor(tk.bytes.data(), dt, {B, Skv, H, D}, {tk.sb, tk.ss, tk.sh, 1}),
                          .v = flg::make_tensor(tv.bytes.data(), dt, {B, Skv, H, D}, {tv.sb, tv.ss, tv.sh, 1}),
                          .scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)))};
  if (!flg::check(p).ok()) return INFINITY;
  using namespace flg::cuda;
  auto aligned = [&](const Tensor& t) {
    return reinterpret_cast<std::uintptr_t>(t.bytes.data()) % 16 == 0 && t.sb % 8 == 0 && t.ss % 8 == 0 && t.sh % 8 == 0;
  };
  const bool vq = aligned(tq), vk = aligned(tk), vv = aligned(tv);
  auto tc = [&](auto tag, auto dmax) {
    using T = decltype(tag);
    constexpr int kD = decltype(dmax)::value;
    using C = AttnTCConfig<kD>;
    static_assert(C::kSmemBytes <= sizeof(smem));
    launch(dim3((Sq + C::kBlockM - 1) / C::kBlockM, H, B), C::kThreads,
           [&] { attention_tc_kernel<T, kD>(p, vq, vk, vv); });
  };
  auto simt = [&](auto dmax) {
    constexpr int kD = decltype(dmax)::value;
    using C = AttnSimtConfig<kD>;
    static_assert(C::kSmemBytes <= sizeof(smem));
    launch(dim3((Sq + C::kBlockM - 1) / C::kBlockM, H, B), C::kThreads, [&] { attention_simt_kernel<float, kD>(p); });
  };
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  using D256 = std::integral_constant<int, 256>;
  if (c.dtype == 0) {
    if (D <= 64) simt(D64{}); else if (D <= 128) simt(D128{}); else simt(D256{});
  } else if (c.dtype == 1) {
    if (D <= 64) tc(__half{}, D64{}); else if (D <= 128) tc(__half{}, D128{}); else tc(__half{}, D256{});
  } else {
    if (D <= 64) tc(__nv_bfloat16{}, D64{}); else if (D <= 128) tc(__nv_bfloat16{}, D128{});
    else tc(__nv_bfloat16{}, D256{});
  }
  // float64 reference from the rounded inputs; relative Frobenius error of the output
  double num = 0.0, den = 0.0;
  std::vector<double> sc(Skv);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Sq; ++i) {
        double mx = -1e300;
        for (int64_t j = 0; j < Skv; ++j) {
          double s = 0.0;
          for (int64_t d = 0; d < D; ++d) s += q[((b * Sq + i) * H + h) * D + d] * k[((b * Skv + j) * H + h) * D + d];
          sc[j] = s / std::sqrt(static_cast<double>(D));
          mx = std::max(mx, sc[j]);
        }
        double l = 0.0;
        for (int64_t j = 0; j < Skv; ++j) l += (sc[j] = std::exp(sc[j] - mx));
        for (int64_t d = 0; d < D; ++d) {
          double r = 0.0;
          for (int64_t j = 0; j < Skv; ++j) r += sc[j] * v[((b * Skv + j) * H + h) * D + d];
          r /= l;
          const int64_t oi = ((b * Sq + i) * H + h) * D + d;
          double got;
          if (c.dtype == 0) {
            float f;
            std::memcpy(&f, out.data() + oi * 4, 4);
            got = f;
          } else {
            uint16_t u;
            std::memcpy(&u, out.data() + oi * 2, 2);
            got = load16(c.dtype, u);
          }
          if (!std::isfinite(got)) return INFINITY;
          num += (got - r) * (got - r);
          den += r * r;
        }
      }
  return std::sqrt(num / den);
}

// A flat buffer of `n` elements of a dtype; set() stores the rounded value and returns it.
struct Buf {
  int dtype;
  std::vector<unsigned char> bytes;
  Buf(int dt, int64_t n) : dtype(dt), bytes(static_cast<size_t>(n) * (dt == 0 ? 4 : 2) + 16, 0xff) {}
  void* data() { return bytes.data(); }
  double set(int64_t i, double v) {
    if (dtype == 0) {
      const float f = static_cast<float>(v);
      std::memcpy(bytes.data() + i * 4, &f, 4);
      return f;
    }
    const uint16_t u = store16(dtype, static_cast<float>(v));
    std::memcpy(bytes.data() + i * 2, &u, 2);
    return load16(dtype, u);
  }
  double get(int64_t i) const {
    if (dtype == 0) {
      float f;
      std::memcpy(&f, bytes.data() + i * 4, 4);
      return f;
    }
    uint16_t u;
    std::memcpy(&u, bytes.data() + i * 2, 2);
    return load16(dtype, u);
  }
};

double round_to(int dtype, double v) {
  if (dtype == 0) return static_cast<float>(v);
  return load16(dtype, store16(dtype, static_cast<float>(v)));
}

// Relative Frobenius error accumulator.
struct Err {
  double num = 0.0, den = 0.0;
  bool finite = true;
  void add(double got, double want) {
    finite = finite && std::isfinite(got);
    num += (got - want) * (got - want);
    den += want * want;
  }
  double value() const { return finite ? std::sqrt(num / den) : INFINITY; }
};

// ---- gated_residual_adaln ----------------------------------------------------------------

struct GatedCase {
  int dtype;
  bool mod32;  // gate/scale/shift float32 (else x's dtype)
  int64_t B, S, D;
  int64_t pad;  // extra elements in x / y row strides (0: contiguous)
};

template <typename T, typename M>
void emulate_gated(const flg::GatedResidualAdaLNParams& p) {
  launch(dim3(static_cast<unsigned>(p.batch() * p.seq())), flg::cuda::row_threads(p.dim()),
         [&] { flg::cuda::gated_residual_adaln_kernel<T, M>(p); });
}

double run_gated(const GatedCase& c, std::mt19937& rng) {
  std::normal_distribution<double> nd(0.0, 1.0);
  const int64_t B = c.B, S = c.S, D = c.D;
  const int md = c.mod32 ? 0 : c.dtype;
  // x, y: padded rows; gate: per-token chunk of a (B, S, 6, D) tensor; scale: a (D,) vector
  // expanded over B and S; shift: per-sample chunk of a (B, 6, D) tensor
  const int64_t xs_s = D + c.pad, xs_b = S * xs_s + c.pad;
  Buf x(c.dtype, B * xs_b), y(c.dtype, B * xs_b), gate(md, B * S * 6 * D), scale(md, D), shift(md, B * 6 * D);
  std::vector<double> gv(B * S * 6 * D), scv(D), shv(B * 6 * D);
  for (int64_t i = 0; i < B * S * 6 * D; ++i) gv[i] = gate.set(i, nd(rng));
  for (int64_t i = 0; i < D; ++i) scv[i] = scale.set(i, 0.5 * nd(rng));
  for (int64_t i = 0; i < B * 6 * D; ++i) shv[i] = shift.set(i, nd(rng));
  std::vector<double> xv(B * xs_b), yv(B * xs_b);
  for (int64_t i = 0; i < B * xs_b; ++i) xv[i] = x.set(i, 3.0 * nd(rng) + 1.0), yv[i] = y.set(i, nd(rng));
  Buf x_out(c.dtype, B * S * D), h_out(c.dtype, B * S * D);
  const int64_t g_sb = S * 6 * D, g_ss = 6 * D, g_off = 2 * D;  // chunk 2 of 6
  const int64_t sh_sb = 6 * D, sh_off = 0;
  const auto xd = static_cast<flg::DType>(c.dtype), mdt = static_cast<flg::DType>(md);
  const flg::GatedResidualAdaLNParams p{
      .x_out = flg::make_tensor(x_out.data(), xd, {B, S, D}),
      .h_out = flg::make_tensor(h_out.data(), xd, {B, S, D}),
      .x = flg::make_tensor(x.data(), xd, {B, S, D}, {xs_b, xs_s, 1}),
      .y = flg::make_tensor(y.data(), xd, {B, S, D}, {xs_b, xs_s, 1}),
      .gate = flg::make_tensor(static_cast<char*>(gate.data()) + g_off * (md == 0 ? 4 : 2), mdt, {B, S, D},
                               {g_sb, g_ss, 1}),
      .scale = flg::make_tensor(scale.data(), mdt, {B, S, D}, {0, 0, 1}),
      .shift = flg::make_tensor(static_cast<char*>(shift.data()) + sh_off * (md == 0 ? 4 : 2), mdt, {B, S, D},
                                {sh_sb, 0, 1}),
      .eps = 1e-6f};
  if (!flg::check(p).ok()) return INFINITY;
  if (c.dtype == 0) emulate_gated<float, float>(p);
  else if (c.dtype == 1) c.mod32 ? emulate_gated<__half, float>(p) : emulate_gated<__half, __half>(p);
  else c.mod32 ? emulate_gated<__nv_bfloat16, float>(p) : emulate_gated<__nv_bfloat16, __nv_bfloat16>(p);
  Err err;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      std::vector<double> xn(D);
      double mean = 0.0, var = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t xi = b * xs_b + s * xs_s + d;
        xn[d] = round_to(c.dtype, xv[xi] + yv[xi] * gv[b * g_sb + s * g_ss + g_off + d]);
        mean += xn[d];
      }
      mean /= D;
      for (int64_t d = 0; d < D; ++d) var += (xn[d] - mean) * (xn[d] - mean);
      const double rstd = 1.0 / std::sqrt(var / D + 1e-6);
      for (int64_t d = 0; d < D; ++d) {
        const int64_t o = (b * S + s) * D + d;
        err.add(x_out.get(o), xn[d]);
        err.add(h_out.get(o), (xn[d] - mean) * rstd * (1.0 + scv[d]) + shv[b * sh_sb + sh_off + d]);
      }
    }
  return err.value();
}

// ---- qk_norm_rope --------------------------------------------------------------------------

struct QKCase {
  int dtype;
  int64_t B, S, H, Dh;
  int64_t pad;  // extra elements in the q / k row strides and in the cos / sin row stride
};

template <typename T>
void emulate_qk(const flg::QKNormRopeParams& p) {
  launch(dim3(static_cast<unsigned>(p.batch() * p.seq()), 2), flg::cuda::row_threads(p.heads() * p.head_dim() / 2),
         [&] { flg::cuda::qk_norm_rope_kernel<T>(p); });
}

double run_qk(const QKCase& c, std::mt19937& rng) {
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(-3.0, 3.0);
  const int64_t B = c.B, S = c.S, H = c.H, Dh = c.Dh, N = H * Dh, half = Dh / 2;
  const int64_t r_s = N + c.pad, r_b = S * r_s + c.pad, t_s = half + c.pad;
  Buf q(c.dtype, B * r_b), k(c.dtype, B * r_b), q_out(c.dtype, B * S * N), k_out(c.dtype, B * S * N);
  std::vector<double> qv(B * r_b), kv(B * r_b);
  for (int64_t i = 0; i < B * r_b; ++i) qv[i] = q.set(i, 2.0 * nd(rng)), kv[i] = k.set(i, nd(rng) - 0.5);
  std::vector<float> qw(N), kw(N), cs(S * t_s), sn(S * t_s);
  for (int64_t i = 0; i < N; ++i) qw[i] = static_cast<float>(1.0 + 0.3 * nd(rng)), kw[i] = static_cast<float>(nd(rng));
  for (int64_t i = 0; i < S * t_s; ++i) {
    const double a = ud(rng);
    cs[i] = static_cast<float>(std::cos(a));
    sn[i] = static_cast<float>(std::sin(a));
  }
  const auto dt = static_cast<flg::DType>(c.dtype), f32 = flg::DType::Float32;
  const flg::QKNormRopeParams p{.q_out = flg::make_tensor(q_out.data(), dt, {B, S, H, Dh}),
                                .k_out = flg::make_tensor(k_out.data(), dt, {B, S, H, Dh}),
                                .q = flg::make_tensor(q.data(), dt, {B, S, N}, {r_b, r_s, 1}),
                                .k = flg::make_tensor(k.data(), dt, {B, S, N}, {r_b, r_s, 1}),
                                .q_weight = flg::make_tensor(qw.data(), f32, {N}),
                                .k_weight = flg::make_tensor(kw.data(), f32, {N}),
                                .cos = flg::make_tensor(cs.data(), f32, {S, half}, {t_s, 1}),
                                .sin = flg::make_tensor(sn.data(), f32, {S, half}, {t_s, 1}),
                                .eps = 1e-6f};
  if (!flg::check(p).ok()) return INFINITY;
  if (c.dtype == 0) emulate_qk<float>(p);
  else if (c.dtype == 1) emulate_qk<__half>(p);
  else emulate_qk<__nv_bfloat16>(p);
  Err err;
  for (int which = 0; which < 2; ++which)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s) {
        const std::vector<double>& xv = which ? kv : qv;
        const std::vector<float>& w = which ? kw : qw;
        const Buf& out = which ? k_out : q_out;
        const int64_t base = b * r_b + s * r_s;
        double sq = 0.0;
        for (int64_t n = 0; n < N; ++n) sq += xv[base + n] * xv[base + n];
        const double r = 1.0 / std::sqrt(sq / N + 1e-6);
        for (int64_t j = 0; j < N / 2; ++j) {
          const int64_t i = j % half;
          const double x1 = round_to(c.dtype, xv[base + 2 * j] * r * w[2 * j]);
          const double x2 = round_to(c.dtype, xv[base + 2 * j + 1] * r * w[2 * j + 1]);
          const double cv = cs[s * t_s + i], sv = sn[s * t_s + i];
          const int64_t o = (b * S + s) * N + 2 * j;
          err.add(out.get(o), x1 * cv - x2 * sv);
          err.add(out.get(o + 1), x1 * sv + x2 * cv);
        }
      }
  return err.value();
}

}  // namespace

int main() {
  const char* names[] = {"float32", "float16", "bfloat16"};
  // relative Frobenius tolerance per dtype: one rounding of the output (plus, in attention's
  // tensor-core path, of P) on fp32 math
  const double tol[] = {2e-6, 1e-3, 5e-3};
  std::mt19937 rng(0);
  int failed = 0;
  auto t0 = std::chrono::steady_clock::now();
  auto report = [&](const char* op, int dtype, double err, const std::string& what) {
    const bool ok = err <= tol[dtype];
    failed += !ok;
    const auto t1 = std::chrono::steady_clock::now();
    std::printf("%s %-20s %-8s %s rel_err=%.3e (tol %.0e) %.0f ms\n", ok ? "ok  " : "FAIL", op, names[dtype],
                what.c_str(), err, tol[dtype], std::chrono::duration<double, std::milli>(t1 - t0).count());
    t0 = t1;
  };

  const Case attn_cases[] = {
      // {dtype, B, Sq, Skv, H, D, layout}: several query blocks and K/V tiles, head dims
      // padded inside a bucket (24, 40, 72, 136) or filling it, Skv != Sq, three layouts
      {1, 1, 7, 13, 1, 40, 0},   {2, 2, 33, 65, 1, 72, 1},  {1, 1, 65, 130, 1, 96, 2},
      {2, 1, 70, 17, 1, 112, 0}, {1, 1, 16, 64, 2, 24, 1},  {2, 1, 9, 200, 1, 64, 0},
      {1, 1, 20, 40, 1, 128, 2}, {2, 1, 5, 70, 1, 136, 0},  {1, 1, 3, 33, 1, 256, 1},
      {0, 1, 7, 13, 1, 40, 0},   {0, 1, 33, 40, 2, 72, 1},  {0, 1, 40, 100, 1, 112, 2},
      {0, 1, 9, 33, 1, 256, 0},  {0, 1, 3, 5, 3, 8, 1},
  };
  for (const Case& c : attn_cases)
    report("attention", c.dtype, run_case(c, rng),
           "B=" + std::to_string(c.B) + " Sq=" + std::to_string(c.Sq) + " Skv=" + std::to_string(c.Skv) +
               " H=" + std::to_string(c.H) + " D=" + std::to_string(c.D) + " layout=" + std::to_string(c.layout));

  const GatedCase gated_cases[] = {
      {0, true, 1, 3, 111, 0},  {1, true, 2, 3, 40, 5},  {1, false, 1, 2, 111, 3},
      {2, true, 1, 2, 1536, 0}, {2, false, 2, 2, 64, 7}, {0, true, 1, 1, 2000, 1},
  };
  for (const GatedCase& c : gated_cases)
    report("gated_residual_adaln", c.dtype, run_gated(c, rng),
           "B=" + std::to_string(c.B) + " S=" + std::to_string(c.S) + " D=" + std::to_string(c.D) +
               (c.mod32 ? " mod=float32" : " mod=x") + " pad=" + std::to_string(c.pad));

  const QKCase qk_cases[] = {
      {0, 1, 3, 3, 40, 0}, {1, 2, 2, 2, 72, 3}, {2, 1, 2, 1, 112, 1},
      {2, 1, 1, 12, 128, 0}, {1, 1, 2, 2, 24, 5}, {0, 2, 2, 3, 96, 2},
  };
  for (const QKCase& c : qk_cases)
    report("qk_norm_rope", c.dtype, run_qk(c, rng),
           "B=" + std::to_string(c.B) + " S=" + std::to_string(c.S) + " H=" + std::to_string(c.H) +
               " Dh=" + std::to_string(c.Dh) + " pad=" + std::to_string(c.pad));
  return failed ? 1 : 0;
}
