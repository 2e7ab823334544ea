// Level 5 in a CUDA graph that is not traced on every replay: the graph nodes of its
// gated statistics launches, switched off in the instantiated graph while replays go
// untraced.  A gated launch that returns at once still costs its node's GPU time on
// every replay (about 1.5 us each, 128 on a 32-layer decode step: +17% of the step);
// a disabled node acts as an empty one (cudaGraphNodeSetEnabled).
//
// During capture each gated launch notes the node it became (the capturing stream's
// only dependency right after the launch), by its gate word's address.  The handles
// belong to the captured cudaGraph_t, so they are usable only while torch keeps it
// (CUDAGraph(keep_graph=True)); graphs.py arranges that and reads the executable graph
// from torch each time it switches.  The gate word stays as it is: switching only saves
// the GPU the empty launches, and a graph whose nodes cannot be switched keeps working
// on the word alone.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "stats_launch.h"

namespace otel_fi {
namespace {

struct GateNodes {
  std::vector<cudaGraphNode_t> nodes;
  std::vector<char> off;  // per node: switched off by us (and not back on since)
  std::vector<bool> branch;  // per node: launched on our branch stream beside its call
  bool broken = false;    // a gated launch whose node could not be told: never switch
};

std::mutex nodes_lock;
std::unordered_map<const int32_t*, GateNodes> gate_nodes_by_word;

GateNodes* find(int64_t gate) {
  auto it = gate_nodes_by_word.find(reinterpret_cast<const int32_t*>(gate));
  return it == gate_nodes_by_word.end() ? nullptr : &it->second;
}

}  // namespace

int capture_set(cudaStream_t stream, std::vector<cudaGraphNode_t>* deps) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaGraphNode_t* nodes = nullptr;
  size_t count = 0;
#if CUDART_VERSION >= 13000
  cudaError_t err = cudaStreamGetCaptureInfo(stream, &status, nullptr, nullptr, &nodes, nullptr,
                                             &count);
#else
  cudaError_t err = cudaStreamGetCaptureInfo_v2(stream, &status, nullptr, nullptr, &nodes, &count);
#endif
  deps->clear();
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // ours: torch's next launch check must not see it
    return -1;
  }
  if (status != cudaStreamCaptureStatusActive) return 0;
  deps->assign(nodes, nodes + count);
  return 1;
}

void note_gated_node(cudaStream_t stream, const int32_t* gate, bool branch) {
  if (gate == nullptr) return;
  std::vector<cudaGraphNode_t> deps;
  const int capturing = capture_set(stream, &deps);
  if (capturing == 0) return;  // eager
  std::lock_guard<std::mutex> hold(nodes_lock);
  GateNodes& entry = gate_nodes_by_word[gate];
  cudaGraphNodeType type;
  if (capturing < 0 || deps.size() != 1 || cudaGraphNodeGetType(deps[0], &type) != cudaSuccess ||
      type != cudaGraphNodeTypeKernel) {
    (void)cudaGetLastError();
    entry.broken = true;
    return;
  }
  entry.nodes.push_back(deps[0]);
  entry.off.push_back(0);
  entry.branch.push_back(branch);
}

bool gate_nodes_of(const int32_t* gate, std::vector<cudaGraphNode_t>* out,
                   std::vector<bool>* branch) {
  std::lock_guard<std::mutex> hold(nodes_lock);
  auto it = gate_nodes_by_word.find(gate);
  if (it == gate_nodes_by_word.end() || it->second.broken || it->second.nodes.empty())
    return false;
  out->assign(it->second.nodes.begin(), it->second.nodes.end());
  if (branch != nullptr) branch->assign(it->second.branch.begin(), it->second.branch.end());
  return true;
}

namespace {

// How many gated nodes the captures with this word noted; -1 if one could not be told.
int64_t gate_nodes(int64_t gate) {
  std::lock_guard<std::mutex> hold(nodes_lock);
  const GateNodes* entry = find(gate);
  if (entry == nullptr) return 0;
  return entry->broken ? -1 : static_cast<int64_t>(entry->nodes.size());
}

// Every noted node of `gate` on or off in executable graph `exec` (torch's
// raw_cuda_graph_exec of the graph they were captured into).  Affects later launches
// only: a replay already queued runs as it was.  Each node is tried, whatever the
// others did: (nodes that failed, nodes off now), the first failure's name beside.
std::tuple<int64_t, int64_t, std::string> gate_nodes_set(int64_t gate, int64_t exec, bool on) {
  TORCH_CHECK(exec != 0, "otel_flashinfer stats: no executable graph to switch");
  std::lock_guard<std::mutex> hold(nodes_lock);  // the GIL is held: no Python inside
  GateNodes* entry = find(gate);
  TORCH_CHECK(entry != nullptr && !entry->broken,
              "otel_flashinfer stats: no switchable nodes for this gate");
  const auto graph_exec = reinterpret_cast<cudaGraphExec_t>(exec);
  int64_t failed = 0, off = 0;
  std::string first;
  for (size_t i = 0; i < entry->nodes.size(); ++i) {
    cudaError_t err = cudaGraphNodeSetEnabled(graph_exec, entry->nodes[i], on ? 1 : 0);
    if (err == cudaSuccess) {
      entry->off[i] = on ? 0 : 1;
    } else {
      (void)cudaGetLastError();  // ours: torch's next launch check must not see it
      if (failed++ == 0) first = cudaGetErrorName(err);
    }
    off += entry->off[i];
  }
  return {failed, off, first};
}

// How many of `gate`'s nodes the driver says are enabled in `exec` (tests).
int64_t gate_nodes_enabled(int64_t gate, int64_t exec) {
  std::lock_guard<std::mutex> hold(nodes_lock);
  const GateNodes* entry = find(gate);
  TORCH_CHECK(entry != nullptr && exec != 0, "otel_flashinfer stats: nothing to ask about");
  int64_t enabled = 0;
  for (cudaGraphNode_t node : entry->nodes) {
    unsigned int is = 0;
    C10_CUDA_CHECK(cudaGraphNodeGetEnabled(reinterpret_cast<cudaGraphExec_t>(exec), node, &is));
    enabled += is != 0;
  }
  return enabled;
}

// The word's graph is gone (or captured again): its nodes are forgotten, so a later
// word at the same address starts empty.
void gate_nodes_forget(int64_t gate) {
  std::lock_guard<std::mutex> hold(nodes_lock);
  gate_nodes_by_word.erase(reinterpret_cast<const int32_t*>(gate));
}

}  // namespace

void register_gate_nodes(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("gate_nodes", &gate_nodes,
        "how many gated statistics nodes the capture noted for a gate word (-1: unknown)",
        py::arg("gate"));
  m.def("gate_nodes_set", &gate_nodes_set,
        "switch a gate word's statistics nodes on or off in an executable graph",
        py::arg("gate"), py::arg("exec"), py::arg("on"));
  m.def("gate_nodes_enabled", &gate_nodes_enabled,
        "how many of a gate word's nodes are enabled in an executable graph",
        py::arg("gate"), py::arg("exec"));
  m.def("gate_nodes_forget", &gate_nodes_forget, "forget a gate word's nodes",
        py::arg("gate"));
}

}  // namespace otel_fi
