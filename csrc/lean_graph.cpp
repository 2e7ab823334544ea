// Level 5 in a sampled CUDA graph: a second executable graph without the statistics
// nodes, for the replays that are not traced.  A disabled node (gate_nodes.cpp) still
// costs about 0.33 us of GPU a replay (128 of them: +5.4% of a 32-layer decode step on
// an H200), and switching them costs 0.5 us of host time each way.  A graph with the
// nodes left out costs nothing: untraced replays launch it, traced ones torch's.
//
// The captured cudaGraph_t (kept by torch, keep_graph=True) is cloned, each noted gated
// node, and each node that zeroes their rows, is taken out of the clone, its
// dependencies joined to its dependents unless it ran on our branch stream
// (lean_rules.h, tested on the CPU), and the clone is instantiated.  Both executables
// run the same kernels on the same memory, that of torch's graph pool, so one must
// never outlive torch's graph: graphs.py drops it on reset, recapture and the graph's
// end.  Whether a replay may skip torch's own replay (its RNG prologue) is decided in
// Python (stats/lean_graph.py).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <tuple>
#include <utility>
#include <vector>

#include "lean_rules.h"
#include "stats_launch.h"

namespace otel_fi {
namespace {

#if CUDART_VERSION >= 12030
constexpr bool kLeanSupported = true;

// The graph-edge calls with edge data: CUDA 12.3 to 12.9 name them `_v2`, CUDA 13 drops
// the suffix (same arguments).
#if CUDART_VERSION >= 13000
#define OFI_EDGE_API(name) name
#else
#define OFI_EDGE_API(name) name##_v2
#endif

void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();  // ours: torch's next launch check must not see it
  TORCH_CHECK(false, "otel_flashinfer stats: ", what, ": ", cudaGetErrorName(err));
}

// A cudaGraph_t as lean_rules.h sees it.
struct CudaGraph {
  using Node = cudaGraphNode_t;
  using Edge = cudaGraphEdgeData;
  using Edges = std::vector<std::pair<Node, Edge>>;
  cudaGraph_t graph;

  static Edges edges_of(Node node, bool dependencies) {
    size_t n = 0;
    auto get = [&](Node* nodes, Edge* data, size_t* count) {
      return dependencies ? OFI_EDGE_API(cudaGraphNodeGetDependencies)(node, nodes, data, count)
                          : OFI_EDGE_API(cudaGraphNodeGetDependentNodes)(node, nodes, data,
                                                                         count);
    };
    check(get(nullptr, nullptr, &n), "could not read a graph node's edges");
    std::vector<Node> nodes(n);
    std::vector<Edge> data(n);
    if (n > 0) check(get(nodes.data(), data.data(), &n), "could not read a graph node's edges");
    Edges e;
    for (size_t i = 0; i < n; ++i) e.emplace_back(nodes[i], data[i]);
    return e;
  }
  Edges deps(Node n) const { return edges_of(n, true); }
  Edges dependents(Node n) const { return edges_of(n, false); }
  bool is_kernel(Node n) const {
    cudaGraphNodeType type;
    if (cudaGraphNodeGetType(n, &type) == cudaSuccess) return type == cudaGraphNodeTypeKernel;
    (void)cudaGetLastError();  // ours: torch's next launch check must not see it
    return false;
  }
  static bool full(const Edge& d) {
    return d.from_port == 0 && d.to_port == 0 && d.type == cudaGraphDependencyTypeDefault;
  }
  static Edge full_edge() { return Edge{}; }
  void destroy(Node n) {
    check(cudaGraphDestroyNode(n), "could not take a statistics node out of a graph");
  }
  void add(Node from, Node to, const Edge& data) {
    cudaError_t err = OFI_EDGE_API(cudaGraphAddDependencies)(graph, &from, &to, &data, 1);
    check(err, "could not join a graph around a statistics node");
  }
  bool remove(Node from, Node to, const Edge& data) {
    cudaError_t err = OFI_EDGE_API(cudaGraphRemoveDependencies)(graph, &from, &to, &data, 1);
    if (err != cudaSuccess) (void)cudaGetLastError();
    return err == cudaSuccess;
  }
  std::vector<std::tuple<Node, Node, Edge>> edges() const {
    size_t n = 0;
    check(OFI_EDGE_API(cudaGraphGetEdges)(graph, nullptr, nullptr, nullptr, &n),
          "could not count edges");
    std::vector<Node> from(n), to(n);
    std::vector<Edge> data(n);
    if (n > 0)
      check(OFI_EDGE_API(cudaGraphGetEdges)(graph, from.data(), to.data(), data.data(), &n),
            "could not read a graph's edges");
    std::vector<std::tuple<Node, Node, Edge>> all;
    for (size_t i = 0; i < n; ++i) all.emplace_back(from[i], to[i], data[i]);
    return all;
  }
};

// (nodes, edges, programmatic edges) of `graph`: what a copy kept of the capture's
// programmatic dependent launches, beside the graph without statistics (probes, tests).
std::tuple<int64_t, int64_t, int64_t> edge_counts(cudaGraph_t graph) {
  size_t nodes = 0;
  check(cudaGraphGetNodes(graph, nullptr, &nodes), "could not count a graph's nodes");
  const auto edges = CudaGraph{graph}.edges();
  int64_t programmatic = 0;
  for (const auto& e : edges) programmatic += !CudaGraph::full(std::get<2>(e));
  return {static_cast<int64_t>(nodes), static_cast<int64_t>(edges.size()), programmatic};
}

std::tuple<int64_t, int64_t, int64_t> graph_edge_counts(int64_t graph) {
  TORCH_CHECK(graph != 0, "otel_flashinfer stats: no graph");
  return edge_counts(reinterpret_cast<cudaGraph_t>(graph));
}

// A cudaGraph_t destroyed with it.
struct OwnedGraph {
  cudaGraph_t graph = nullptr;
  explicit OwnedGraph(cudaGraph_t g) : graph(g) {}
  OwnedGraph(const OwnedGraph&) = delete;
  OwnedGraph& operator=(const OwnedGraph&) = delete;
  OwnedGraph(OwnedGraph&& other) noexcept : graph(other.graph) { other.graph = nullptr; }
  ~OwnedGraph() {
    if (graph != nullptr) (void)cudaGraphDestroy(graph);
  }
};

// A clone of `graph` (torch's raw_cuda_graph()) without the nodes noted for `gates` and
// the `extra` nodes (those zeroing the statistics rows), and how many were taken out.
// `join_branch` joins around our branch's launches too, as the tenth session's copy did
// (probes only).  Raises where any gate's nodes are not all known, a node is not in the
// graph, or the graph refuses an edit.
std::pair<OwnedGraph, size_t> lean_clone(int64_t graph, const std::vector<int64_t>& gates,
                                         bool join_branch, const std::vector<int64_t>& extra) {
  TORCH_CHECK(graph != 0, "otel_flashinfer stats: no captured graph to copy");
  // `extra` (capture_tail_node's) are joined around, as our launches on the call's own
  // stream are.  torch.zeros on CUDA is a fill kernel: taken out, it hands on its edge
  // into the next node, programmatic where that is a kernel launched with PDL (as the
  // application's own capture had it; tests/test_lean_rules.py).  A memset would hand on
  // a full edge: an order kept, an early start lost, and still no slower than the node.
  std::vector<cudaGraphNode_t> nodes;
  std::vector<bool> join(extra.size(), true);  // per node: false for a launch on our branch
  for (int64_t node : extra) nodes.push_back(reinterpret_cast<cudaGraphNode_t>(node));
  for (int64_t gate : gates) {
    std::vector<cudaGraphNode_t> of;
    std::vector<bool> branch;
    TORCH_CHECK(gate_nodes_of(reinterpret_cast<const int32_t*>(gate), &of, &branch),
                "otel_flashinfer stats: a gate's statistics nodes are not all known");
    nodes.insert(nodes.end(), of.begin(), of.end());
    for (size_t i = 0; i < of.size(); ++i)
      join.push_back(join_branch || i >= branch.size() || !branch[i]);
  }
  TORCH_CHECK(nodes.size() > extra.size(),
              "otel_flashinfer stats: no statistics nodes to leave out");
  cudaGraph_t raw = nullptr;
  check(cudaGraphClone(&raw, reinterpret_cast<cudaGraph_t>(graph)), "could not copy a graph");
  OwnedGraph clone(raw);
  std::vector<cudaGraphNode_t> copies;
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNode_t copy = nullptr;
    check(cudaGraphNodeFindInClone(&copy, node, raw),
          "a statistics node is not in the captured graph");
    copies.push_back(copy);
  }
  CudaGraph g{raw};
  const size_t removed = lean_rules::take_out_all(g, copies, join);
  return {std::move(clone), removed};
}

// (executable graph, nodes taken out, the copy's nodes, edges and programmatic edges)
// for `graph` without the nodes noted for `gates` (lean_clone).  Raises where the copy
// cannot be made, or the driver refuses it (a graph with memory nodes cannot be
// instantiated twice): the caller then switches nodes instead.
std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t> lean_graph_make(
    int64_t graph, const std::vector<int64_t>& gates, bool join_branch,
    const std::vector<int64_t>& extra) {
  const auto [clone, removed] = lean_clone(graph, gates, join_branch, extra);
  std::tuple<int64_t, int64_t, int64_t> counts{-1, -1, -1};
  try {
    counts = edge_counts(clone.graph);  // for probes and tests: never refuses the copy
  } catch (const c10::Error&) {
  }
  // As torch instantiates its own (CUDAGraph::instantiate); the executable graph does
  // not need the clone, which goes with `clone`.
  cudaGraphExec_t exec = nullptr;
  check(cudaGraphInstantiate(&exec, clone.graph,
                             cudaGraphInstantiateFlagAutoFreeOnLaunch |
                                 cudaGraphInstantiateFlagUseNodePriority),
        "could not instantiate a graph without statistics");
  return {reinterpret_cast<int64_t>(exec), static_cast<int64_t>(removed),
          std::get<0>(counts), std::get<1>(counts), std::get<2>(counts)};
}

// (each node's key, each edge as (from, to, programmatic)) of `graph`, nodes in the
// graph's own order: a kernel node's key is its function's address (0 where the driver
// will not say), any other node's -1 - its type.  So that tests can compare two graphs
// edge by edge, naming each node by its key and how many of that key came before it.
using EdgeList = std::tuple<std::vector<int64_t>, std::vector<std::tuple<int64_t, int64_t, bool>>>;

EdgeList edge_list(cudaGraph_t graph) {
  size_t n = 0;
  check(cudaGraphGetNodes(graph, nullptr, &n), "could not count a graph's nodes");
  std::vector<cudaGraphNode_t> nodes(n);
  if (n > 0) check(cudaGraphGetNodes(graph, nodes.data(), &n), "could not list a graph's nodes");
  std::map<cudaGraphNode_t, int64_t> index;
  std::vector<int64_t> keys;
  for (size_t i = 0; i < n; ++i) {
    index[nodes[i]] = static_cast<int64_t>(i);
    cudaGraphNodeType type;
    check(cudaGraphNodeGetType(nodes[i], &type), "could not read a node's type");
    int64_t key = -1 - static_cast<int64_t>(type);
    if (type == cudaGraphNodeTypeKernel) {
      cudaKernelNodeParams params{};
      if (cudaGraphKernelNodeGetParams(nodes[i], &params) == cudaSuccess) {
        key = reinterpret_cast<int64_t>(params.func);
      } else {
        (void)cudaGetLastError();
        key = 0;
      }
    }
    keys.push_back(key);
  }
  std::vector<std::tuple<int64_t, int64_t, bool>> edges;
  for (const auto& [from, to, data] : CudaGraph{graph}.edges())
    edges.emplace_back(index.at(from), index.at(to), !CudaGraph::full(data));
  return {keys, edges};
}

EdgeList graph_edge_list(int64_t graph) {
  TORCH_CHECK(graph != 0, "otel_flashinfer stats: no graph");
  return edge_list(reinterpret_cast<cudaGraph_t>(graph));
}

// The edge list of the copy lean_graph_make would instantiate (tests, probes).
EdgeList lean_graph_edge_list(int64_t graph, const std::vector<int64_t>& gates,
                              bool join_branch, const std::vector<int64_t>& extra) {
  return edge_list(lean_clone(graph, gates, join_branch, extra).first.graph);
}

// `stream`'s capture dependencies (capture_set), or none where it is not capturing.
std::vector<int64_t> capture_deps(int64_t stream) {
  std::vector<cudaGraphNode_t> deps;
  capture_set(reinterpret_cast<cudaStream_t>(stream), &deps);
  std::vector<int64_t> out;
  for (cudaGraphNode_t n : deps) out.push_back(reinterpret_cast<int64_t>(n));
  return out;
}

// The one node that `stream`'s capture made since its dependency set was `before`
// (capture_deps'), where it is a kernel or memset node depending on exactly `before`;
// else 0 (not capturing, no node, or more than one).  graph_rows.py asks it around the
// torch.zeros that zero the statistics rows, which only traced replays need, so that
// the copy leaves that node out too (lean_graph_make's `extra`).
int64_t capture_tail_node(int64_t stream, const std::vector<int64_t>& before) {
  std::vector<cudaGraphNode_t> now;
  if (capture_set(reinterpret_cast<cudaStream_t>(stream), &now) != 1 || now.size() != 1)
    return 0;
  cudaGraphNodeType type;
  if (cudaGraphNodeGetType(now[0], &type) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  if (type != cudaGraphNodeTypeKernel && type != cudaGraphNodeTypeMemset) return 0;
  std::vector<int64_t> deps;
  try {
    for (const auto& d : CudaGraph::edges_of(now[0], true))
      deps.push_back(reinterpret_cast<int64_t>(d.first));
  } catch (const c10::Error&) {
    return 0;
  }
  std::vector<int64_t> want(before);
  std::sort(deps.begin(), deps.end());
  std::sort(want.begin(), want.end());
  return deps == want ? reinterpret_cast<int64_t>(now[0]) : 0;
}

// Edges from `head` to every root of `graph` but itself, in one call; false (the error
// cleared) where they could not be added.
bool head_before_roots(cudaGraph_t graph, cudaGraphNode_t head) {
  size_t count = 0;
  if (cudaGraphGetRootNodes(graph, nullptr, &count) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  std::vector<cudaGraphNode_t> roots(count);
  if (count > 0 && cudaGraphGetRootNodes(graph, roots.data(), &count) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  roots.resize(count);
  roots.erase(std::remove(roots.begin(), roots.end(), head), roots.end());
  if (roots.empty()) return true;
  std::vector<cudaGraphNode_t> from(roots.size(), head);
  if (OFI_EDGE_API(cudaGraphAddDependencies)(graph, from.data(), roots.data(), nullptr,
                                             roots.size()) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return true;
}

// A kernel node writing the GPU clock into device word `word` on each replay, added to
// the graph that `stream` captures into, ahead of every node captured so far (its roots)
// and of what the stream captures next: the replay's start, which the snapshot kernel
// copies into the slot beside its own start (graph_rows.GraphRows.times_replay).  Added
// at the capture's first statistics launch, so that graphs without FlashInfer calls get
// no node; CUDA permits adding nodes and edges to a graph while it is captured (not
// removing them).  Returns (state, node, graph): state 0, no node (not capturing, or the
// driver refused); 1, the node is ahead of everything so far; 2, the node is in the graph
// but not ordered (it still writes `word` on every replay: the caller keeps the word as
// long as the graph).  Roots that later captures add are ordered at the capture's end
// (head_stamp_order).  Never throws once the node is added.
std::tuple<int64_t, int64_t, int64_t> head_stamp_node(int64_t device, int64_t stream_handle,
                                                      int64_t word) {
  TORCH_CHECK(word != 0 && word % 8 == 0, "otel_flashinfer stats: bad head stamp address");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaGraph_t graph = nullptr;
  size_t deps = 0;  // the count alone: no "lossy query" over edge data
#if CUDART_VERSION >= 13000
  cudaError_t err = cudaStreamGetCaptureInfo(stream, &status, nullptr, &graph, nullptr, nullptr,
                                             &deps);
#else
  cudaError_t err = cudaStreamGetCaptureInfo_v2(stream, &status, nullptr, &graph, nullptr,
                                                &deps);
#endif
  if (err != cudaSuccess || status != cudaStreamCaptureStatusActive || graph == nullptr) {
    (void)cudaGetLastError();  // ours: torch's next launch check must not see it
    return {0, 0, 0};
  }
  void* word_arg = reinterpret_cast<void*>(word);
  void* args[] = {&word_arg};
  cudaKernelNodeParams params{};
  params.func = const_cast<void*>(head_stamp_kernel_fn());
  params.gridDim = dim3(1);
  params.blockDim = dim3(1);
  params.kernelParams = args;
  cudaGraphNode_t head = nullptr;
  if (cudaGraphAddKernelNode(&head, graph, nullptr, 0, &params) != cudaSuccess) {
    (void)cudaGetLastError();
    return {0, 0, 0};
  }
  bool ordered = head_before_roots(graph, head);
  // A stream with no dependencies (an empty graph, or a stream that joined with none)
  // would start its next node beside the head: it waits for the head instead.
  if (ordered && deps == 0 &&
      OFI_EDGE_API(cudaStreamUpdateCaptureDependencies)(stream, &head, nullptr, 1,
                                                        cudaStreamAddCaptureDependencies) !=
          cudaSuccess) {
    (void)cudaGetLastError();
    ordered = false;
  }
  return {ordered ? 1 : 2, reinterpret_cast<int64_t>(head), reinterpret_cast<int64_t>(graph)};
}

// At the capture's end, while it is still open: the head (head_stamp_node's) ahead of the
// roots that captures after it added.  False where that failed (the error cleared).
bool head_stamp_order(int64_t graph, int64_t head) {
  return head_before_roots(reinterpret_cast<cudaGraph_t>(graph),
                           reinterpret_cast<cudaGraphNode_t>(head));
}
#else
constexpr bool kLeanSupported = false;

std::tuple<int64_t, int64_t, int64_t> head_stamp_node(int64_t, int64_t, int64_t) {
  return {0, 0, 0};
}

bool head_stamp_order(int64_t, int64_t) { return false; }

std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t> lean_graph_make(
    int64_t, const std::vector<int64_t>&, bool, const std::vector<int64_t>&) {
  TORCH_CHECK(false, "otel_flashinfer stats: a graph without statistics needs CUDA 12.3");
}

std::tuple<int64_t, int64_t, int64_t> graph_edge_counts(int64_t) {
  TORCH_CHECK(false, "otel_flashinfer stats: edge data needs CUDA 12.3");
}

using EdgeList = std::tuple<std::vector<int64_t>, std::vector<std::tuple<int64_t, int64_t, bool>>>;

EdgeList graph_edge_list(int64_t) {
  TORCH_CHECK(false, "otel_flashinfer stats: edge data needs CUDA 12.3");
}

EdgeList lean_graph_edge_list(int64_t, const std::vector<int64_t>&, bool,
                              const std::vector<int64_t>&) {
  TORCH_CHECK(false, "otel_flashinfer stats: a graph without statistics needs CUDA 12.3");
}

std::vector<int64_t> capture_deps(int64_t) { return {}; }

int64_t capture_tail_node(int64_t, const std::vector<int64_t>&) { return 0; }
#endif

void lean_graph_destroy(int64_t exec) {
  // An executable graph still running is freed when it completes (CUDA).
  if (exec != 0) (void)cudaGraphExecDestroy(reinterpret_cast<cudaGraphExec_t>(exec));
}

}  // namespace

// Launches `exec` on torch's current stream of `device`, as torch's replay launches its
// own; 0, or the CUDA error (cleared), or -1 for one of torch's.  Needs no GIL: the C
// replay gate (hotpath.c) calls it through the capsule with the GIL released.
extern "C" int otel_fi_lean_launch(int64_t exec, int device) {
  try {
    int current = -1;
    if (cudaGetDevice(&current) != cudaSuccess) {
      (void)cudaGetLastError();
      current = -1;
    }
    if (current != device) {
      cudaError_t err = cudaSetDevice(device);
      if (err != cudaSuccess) {
        (void)cudaGetLastError();
        return static_cast<int>(err);
      }
    }
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
    cudaError_t err = cudaGraphLaunch(reinterpret_cast<cudaGraphExec_t>(exec), stream);
    if (current >= 0 && current != device) (void)cudaSetDevice(current);
    if (err != cudaSuccess) (void)cudaGetLastError();
    return static_cast<int>(err);
  } catch (...) {
    return -1;
  }
}

namespace {

void lean_graph_launch(int64_t exec, int64_t device) {
  TORCH_CHECK(exec != 0, "otel_flashinfer stats: no graph to launch");
  int err = 0;
  {
    pybind11::gil_scoped_release release;
    err = otel_fi_lean_launch(exec, static_cast<int>(device));
  }
  TORCH_CHECK(err == 0, "otel_flashinfer stats: could not launch a graph without statistics: ",
              err > 0 ? cudaGetErrorName(static_cast<cudaError_t>(err)) : "torch error");
}

}  // namespace

void register_lean_graph(pybind11::module_& m) {
  namespace py = pybind11;
  m.attr("LEAN_GRAPHS") = kLeanSupported;
  m.def("lean_graph_make", &lean_graph_make,
        "an executable copy of a captured graph without its gated statistics nodes",
        py::arg("graph"), py::arg("gates"), py::arg("join_branch") = false,
        py::arg("extra") = std::vector<int64_t>{});
  m.def("capture_deps", &capture_deps, "a capturing stream's dependency set",
        py::arg("stream"));
  m.def("head_stamp_node", &head_stamp_node,
        "a node writing the GPU clock into a word, ahead of a capture's nodes so far: "
        "(0 none, 1 ordered, 2 not ordered; node; graph)",
        pybind11::arg("device"), pybind11::arg("stream"), pybind11::arg("word"));
  m.def("head_stamp_order", &head_stamp_order,
        "at a capture's end: the head node ahead of the roots added after it",
        pybind11::arg("graph"), pybind11::arg("head"));
  m.def("capture_tail_node", &capture_tail_node,
        "the one kernel or memset node a stream's capture made since its set was `before`, "
        "or 0",
        py::arg("stream"), py::arg("before"));
  m.def("graph_edge_counts", &graph_edge_counts,
        "(nodes, edges, programmatic edges) of a cudaGraph_t", py::arg("graph"));
  m.def("graph_edge_list", &graph_edge_list,
        "(node keys, edges as (from, to, programmatic)) of a cudaGraph_t", py::arg("graph"));
  m.def("lean_graph_edge_list", &lean_graph_edge_list,
        "the edge list of the copy lean_graph_make would instantiate", py::arg("graph"),
        py::arg("gates"), py::arg("join_branch") = false,
        py::arg("extra") = std::vector<int64_t>{});
  m.def("lean_graph_destroy", &lean_graph_destroy, "free an executable graph",
        py::arg("exec"));
  m.def("lean_graph_launch", &lean_graph_launch,
        "launch an executable graph on the current stream of a device", py::arg("exec"),
        py::arg("device"));
  PyObject* fn = PyCapsule_New(reinterpret_cast<void*>(&otel_fi_lean_launch),
                               "otel_flashinfer.lean_launch", nullptr);
  if (fn == nullptr || PyModule_AddObject(m.ptr(), "lean_launch", fn) != 0) {
    Py_XDECREF(fn);
    throw py::error_already_set();
  }
}

}  // namespace otel_fi
