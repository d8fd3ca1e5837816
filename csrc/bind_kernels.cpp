// pybind11 module server._kernels: the CPU prototype store and scan.
// server/kernels.py is the public wrapper; it validates and converts inputs,
// and this layer re-checks shapes so a bad call raises instead of crashing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <shared_mutex>
#include <stdexcept>
#include <string>

#include "cpu/microkernels.h"
#include "protoserve/kernels.h"
#include "protoserve/prototype_store.h"
#include "protoserve/scan.h"

namespace py = pybind11;
using namespace protoserve;

namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;

void check_rows(const py::buffer_info& b, int dim, const char* what) {
  if (b.ndim != 2) throw std::invalid_argument(std::string(what) + " must be 2-D");
  if (b.shape[1] != dim)
    throw std::invalid_argument(std::string(what) + " has dimension " +
                                std::to_string(b.shape[1]) + ", expected " + std::to_string(dim));
}

py::tuple py_topk(const PrototypeStore& store, F32 queries, int k, int rerank) {
  const auto b = queries.request();
  check_rows(b, store.dim(), "queries");
  if (k <= 0) throw std::invalid_argument("k must be positive");
  const int64_t nq = b.shape[0];
  const int64_t keff = std::min<int64_t>(k, store.size());
  py::array_t<float> scores({nq, keff});
  py::array_t<int64_t> index({nq, keff});
  {
    py::gil_scoped_release release;
    topk(store, static_cast<const float*>(b.ptr), nq, k, rerank, scores.mutable_data(),
         index.mutable_data());
  }
  return py::make_tuple(scores, index);
}

py::array_t<float> py_scores(const PrototypeStore& store, F32 queries) {
  const auto b = queries.request();
  check_rows(b, store.dim(), "queries");
  const int64_t nq = b.shape[0];
  py::array_t<float> out({nq, static_cast<int64_t>(store.size())});
  {
    py::gil_scoped_release release;
    all_scores(store, static_cast<const float*>(b.ptr), nq, out.mutable_data());
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "protoserve CPU prototype kernels (use server.kernels)";

  py::class_<PrototypeStore>(m, "Store")
      .def(py::init([](int dim, const std::string& dtype, int metric) {
             if (dtype != "float32" && dtype != "bfloat16")
               throw std::invalid_argument("dtype must be float32 or bfloat16");
             return new PrototypeStore(dim, dtype == "float32" ? Dtype::kFloat32 : Dtype::kBFloat16,
                                       metric);
           }),
           py::arg("dim"), py::arg("dtype"), py::arg("metric"))
      .def_property_readonly("dim", &PrototypeStore::dim)
      .def_property_readonly("metric", &PrototypeStore::metric)
      .def_property_readonly("bytes_held", &PrototypeStore::bytes_held)
      .def_property_readonly("bytes_scanned", &PrototypeStore::bytes_scanned)
      .def("__len__", &PrototypeStore::size)
      .def("append",
           [](PrototypeStore& s, F32 rows) {
             const auto b = rows.request();
             check_rows(b, s.dim(), "rows");
             py::gil_scoped_release release;
             s.append(static_cast<const float*>(b.ptr), b.shape[0]);
           })
      .def("update",
           [](PrototypeStore& s, int64_t i, F32 row) {
             const auto b = row.request();
             if (b.ndim != 1 || b.shape[0] != s.dim())
               throw std::invalid_argument("row must be 1-D of length dim");
             s.update(i, static_cast<const float*>(b.ptr));
           })
      .def("remove", &PrototypeStore::remove)
      .def("clear", &PrototypeStore::clear)
      .def("rows", [](const PrototypeStore& s) {
        std::shared_lock<std::shared_mutex> lock(s.mutex());
        py::array_t<float> out({static_cast<int64_t>(s.size()), static_cast<int64_t>(s.dim())});
        for (int64_t i = 0; i < s.size(); ++i) s.get_row(i, out.mutable_data() + i * s.dim());
        return out;
      });

  m.def("topk", &py_topk, py::arg("store"), py::arg("queries"), py::arg("k"), py::arg("rerank"));
  m.def("scores", &py_scores, py::arg("store"), py::arg("queries"));
  m.def("float_to_bf16", [](F32 x) {
    const auto b = x.request();
    py::array_t<uint16_t> out(b.shape);
    const float* src = static_cast<const float*>(b.ptr);
    uint16_t* dst = out.mutable_data();
    for (py::ssize_t i = 0; i < b.size; ++i) dst[i] = float_to_bf16(src[i]);
    return out;
  });
  m.def("read_sum", [](F32 x) {
    const auto b = x.request();
    py::gil_scoped_release release;
    return read_sum(static_cast<const float*>(b.ptr), b.size);
  });
  m.def("set_num_threads", [](int n) {
    py::gil_scoped_release release;
    set_num_threads(n);
  });
  m.def("num_threads", &num_threads);
  m.def("set_min_parallel_macs", [](int64_t macs) {
    if (macs < 0) throw py::value_error("min_parallel_macs must be >= 0");
    set_min_parallel_macs(macs);
  });
  m.def("min_parallel_macs", &min_parallel_macs);
  m.def("simd_level", &simd_level);
  m.def("best_simd_level", &best_simd_level);
  m.def("set_simd_level", [](const std::string& name) {
    if (!set_simd_level(name.c_str()))
      throw std::invalid_argument("SIMD level '" + name + "' is unknown or above this CPU's (" +
                                  best_simd_level() + ")");
  });
  m.def("fma_macs_per_ns", &fma_macs_per_ns,
        "one core's float32 FMA multiply-adds per ns (0 without AVX-512 BF16 built)");
  m.def("dpbf16_macs_per_ns", &dpbf16_macs_per_ns,
        "one core's VDPBF16PS multiply-adds per ns (0 without AVX-512 BF16 built)");
  m.attr("LANES") = kLanes;
}
