// pybind11 module server._kernels_cuda: the CUDA prototype kernels over
// DLPack capsules.  server/_cuda.py is the Python side: it prepares torch or
// cupy tensors, allocates the outputs and passes x.__dlpack__(stream=1)
// capsules here.  This layer validates every tensor (device, dtype, shape,
// layout) so a bad call raises TypeError/ValueError instead of faulting.
//
// DLPack protocol (legacy, unversioned): a capsule named "dltensor" is
// consumed by renaming it "used_dltensor"; the consumer then owns the
// DLManagedTensor and calls its deleter when done (here: when the call
// returns, with the GIL held - some producers' deleters touch Python objects).
#include <Python.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include "dlpack.h"
#include "topk.cuh"

namespace py = pybind11;
namespace pc = protoserve::cuda;

namespace {

constexpr const char* kCapsuleName = "dltensor";
constexpr const char* kUsedCapsuleName = "used_dltensor";

struct CallDeleter {
  void operator()(DLManagedTensor* t) const noexcept {
    if (t != nullptr && t->deleter != nullptr) t->deleter(t);
  }
};
using Managed = std::unique_ptr<DLManagedTensor, CallDeleter>;

Managed consume(const py::handle& obj, const std::string& what) {
  PyObject* cap = obj.ptr();
  if (!PyCapsule_CheckExact(cap))
    throw py::type_error(what + " must be a DLPack capsule (x.__dlpack__()), got " +
                         Py_TYPE(cap)->tp_name);
  const char* name = PyCapsule_GetName(cap);
  if (name == nullptr && PyErr_Occurred()) throw py::error_already_set();
  if (name != nullptr && std::strcmp(name, kUsedCapsuleName) == 0)
    throw py::value_error(what + ": this DLPack capsule was already consumed");
  if (name == nullptr || std::strcmp(name, kCapsuleName) != 0)
    throw py::type_error(what + ": expected a legacy DLPack capsule named 'dltensor', got '" +
                         (name ? name : "<unnamed>") +
                         "' (call __dlpack__() without max_version)");
  auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, kCapsuleName));
  if (mt == nullptr) throw py::error_already_set();
  if (PyCapsule_SetName(cap, kUsedCapsuleName) != 0) throw py::error_already_set();
  return Managed(mt);
}

std::string dtype_name(const DLDataType& t) {
  std::string code;
  switch (t.code) {
    case kDLInt: code = "int"; break;
    case kDLUInt: code = "uint"; break;
    case kDLFloat: code = "float"; break;
    case kDLBfloat: code = "bfloat"; break;
    default: code = "code" + std::to_string(t.code) + "_"; break;
  }
  std::string s = code + std::to_string(t.bits);
  if (t.lanes != 1) s += "x" + std::to_string(t.lanes);
  return s;
}

bool is_dtype(const DLDataType& t, uint8_t code, uint8_t bits) {
  return t.code == code && t.bits == bits && t.lanes == 1;
}

// True when the strides (if any) describe a compact row-major layout.
// Strides of size-1 dimensions are ignored and empty tensors always pass.
bool is_compact(const DLTensor& t) {
  if (t.strides == nullptr) return true;
  for (int i = 0; i < t.ndim; ++i)
    if (t.shape[i] == 0) return true;
  int64_t expected = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    if (t.shape[i] != 1 && t.strides[i] != expected) return false;
    expected *= t.shape[i];
  }
  return true;
}

struct Matrix {
  const char* data;
  int64_t rows, cols;
  int device;
};

// Checks device, rank, layout and alignment of a [rows, cols] CUDA tensor.
// `device` < 0 accepts any CUDA device; otherwise it must match.
Matrix check_matrix(const Managed& m, const std::string& what, int device) {
  const DLTensor& t = m->dl_tensor;
  if (t.device.device_type != kDLCUDA)
    throw py::value_error(what + " must be on a CUDA device (DLPack device type " +
                          std::to_string(t.device.device_type) + ", expected " +
                          std::to_string(kDLCUDA) + ")");
  if (device >= 0 && t.device.device_id != device)
    throw py::value_error(what + " is on cuda:" + std::to_string(t.device.device_id) +
                          ", the queries on cuda:" + std::to_string(device));
  if (t.ndim != 2)
    throw py::value_error(what + " must be 2-D, got " + std::to_string(t.ndim) + "-D");
  if (t.shape[0] < 0 || t.shape[1] < 0) throw py::value_error(what + " has a negative shape");
  if (!is_compact(t))
    throw py::value_error(what + " must be C-contiguous (row-major, compact strides)");
  const char* data = static_cast<const char*>(t.data) + t.byte_offset;
  const int64_t item = (int64_t(t.dtype.bits) * t.dtype.lanes + 7) / 8;
  if (item > 0 && reinterpret_cast<uintptr_t>(data) % static_cast<uintptr_t>(item) != 0)
    throw py::value_error(what + " data is not aligned to its element size");
  return Matrix{data, t.shape[0], t.shape[1], t.device.device_id};
}

void require_dtype(const Managed& m, const std::string& what, uint8_t code, uint8_t bits) {
  if (!is_dtype(m->dl_tensor.dtype, code, bits)) {
    DLDataType want{code, bits, 1};
    throw py::type_error(what + " must be " + dtype_name(want) + ", got " +
                         dtype_name(m->dl_tensor.dtype));
  }
}

pc::ProtoType proto_type(const Managed& m) {
  const DLDataType& t = m->dl_tensor.dtype;
  if (is_dtype(t, kDLFloat, 32)) return pc::ProtoType::kFloat32;
  // bfloat16, or uint16 holding bfloat16 bit patterns (cupy has no bf16 dtype).
  if (is_dtype(t, kDLBfloat, 16) || is_dtype(t, kDLUInt, 16)) return pc::ProtoType::kBFloat16;
  throw py::type_error("prototypes must be float32 or bfloat16 (or uint16 bfloat16 bit "
                       "patterns), got " + dtype_name(t));
}

void check_metric(int metric) {
  if (metric < 0 || metric > 2)
    throw py::value_error("metric code must be 0 (ip), 1 (cosine) or 2 (l2), got " +
                          std::to_string(metric));
}

std::string shape_str(int64_t a, int64_t b) {
  return "[" + std::to_string(a) + ", " + std::to_string(b) + "]";
}

void require_shape(const Matrix& m, int64_t rows, int64_t cols, const std::string& what) {
  if (m.rows != rows || m.cols != cols)
    throw py::value_error(what + " must have shape " + shape_str(rows, cols) + ", got " +
                          shape_str(m.rows, m.cols));
}

struct Inputs {
  Matrix q, p;
  pc::ProtoType ptype;
};

Inputs check_inputs(const Managed& q, const Managed& p) {
  require_dtype(q, "queries", kDLFloat, 32);
  Inputs in{check_matrix(q, "queries", -1), {}, pc::ProtoType::kFloat32};
  in.ptype = proto_type(p);
  in.p = check_matrix(p, "prototypes", in.q.device);
  if (in.p.cols != in.q.cols)
    throw py::value_error("queries have dimension " + std::to_string(in.q.cols) +
                          ", prototypes have " + std::to_string(in.p.cols));
  return in;
}

// A scratch capsule's device pointer and size in bytes (null, 0 without one).
std::pair<void*, int64_t> scratch_of(const Managed& ws, int device) {
  if (!ws) return {nullptr, 0};
  const DLTensor& t = ws->dl_tensor;
  if (t.device.device_type != kDLCUDA || t.device.device_id != device)
    throw py::value_error("scratch must be on the queries' CUDA device");
  if (!is_compact(t)) throw py::value_error("scratch must be contiguous");
  int64_t numel = 1;
  for (int i = 0; i < t.ndim; ++i) numel *= t.shape[i];
  return {static_cast<char*>(t.data) + t.byte_offset,
          numel * ((int64_t(t.dtype.bits) * t.dtype.lanes + 7) / 8)};
}

py::tuple health_tuple(const pc::Health& h) {
  return py::make_tuple(h.queries_nonfinite, h.prototypes_nonfinite);
}

py::tuple py_topk(const py::object& queries, const py::object& prototypes, int64_t k,
                  int metric, const py::object& out_scores, const py::object& out_index,
                  const py::object& scratch, uintptr_t stream) {
  // Consume every capsule first: each is then released exactly once, on any path.
  Managed q = consume(queries, "queries");
  Managed p = consume(prototypes, "prototypes");
  Managed os = consume(out_scores, "out_scores");
  Managed oi = consume(out_index, "out_index");
  Managed ws;
  if (!scratch.is_none()) ws = consume(scratch, "scratch");

  if (k <= 0) throw py::value_error("k must be positive, got " + std::to_string(k));
  check_metric(metric);
  const Inputs in = check_inputs(q, p);
  const int64_t kc = std::min<int64_t>(k, in.p.rows);
  if (kc > pc::kMaxFusedK)
    throw py::value_error("min(k, C) = " + std::to_string(kc) + " exceeds the fused kernel's " +
                          "limit of " + std::to_string(pc::kMaxFusedK));
  require_dtype(os, "out_scores", kDLFloat, 32);
  require_dtype(oi, "out_index", kDLInt, 64);
  const Matrix ms = check_matrix(os, "out_scores", in.q.device);
  const Matrix mi = check_matrix(oi, "out_index", in.q.device);
  require_shape(ms, in.q.rows, kc, "out_scores");
  require_shape(mi, in.q.rows, kc, "out_index");
  const auto [ws_ptr, ws_bytes] = scratch_of(ws, in.q.device);

  pc::Health h;
  {
    py::gil_scoped_release release;
    h = pc::topk(in.q.device, reinterpret_cast<const float*>(in.q.data), in.p.data, in.ptype,
                 in.q.rows, in.p.rows, in.q.cols, metric, k,
                 reinterpret_cast<float*>(const_cast<char*>(ms.data)),
                 reinterpret_cast<int64_t*>(const_cast<char*>(mi.data)), ws_ptr, ws_bytes,
                 stream);
  }
  return health_tuple(h);
}

py::tuple py_scores(const py::object& queries, const py::object& prototypes, int metric,
                    const py::object& out, const py::object& scratch, uintptr_t stream) {
  Managed q = consume(queries, "queries");
  Managed p = consume(prototypes, "prototypes");
  Managed o = consume(out, "out");
  Managed ws;
  if (!scratch.is_none()) ws = consume(scratch, "scratch");

  check_metric(metric);
  const Inputs in = check_inputs(q, p);
  require_dtype(o, "out", kDLFloat, 32);
  const Matrix mo = check_matrix(o, "out", in.q.device);
  require_shape(mo, in.q.rows, in.p.rows, "out");
  const auto [ws_ptr, ws_bytes] = scratch_of(ws, in.q.device);

  pc::Health h;
  {
    py::gil_scoped_release release;
    h = pc::scores(in.q.device, reinterpret_cast<const float*>(in.q.data), in.p.data, in.ptype,
                   in.q.rows, in.p.rows, in.q.cols, metric,
                   reinterpret_cast<float*>(const_cast<char*>(mo.data)), ws_ptr, ws_bytes,
                   stream);
  }
  return health_tuple(h);
}

}  // namespace

PYBIND11_MODULE(_kernels_cuda, m) {
  m.doc() = "protoserve CUDA prototype kernels over DLPack capsules (use server.kernels)";
  m.def("device_count", &pc::device_count,
        "Visible CUDA devices; 0 when there is no driver or device (never raises).");
  m.def(
      "topk_workspace_bytes",
      [](int64_t nq, int64_t nc, int64_t k) {
        if (nq < 0 || nc < 0) throw py::value_error("sizes must be non-negative");
        if (k <= 0) throw py::value_error("k must be positive");
        return pc::topk_workspace_bytes(nq, nc, k);
      },
      py::arg("nq"), py::arg("nc"), py::arg("k"),
      "Scratch bytes topk needs for [nq, *] queries, nc prototypes and k (0: nothing to do).");
  m.def("scores_workspace_bytes", &pc::scores_workspace_bytes, "Scratch bytes scores needs.");
  m.def("topk", &py_topk, py::arg("queries"), py::arg("prototypes"), py::arg("k"),
        py::arg("metric"), py::arg("out_scores"), py::arg("out_index"),
        py::arg("scratch") = py::none(), py::arg("stream") = 0,
        "Fused top-k into out_scores fp32 [Q, min(k, C)] / out_index int64 [Q, min(k, C)], "
        "best first, ties to the lower index.  All arguments are DLPack capsules on one CUDA "
        "device except k and metric (0 ip, 1 cosine, 2 l2).  Returns (queries_nonfinite, "
        "prototypes_nonfinite): whether some row's squared norm was NaN or infinite.  Runs on "
        "`stream` (a cudaStream_t as an integer, 0: the legacy default stream) and "
        "synchronises it.");
  m.def("scores", &py_scores, py::arg("queries"), py::arg("prototypes"), py::arg("metric"),
        py::arg("out"), py::arg("scratch") = py::none(), py::arg("stream") = 0,
        "Every score into out fp32 [Q, C]; returns the same flags as topk.");
  m.attr("MAX_FUSED_K") = pc::kMaxFusedK;
}
