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
  ops.append("adaln_modulate");
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
#endif
}
