// PYBIND11_MODULE(_C): registration only. Entry points take raw pointers (ints),
// sizes, strides, dtype codes and a stream handle; Python wrappers in
// flgengine/ops/native.py validate tensors first.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cpu/ops.h"
#ifdef FLG_WITH_CUDA
#include "cuda/ops.h"
#endif

namespace py = pybind11;

namespace {

flg::AdaLNModulateParams adaln_params(std::uintptr_t out, std::uintptr_t x, std::uintptr_t scale, std::uintptr_t shift,
                                      int64_t batch, int64_t seq, int64_t dim, int64_t mod_stride_b,
                                      int64_t mod_stride_s, double eps, int x_dtype, int mod_dtype) {
  return {reinterpret_cast<void*>(out), reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(scale),
          reinterpret_cast<const void*>(shift), batch, seq, dim, mod_stride_b, mod_stride_s, static_cast<float>(eps),
          x_dtype, mod_dtype};
}

using ptr = std::uintptr_t;

template <typename V = void>
V* as_ptr(ptr p) {
  return reinterpret_cast<V*>(p);
}

flg::GatedResidualAdaLNParams gated_params(ptr x_out, ptr h_out, ptr x, ptr y, ptr gate, ptr scale, ptr shift,
                                           int64_t batch, int64_t seq, int64_t dim, int64_t x_sb, int64_t x_ss,
                                           int64_t y_sb, int64_t y_ss, int64_t g_sb, int64_t g_ss, int64_t sc_sb,
                                           int64_t sc_ss, int64_t sh_sb, int64_t sh_ss, double eps, int x_dtype,
                                           int mod_dtype) {
  return {as_ptr(x_out), as_ptr(h_out), as_ptr<const void>(x), as_ptr<const void>(y), as_ptr<const void>(gate),
          as_ptr<const void>(scale), as_ptr<const void>(shift), batch, seq, dim, x_sb, x_ss, y_sb, y_ss, g_sb, g_ss,
          sc_sb, sc_ss, sh_sb, sh_ss, static_cast<float>(eps), x_dtype, mod_dtype};
}

flg::QKNormRopeParams qk_params(ptr q_out, ptr k_out, ptr q, ptr k, ptr q_weight, ptr k_weight, ptr cos, ptr sin,
                                int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, int64_t q_sb, int64_t q_ss,
                                int64_t k_sb, int64_t k_ss, int64_t cos_ss, int64_t sin_ss, double eps, int dtype) {
  return {as_ptr(q_out), as_ptr(k_out), as_ptr<const void>(q), as_ptr<const void>(k), as_ptr<const float>(q_weight),
          as_ptr<const float>(k_weight), as_ptr<const float>(cos), as_ptr<const float>(sin), batch, seq, heads,
          head_dim, q_sb, q_ss, k_sb, k_ss, cos_ss, sin_ss, static_cast<float>(eps), dtype};
}

flg::AttentionParams attention_params(ptr out, ptr q, ptr k, ptr v, int64_t batch, int64_t seq_q, int64_t seq_kv,
                                      int64_t heads, int64_t head_dim, int64_t q_sb, int64_t q_ss, int64_t q_sh,
                                      int64_t k_sb, int64_t k_ss, int64_t k_sh, int64_t v_sb, int64_t v_ss,
                                      int64_t v_sh, double scale, int dtype) {
  return {as_ptr(out), as_ptr<const void>(q), as_ptr<const void>(k), as_ptr<const void>(v), batch, seq_q, seq_kv,
          heads, head_dim, q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, static_cast<float>(scale), dtype};
}

py::dict build_info() {
  py::dict info;
#ifdef FLG_WITH_CUDA
  info["cuda"] = true;
  std::string archs(FLG_CUDA_ARCHS);
  for (char& c : archs) if (c == ',') c = ';';
  info["cuda_archs"] = archs;
  info["cuda_devices"] = flg::cuda::device_count();
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string("");
  info["cuda_devices"] = 0;
#endif
  py::list ops;
  for (const char* op : {"adaln_modulate", "gated_residual_adaln", "qk_norm_rope", "attention"}) ops.append(op);
  info["ops"] = ops;
  py::list backends;
  backends.append("cpu");
#ifdef FLG_WITH_CUDA
  backends.append("cuda");
#endif
  info["backends"] = backends;
  return info;
}

}  // namespace

// Argument names of the entry points (the _cuda variants add `stream`).
#define GATED_ARGS                                                                                                  \
  py::arg("x_out"), py::arg("h_out"), py::arg("x"), py::arg("y"), py::arg("gate"), py::arg("scale"), py::arg("shift"), \
      py::arg("batch"), py::arg("seq"), py::arg("dim"), py::arg("x_stride_b"), py::arg("x_stride_s"),                 \
      py::arg("y_stride_b"), py::arg("y_stride_s"), py::arg("gate_stride_b"), py::arg("gate_stride_s"),               \
      py::arg("scale_stride_b"), py::arg("scale_stride_s"), py::arg("shift_stride_b"), py::arg("shift_stride_s"),     \
      py::arg("eps"), py::arg("x_dtype"), py::arg("mod_dtype")
#define QK_ARGS                                                                                                     \
  py::arg("q_out"), py::arg("k_out"), py::arg("q"), py::arg("k"), py::arg("q_weight"), py::arg("k_weight"),          \
      py::arg("cos"), py::arg("sin"), py::arg("batch"), py::arg("seq"), py::arg("heads"), py::arg("head_dim"),      \
      py::arg("q_stride_b"), py::arg("q_stride_s"), py::arg("k_stride_b"), py::arg("k_stride_s"),                   \
      py::arg("cos_stride_s"), py::arg("sin_stride_s"), py::arg("eps"), py::arg("dtype")
#define ATTN_ARGS                                                                                                   \
  py::arg("out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("batch"), py::arg("seq_q"), py::arg("seq_kv"),   \
      py::arg("heads"), py::arg("head_dim"), py::arg("q_stride_b"), py::arg("q_stride_s"), py::arg("q_stride_h"),   \
      py::arg("k_stride_b"), py::arg("k_stride_s"), py::arg("k_stride_h"), py::arg("v_stride_b"),                   \
      py::arg("v_stride_s"), py::arg("v_stride_h"), py::arg("scale"), py::arg("dtype")

PYBIND11_MODULE(_C, m) {
  m.doc() = "flgengine native ops (C++ CPU and CUDA); no libtorch";
  m.def("build_info", &build_info, "What this build holds: cuda, cuda_archs, backends, ops");
  m.def(
      "adaln_modulate_cpu",
      [](std::uintptr_t out, std::uintptr_t x, std::uintptr_t scale, std::uintptr_t shift, int64_t batch, int64_t seq,
         int64_t dim, int64_t sb, int64_t ss, double eps, int xd, int md) {
        py::gil_scoped_release release;
        flg::cpu::adaln_modulate(adaln_params(out, x, scale, shift, batch, seq, dim, sb, ss, eps, xd, md));
      },
      py::arg("out"), py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("batch"), py::arg("seq"),
      py::arg("dim"), py::arg("mod_stride_b"), py::arg("mod_stride_s"), py::arg("eps"), py::arg("x_dtype"),
      py::arg("mod_dtype"));
  m.def(
      "gated_residual_adaln_cpu",
      [](ptr x_out, ptr h_out, ptr x, ptr y, ptr gate, ptr scale, ptr shift, int64_t batch, int64_t seq, int64_t dim,
         int64_t x_sb, int64_t x_ss, int64_t y_sb, int64_t y_ss, int64_t g_sb, int64_t g_ss, int64_t sc_sb,
         int64_t sc_ss, int64_t sh_sb, int64_t sh_ss, double eps, int xd, int md) {
        py::gil_scoped_release release;
        flg::cpu::gated_residual_adaln(gated_params(x_out, h_out, x, y, gate, scale, shift, batch, seq, dim, x_sb,
                                                    x_ss, y_sb, y_ss, g_sb, g_ss, sc_sb, sc_ss, sh_sb, sh_ss, eps, xd,
                                                    md));
      },
      GATED_ARGS);
  m.def(
      "qk_norm_rope_cpu",
      [](ptr q_out, ptr k_out, ptr q, ptr k, ptr qw, ptr kw, ptr cos, ptr sin, int64_t batch, int64_t seq,
         int64_t heads, int64_t head_dim, int64_t q_sb, int64_t q_ss, int64_t k_sb, int64_t k_ss, int64_t cos_ss,
         int64_t sin_ss, double eps, int dtype) {
        py::gil_scoped_release release;
        flg::cpu::qk_norm_rope(qk_params(q_out, k_out, q, k, qw, kw, cos, sin, batch, seq, heads, head_dim, q_sb, q_ss,
                                         k_sb, k_ss, cos_ss, sin_ss, eps, dtype));
      },
      QK_ARGS);
  m.def(
      "attention_cpu",
      [](ptr out, ptr q, ptr k, ptr v, int64_t batch, int64_t seq_q, int64_t seq_kv, int64_t heads, int64_t head_dim,
         int64_t q_sb, int64_t q_ss, int64_t q_sh, int64_t k_sb, int64_t k_ss, int64_t k_sh, int64_t v_sb,
         int64_t v_ss, int64_t v_sh, double scale, int dtype) {
        py::gil_scoped_release release;
        flg::cpu::attention(attention_params(out, q, k, v, batch, seq_q, seq_kv, heads, head_dim, q_sb, q_ss, q_sh,
                                             k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, scale, dtype));
      },
      ATTN_ARGS);
#ifdef FLG_WITH_CUDA
  m.def(
      "adaln_modulate_cuda",
      [](std::uintptr_t out, std::uintptr_t x, std::uintptr_t scale, std::uintptr_t shift, int64_t batch, int64_t seq,
         int64_t dim, int64_t sb, int64_t ss, double eps, int xd, int md, std::uintptr_t stream) {
        flg::cuda::adaln_modulate(adaln_params(out, x, scale, shift, batch, seq, dim, sb, ss, eps, xd, md), stream);
      },
      py::arg("out"), py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("batch"), py::arg("seq"),
      py::arg("dim"), py::arg("mod_stride_b"), py::arg("mod_stride_s"), py::arg("eps"), py::arg("x_dtype"),
      py::arg("mod_dtype"), py::arg("stream"));
  m.def(
      "gated_residual_adaln_cuda",
      [](ptr x_out, ptr h_out, ptr x, ptr y, ptr gate, ptr scale, ptr shift, int64_t batch, int64_t seq, int64_t dim,
         int64_t x_sb, int64_t x_ss, int64_t y_sb, int64_t y_ss, int64_t g_sb, int64_t g_ss, int64_t sc_sb,
         int64_t sc_ss, int64_t sh_sb, int64_t sh_ss, double eps, int xd, int md, ptr stream) {
        flg::cuda::gated_residual_adaln(gated_params(x_out, h_out, x, y, gate, scale, shift, batch, seq, dim, x_sb,
                                                     x_ss, y_sb, y_ss, g_sb, g_ss, sc_sb, sc_ss, sh_sb, sh_ss, eps, xd,
                                                     md),
                                        stream);
      },
      GATED_ARGS, py::arg("stream"));
  m.def(
      "qk_norm_rope_cuda",
      [](ptr q_out, ptr k_out, ptr q, ptr k, ptr qw, ptr kw, ptr cos, ptr sin, int64_t batch, int64_t seq,
         int64_t heads, int64_t head_dim, int64_t q_sb, int64_t q_ss, int64_t k_sb, int64_t k_ss, int64_t cos_ss,
         int64_t sin_ss, double eps, int dtype, ptr stream) {
        flg::cuda::qk_norm_rope(qk_params(q_out, k_out, q, k, qw, kw, cos, sin, batch, seq, heads, head_dim, q_sb,
                                          q_ss, k_sb, k_ss, cos_ss, sin_ss, eps, dtype),
                                stream);
      },
      QK_ARGS, py::arg("stream"));
  m.def(
      "attention_cuda",
      [](ptr out, ptr q, ptr k, ptr v, int64_t batch, int64_t seq_q, int64_t seq_kv, int64_t heads, int64_t head_dim,
         int64_t q_sb, int64_t q_ss, int64_t q_sh, int64_t k_sb, int64_t k_ss, int64_t k_sh, int64_t v_sb,
         int64_t v_ss, int64_t v_sh, double scale, int dtype, ptr stream) {
        flg::cuda::attention(attention_params(out, q, k, v, batch, seq_q, seq_kv, heads, head_dim, q_sb, q_ss, q_sh,
                                              k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, scale, dtype),
                             stream);
      },
      ATTN_ARGS, py::arg("stream"));
#endif
}
