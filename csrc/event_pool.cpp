// A fixed pool of CUDA timing events recorded and queried from C++.
//
// A pair of torch.cuda.Event.record() calls costs about 16 us of Python per traced call;
// recording a pooled event from here costs about one cudaEventRecord.  Slots are handed
// out from a ring; a slot that has not been released yet is never reused, so when the
// background resolver falls behind, record() returns -1 (the span says the GPU time was
// dropped) instead of blocking or allocating.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include "hotpath_api.h"

#include <atomic>
#include <mutex>
#include <vector>

namespace {

constexpr int64_t kSlots = 4096;

struct Pool {
  std::vector<cudaEvent_t> events;
  std::vector<int> devices;
  std::vector<std::atomic<int>> busy;
  std::atomic<int64_t> cursor{0};
  std::mutex init_mutex;
  bool ready = false;
  Pool() : events(kSlots, nullptr), devices(kSlots, -1), busy(kSlots) {
    for (auto& b : busy) b.store(0);
  }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: events may outlive interpreter teardown
  return *p;
}

// Records an event on the current stream of the current device; returns its slot,
// -1 when every slot is in use, -3 when CUDA refused the record.
int64_t record() {
  Pool& p = pool();
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return -1;
  for (int attempt = 0; attempt < 4; ++attempt) {
    int64_t slot = p.cursor.fetch_add(1) % kSlots;
    int expected = 0;
    if (!p.busy[slot].compare_exchange_strong(expected, 1)) continue;
    if (p.events[slot] == nullptr || p.devices[slot] != device) {
      if (p.events[slot] != nullptr) cudaEventDestroy(p.events[slot]);
      if (cudaEventCreate(&p.events[slot]) != cudaSuccess) {
        p.events[slot] = nullptr;
        p.busy[slot].store(0);
        return -3;
      }
      p.devices[slot] = device;
    }
    cudaStream_t stream = at::cuda::getCurrentCUDAStream(device).stream();
    if (cudaEventRecord(p.events[slot], stream) != cudaSuccess) {
      p.busy[slot].store(0);
      return -3;  // a failed record (e.g. the context already hit a sticky error)
    }
    return slot;
  }
  return -1;
}

// 1: completed, 0: not yet, negative: the CUDA error code (e.g. -700 illegal address).
int64_t query(int64_t slot) {
  Pool& p = pool();
  if (slot < 0 || slot >= kSlots || p.events[slot] == nullptr) return -1;
  cudaError_t err = cudaEventQuery(p.events[slot]);
  if (err == cudaSuccess) return 1;
  if (err == cudaErrorNotReady) {
    cudaGetLastError();  // cudaErrorNotReady is not sticky, but clear it for others
    return 0;
  }
  return -static_cast<int64_t>(err);
}

// What the background resolver asks per call: the GPU ns between two slots in ONE
// driver call (query, query again and elapsed were three, each taking the driver's
// lock that the engine's launches also need): >= 0 ns, kNotReady while the end event
// is pending, else the negated CUDA error (a failed stream, or events that cannot be
// timed).
constexpr int64_t kNotReady = -(int64_t{1} << 40);

int64_t resolve(int64_t start, int64_t end) {
  Pool& p = pool();
  if (start < 0 || end < 0 || start >= kSlots || end >= kSlots || p.events[start] == nullptr ||
      p.events[end] == nullptr)
    return -static_cast<int64_t>(cudaErrorInvalidResourceHandle);
  float ms = 0.f;
  const cudaError_t err = cudaEventElapsedTime(&ms, p.events[start], p.events[end]);
  if (err == cudaSuccess) return static_cast<int64_t>(static_cast<double>(ms) * 1e6);
  cudaGetLastError();
  if (err == cudaErrorNotReady) return kNotReady;
  return -static_cast<int64_t>(err);
}

void release(int64_t slot) {
  if (slot >= 0 && slot < kSlots) pool().busy[slot].store(0);
}

std::string error_name(int64_t code) {
  return cudaGetErrorName(static_cast<cudaError_t>(code < 0 ? -code : code));
}

int64_t capacity() { return kSlots; }

// Creates every slot's event on the current device up front: cudaEventCreate costs
// tens of microseconds, which must not land on a traced call.  Returns how many exist.
int64_t prewarm() {
  Pool& p = pool();
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  int64_t ready = 0;
  for (int64_t slot = 0; slot < kSlots; ++slot) {
    int expected = 0;
    if (!p.busy[slot].compare_exchange_strong(expected, 1)) continue;
    if (p.events[slot] == nullptr || p.devices[slot] != device) {
      if (p.events[slot] != nullptr) cudaEventDestroy(p.events[slot]);
      if (cudaEventCreate(&p.events[slot]) != cudaSuccess) p.events[slot] = nullptr;
      p.devices[slot] = device;
    }
    if (p.events[slot] != nullptr) ++ready;
    p.busy[slot].store(0);
  }
  return ready;
}

// record() and query() run once or twice per traced call: plain CPython entry points
// (METH_NOARGS / METH_O) cost tens of nanoseconds where a pybind11 dispatch costs
// several hundred.
PyObject* py_record(PyObject*, PyObject*) { return PyLong_FromLongLong(record()); }

PyObject* py_resolve(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "resolve(start, end)");
    return nullptr;
  }
  const long long start = PyLong_AsLongLong(args[0]);
  if (start == -1 && PyErr_Occurred()) return nullptr;
  const long long end = PyLong_AsLongLong(args[1]);
  if (end == -1 && PyErr_Occurred()) return nullptr;
  return PyLong_FromLongLong(resolve(start, end));
}

PyObject* py_query(PyObject*, PyObject* arg) {
  const long long slot = PyLong_AsLongLong(arg);
  if (slot == -1 && PyErr_Occurred()) return nullptr;
  return PyLong_FromLongLong(query(slot));
}

// ---- what the C hot path borrows (hotpath_api.h) ----------------------------------

int is_cuda(PyObject* obj) {
  if (!THPVariable_Check(obj)) return -1;
  return THPVariable_Unpack(obj).is_cuda() ? 1 : 0;
}

// torch.device objects are immutable: one per (type, index) is shared by every snapshot.
PyObject* device_object(const at::Device& device) {
  static PyObject* cache[2][64] = {};
  const int kind = device.is_cuda() ? 1 : device.is_cpu() ? 0 : -1;
  const int index = device.has_index() ? device.index() : 63;
  if (kind < 0 || index < 0 || index >= 64) return THPDevice_New(device);
  PyObject*& slot = cache[kind][index];
  if (slot == nullptr) {
    slot = THPDevice_New(device);
    if (slot == nullptr) return nullptr;
  }
  Py_INCREF(slot);
  return slot;
}

PyObject* snapshot(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;  // subclasses may override attributes
  try {
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (!t.defined() || t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return nullptr;
    // Other layouts: describe.snapshot decides what their strides are.
    if (t.layout() != at::kStrided) return nullptr;
    const auto sizes = t.sizes();
    const bool strided = true;
    const int64_t ndim = static_cast<int64_t>(sizes.size());
    const int64_t nstride = strided ? ndim : 0;
    PyObject* out = PyTuple_New(3 + ndim + nstride);
    if (out == nullptr) return nullptr;
    PyObject* dtype = reinterpret_cast<PyObject*>(torch::getTHPDtype(t.scalar_type()));
    Py_INCREF(dtype);
    PyTuple_SET_ITEM(out, 0, dtype);
    PyObject* device = device_object(t.device());
    if (device == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, 1, device);
    PyTuple_SET_ITEM(out, 2, PyLong_FromLongLong(ndim));
    for (int64_t i = 0; i < ndim; ++i) PyTuple_SET_ITEM(out, 3 + i, PyLong_FromLongLong(sizes[i]));
    if (strided) {
      const auto strides = t.strides();
      for (int64_t i = 0; i < ndim; ++i)
        PyTuple_SET_ITEM(out, 3 + ndim + i, PyLong_FromLongLong(strides[i]));
    }
    for (int64_t i = 2; i < 3 + ndim + nstride; ++i) {
      if (PyTuple_GET_ITEM(out, i) == nullptr) {  // an int allocation failed
        Py_DECREF(out);
        return nullptr;
      }
    }
    return out;
  } catch (...) {
    PyErr_Clear();
    return nullptr;  // the Python snapshot handles (and reports) anything unusual
  }
}

otel_flashinfer_hotpath_api kHotpathApi = {OTEL_FLASHINFER_HOTPATH_API_VERSION, record, release,
                                           is_cuda, snapshot, resolve};

PyMethodDef kFastMethods[] = {
    {"record", py_record, METH_NOARGS, "record a pooled event on the current stream; slot or <0"},
    {"query", py_query, METH_O, "1 done, 0 pending, <0 -cudaError"},
    {"resolve", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_resolve)),
     METH_FASTCALL, "GPU ns between two slots, NOT_READY, or -cudaError (one driver call)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "otel_flashinfer: pooled CUDA timing events";
  if (PyModule_AddFunctions(m.ptr(), kFastMethods) != 0) throw pybind11::error_already_set();
  m.attr("NOT_READY") = kNotReady;
  m.def("release", &release, "return a slot to the pool");
  m.def("error_name", &error_name, "cudaGetErrorName of a (negated) code");
  m.def("capacity", &capacity, "number of slots");
  m.def("prewarm", &prewarm, "create every slot's event on the current device");
  PyObject* api = PyCapsule_New(&kHotpathApi, "otel_flashinfer.hotpath_api", nullptr);
  if (api == nullptr || PyModule_AddObject(m.ptr(), "hotpath_api", api) != 0) {
    Py_XDECREF(api);
    throw pybind11::error_already_set();
  }
}
