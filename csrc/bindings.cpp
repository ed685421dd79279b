// PYBIND11_MODULE(_C): one line per op. Each op's arguments are declared once, as the
// params struct in its header (flg/<op>.h, with a `fields` visitor naming them); bind_op
// turns that struct into the entry points <op>_cpu(**args) and <op>_cuda(stream, **args).
// Tensor arguments arrive as views (data_ptr, dtype code, device code, sizes, strides),
// built by flgengine/ops/native.py, and are converted and checked here, once; the op's
// own requirements (shapes, dtypes, layouts) are checked by its launchers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "flg/adaln_modulate.h"
#include "flg/attention.h"
#include "flg/gated_residual_adaln.h"
#include "flg/qk_norm_rope.h"
#include "flg/tensor.h"
#ifdef FLG_WITH_CUDA
#include "cuda/device.h"
#endif

namespace py = pybind11;

namespace {

std::vector<std::string>& bound_ops() {
  static std::vector<std::string> ops;
  return ops;
}

[[noreturn]] void bad(const std::string& op, const char* name, const std::string& what) {
  throw py::value_error(op + ": argument " + name + ": " + what);
}

// (data_ptr, dtype code, device code, sizes, strides) -> flg::Tensor, every part checked.
flg::Tensor to_tensor(py::handle obj, const std::string& op, const char* name, flg::Device device) {
  if (!py::isinstance<py::tuple>(obj) || py::len(obj) != 5)
    bad(op, name, "expected a tensor view (data_ptr, dtype, device, sizes, strides), got " +
                      std::string(py::str(py::type::of(obj))));
  const auto view = py::reinterpret_borrow<py::tuple>(obj);
  std::uintptr_t data = 0;
  int dtype = 0, dev = 0;
  std::vector<int64_t> sizes, strides;
  try {
    data = view[0].cast<std::uintptr_t>();
    dtype = view[1].cast<int>();
    dev = view[2].cast<int>();
    sizes = view[3].cast<std::vector<int64_t>>();
    strides = view[4].cast<std::vector<int64_t>>();
  } catch (const py::cast_error&) {
    bad(op, name, "a tensor view holds (int data_ptr, int dtype, int device, int sizes, int strides)");
  }
  flg::Tensor t{};
  t.data = reinterpret_cast<void*>(data);
  if (dtype < 0 || dtype > 2) bad(op, name, "unsupported dtype code " + std::to_string(dtype));
  t.dtype = static_cast<flg::DType>(dtype);
  if (dev != static_cast<int>(device))
    bad(op, name, std::string("tensor is on ") + (dev == 1 ? "cuda" : dev == 0 ? "cpu" : "an unknown device") +
                      ", this entry point takes " + (device == flg::Device::CUDA ? "cuda" : "cpu") + " tensors");
  t.device = device;
  if (sizes.size() != strides.size()) bad(op, name, "sizes and strides differ in length");
  if (sizes.size() > static_cast<size_t>(flg::kMaxDims))
    bad(op, name, "more than " + std::to_string(flg::kMaxDims) + " dims");
  t.ndim = static_cast<int>(sizes.size());
  for (int d = 0; d < t.ndim; ++d) {
    if (sizes[d] < 0 || strides[d] < 0) bad(op, name, "negative size or stride");
    t.sizes[d] = sizes[d];
    t.strides[d] = strides[d];
  }
  if (t.data == nullptr && t.numel() > 0) bad(op, name, "null data pointer");
  return t;
}

template <typename V>
V from_py(py::handle obj, const std::string& op, const char* name, flg::Device device) {
  if constexpr (std::is_same_v<V, flg::Tensor>) {
    return to_tensor(obj, op, name, device);
  } else {
    try {
      return obj.cast<V>();
    } catch (const py::cast_error&) {
      bad(op, name, "expected a number, got " + std::string(py::str(py::type::of(obj))));
    }
  }
}

// The params struct of `op` from keyword arguments: each field by name, none missing, none extra.
template <typename Params>
Params params_from(const py::kwargs& kwargs, const std::string& op, flg::Device device) {
  Params p{};
  size_t used = 0;
  p.fields([&](const char* name, auto& field) {
    if (!kwargs.contains(name)) throw py::type_error(op + ": missing argument " + name);
    field = from_py<std::decay_t<decltype(field)>>(kwargs[name], op, name, device);
    ++used;
  });
  if (used != kwargs.size()) {
    for (auto item : kwargs) {
      bool known = false;
      const std::string key = py::str(item.first);
      p.fields([&](const char* name, auto&) { known = known || key == name; });
      if (!known) throw py::type_error(op + ": unexpected argument " + key);
    }
  }
  return p;
}

template <typename Params>
std::string signature(const char* op, const char* entry, const char* first) {
  std::string doc = std::string(op) + entry + "(" + first + "*";
  Params p{};
  p.fields([&](const char* name, auto&) { doc += std::string(", ") + name; });
  return doc + ")\n\nflg::" + op + " (csrc/include/flg/" + op + ".h); tensors as views from flgengine/ops/native.py";
}

// Defines <op>_cpu(**args) and, with `cuda`, <op>_cuda(stream, **args).
template <typename T>
struct NonDeduced {
  using type = T;
};

template <typename Params>
void bind_op(py::module_& m, const char* op, void (*cpu)(const Params&),
             typename NonDeduced<void (*)(const Params&, std::uintptr_t)>::type cuda) {
  bound_ops().emplace_back(op);
  m.def((std::string(op) + "_cpu").c_str(),
        [op, cpu](py::kwargs kwargs) {
          const Params p = params_from<Params>(kwargs, op, flg::Device::CPU);
          py::gil_scoped_release release;
          cpu(p);
        },
        signature<Params>(op, "_cpu", "").c_str());
  if (cuda == nullptr) return;
  m.def((std::string(op) + "_cuda").c_str(),
        [op, cuda](std::uintptr_t stream, py::kwargs kwargs) {
          cuda(params_from<Params>(kwargs, op, flg::Device::CUDA), stream);
        },
        py::arg("stream"), signature<Params>(op, "_cuda", "stream, ").c_str());
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
  info["ops"] = py::cast(bound_ops());
  py::list backends;
  backends.append("cpu");
#ifdef FLG_WITH_CUDA
  backends.append("cuda");
#endif
  info["backends"] = backends;
  return info;
}

}  // namespace

// FLG_OP(name): binds flg::cpu::name and (in a CUDA build) flg::cuda::name; the params
// type comes from the launcher's signature.
#ifdef FLG_WITH_CUDA
#define FLG_OP(name) bind_op(m, #name, &flg::cpu::name, &flg::cuda::name)
#else
#define FLG_OP(name) bind_op(m, #name, &flg::cpu::name, nullptr)
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "flgengine native ops (C++ CPU and CUDA); no libtorch";
  FLG_OP(adaln_modulate);
  FLG_OP(gated_residual_adaln);
  FLG_OP(qk_norm_rope);
  FLG_OP(attention);
  m.def("build_info", &build_info, "What this build holds: cuda, cuda_archs, cuda_devices, backends, ops");
}
