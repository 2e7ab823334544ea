// Level 10's copies off the caller's tensors, as one call from Python.
//
// A traced call's payload is a few tensors (q, the gathered pages' ids and fingerprints,
// the output) copied asynchronously into pinned staging buffers, with one event after
// them that the writer thread waits on.  From Python that was five torch ops a tensor
// (a flat view, two views of the buffer, the copy) and two for the event: each op lets
// go of the GIL and may wait to take it back from a writer thread, which is where the
// caller's level-10 time went.  stage_copies queues every copy and records the event in
// one call that keeps the GIL; the writer makes its views of the buffers after waiting.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <vector>

#include "stats_launch.h"

namespace otel_fi {
namespace {

// Copies nbytes[i] bytes from srcs[i]'s first element (the span its layout addresses)
// into the pinned host buffer dsts[i], on the current stream of the sources' device,
// then records a blocking-sync event there; returns the event (event_wait, then
// event_destroy).  Raises before queueing anything on a bad argument.
int64_t stage_copies(const std::vector<at::Tensor>& srcs, const std::vector<at::Tensor>& dsts,
                     const std::vector<int64_t>& nbytes) {
  TORCH_CHECK(!srcs.empty() && srcs.size() == dsts.size() && srcs.size() == nbytes.size(),
              "stage_copies: as many sources, buffers and sizes, at least one");
  const auto device = srcs[0].device();
  TORCH_CHECK(device.is_cuda(), "stage_copies: the sources must be CUDA tensors");
  for (size_t i = 0; i < srcs.size(); ++i) {
    const auto& s = srcs[i];
    const auto& d = dsts[i];
    TORCH_CHECK(s.device() == device, "stage_copies: the sources must be on one device");
    TORCH_CHECK(d.device().is_cpu() && d.is_contiguous(),
                "stage_copies: a buffer must be a contiguous host tensor");
    const int64_t have = static_cast<int64_t>(s.storage().nbytes()) -
                         s.storage_offset() * static_cast<int64_t>(s.element_size());
    TORCH_CHECK(nbytes[i] >= 0 && nbytes[i] <= have &&
                    nbytes[i] <= static_cast<int64_t>(d.nbytes()),
                "stage_copies: ", nbytes[i], " bytes past a source's storage or its buffer");
  }
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (size_t i = 0; i < srcs.size(); ++i) {
    if (nbytes[i] > 0) {
      C10_CUDA_CHECK(cudaMemcpyAsync(dsts[i].data_ptr(), srcs[i].data_ptr(),
                                     static_cast<size_t>(nbytes[i]), cudaMemcpyDeviceToHost,
                                     stream));
    }
  }
  cudaEvent_t event = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventBlockingSync | cudaEventDisableTiming));
  const cudaError_t err = cudaEventRecord(event, stream);
  if (err != cudaSuccess) {
    (void)cudaEventDestroy(event);
    C10_CUDA_CHECK(err);
  }
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(event));
}

// Waits for an event of stage_copies, sleeping (its blocking-sync flag); raises on a
// CUDA error.  Called with the GIL let go.
void event_wait(int64_t event) {
  C10_CUDA_CHECK(cudaEventSynchronize(reinterpret_cast<cudaEvent_t>(event)));
}

void event_free(int64_t event) {
  if (event) (void)cudaEventDestroy(reinterpret_cast<cudaEvent_t>(event));
}

}  // namespace

void register_blob_staging(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("gather_fingerprints", &gather_fingerprints,
        "level 10: gather a paged cache's referenced pages and fingerprint each, one launch",
        py::arg("cache"), py::arg("indices"), py::arg("n"), py::arg("weights"));
  m.def("stage_copies", &stage_copies,
        "level 10: queue a call's copies into pinned buffers and record one event",
        py::arg("srcs"), py::arg("dsts"), py::arg("nbytes"));
  m.def("event_wait", &event_wait, "wait for a stage_copies event (GIL let go)",
        py::arg("event"), py::call_guard<py::gil_scoped_release>());
  m.def("event_free", &event_free, "destroy a stage_copies event", py::arg("event"));
}

}  // namespace otel_fi
