// What an untraced replay's gated statistics launches cost the GPU, against the same
// launches inside CUDA conditional (IF) nodes that the replay skips, and against their
// nodes disabled in the instantiated graph.
//
// A stand-in for the 32-layer decode step: 64 "work" kernels in a row on one stream,
// each with a statistics-like launch before and after it (a wave of blocks, 3 per SM),
// captured with stream capture as torch does, replayed back to back.  Variants:
//   bare    the 64 work kernels only
//   gated   + 128 launches that read a gate word and return at once (today's gate)
//   gated1  the same with one block each (does the grid's size matter?)
//   ifeach  each launch in an IF node, its condition set by a 1-thread kernel before it
//   ifone   each launch in an IF node, all 128 conditions set by one kernel at the start
//   off     the gated launches' nodes disabled in the instantiated graph
//           (cudaGraphNodeSetEnabled: the graph must be kept, torch's keep_graph=True),
//           enabled again for a traced replay; the host's time to switch all 128 is
//           printed too
// Each variant also runs with the gate open once, and its body kernels count their
// blocks, so the probe checks that a closed gate skips every body and an open one runs
// every body ("off": disabled nodes run nothing though the word says yes).
// Build: nvcc -O2 -arch=sm_90 -o cond_nodes cond_nodes.cu
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                          \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x,                  \
                   cudaGetErrorString(e_));                                            \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

__global__ void work(float* buf, int n, int iters) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = buf[i];
  for (int k = 0; k < iters; ++k) v = v * 0.999f + 0.001f;
  buf[i] = v;
}

// The statistics stand-in: leaves at once when the gate says no; else counts its block.
__global__ void stats(const int* gate, unsigned long long* ran) {
  if (gate != nullptr && __ldcg(gate) == 0) return;
  if (threadIdx.x == 0) atomicAdd(ran, 1ull);
}

__global__ void set_one(cudaGraphConditionalHandle h, const int* gate) {
  cudaGraphSetConditional(h, __ldcg(gate) != 0);
}

__global__ void set_all(const cudaGraphConditionalHandle* hs, const int* count, const int* gate) {
  unsigned v = __ldcg(gate) != 0;
  for (int k = threadIdx.x; k < *count; k += blockDim.x) cudaGraphSetConditional(hs[k], v);
}

enum Variant { kBare, kGated, kGated1, kIfEach, kIfOne, kOff, kVariants };
static const char* kNames[] = {"bare", "gated", "gated1", "ifeach", "ifone", "off"};

// An instantiated variant; "off" keeps its graph and its launches' nodes.
struct Built {
  cudaGraphExec_t exec = nullptr;
  cudaGraph_t graph = nullptr;
  std::vector<cudaGraphNode_t> nodes;
};

// The nodes of `b`'s gated launches on (traced) or off.
static void set_enabled(const Built& b, bool on) {
  for (cudaGraphNode_t n : b.nodes) CK(cudaGraphNodeSetEnabled(b.exec, n, on ? 1 : 0));
}

// The node the launch just captured on `s` (its only dependency now).
static cudaGraphNode_t last_node(cudaStream_t s) {
  cudaStreamCaptureStatus st;
  const cudaGraphNode_t* deps;
  size_t ndeps;
  CK(cudaStreamGetCaptureInfo(s, &st, nullptr, nullptr, &deps, nullptr, &ndeps));
  if (ndeps != 1) {
    std::fprintf(stderr, "expected one dependency, got %zu\n", ndeps);
    std::exit(1);
  }
  return deps[0];
}

struct Setup {
  float* buf;
  int n, iters, work_blocks, stats_blocks;
  int* gate;
  unsigned long long* ran;
  cudaGraphConditionalHandle* handles;  // device array (ifone)
  int* count;                           // device (ifone)
  cudaStream_t side;
};

// One statistics launch inside an IF node of the graph `s` is capturing into; with
// `setter`, a 1-thread kernel before the node sets its condition from the gate word.
static cudaGraphConditionalHandle if_launch(cudaStream_t s, const Setup& u, int blocks,
                                            bool setter) {
  cudaStreamCaptureStatus st;
  cudaGraph_t graph;
  CK(cudaStreamGetCaptureInfo(s, &st, nullptr, &graph, nullptr, nullptr, nullptr));
  cudaGraphConditionalHandle h;
  CK(cudaGraphConditionalHandleCreate(&h, graph, 0, cudaGraphCondAssignDefault));
  if (setter) set_one<<<1, 1, 0, s>>>(h, u.gate);
  const cudaGraphNode_t* deps;
  size_t ndeps;
  CK(cudaStreamGetCaptureInfo(s, &st, nullptr, &graph, &deps, nullptr, &ndeps));
  cudaGraphNodeParams p = {};
  p.type = cudaGraphNodeTypeConditional;
  p.conditional.handle = h;
  p.conditional.type = cudaGraphCondTypeIf;
  p.conditional.size = 1;
  cudaGraphNode_t node;
  CK(cudaGraphAddNode(&node, graph, deps, nullptr, ndeps, &p));
  CK(cudaStreamBeginCaptureToGraph(u.side, p.conditional.phGraph_out[0], nullptr, nullptr,
                                   0, cudaStreamCaptureModeRelaxed));
  stats<<<blocks, 256, 0, u.side>>>(nullptr, u.ran);
  CK(cudaGetLastError());
  cudaGraph_t done;
  CK(cudaStreamEndCapture(u.side, &done));
  CK(cudaStreamUpdateCaptureDependencies(s, &node, nullptr, 1,
                                         cudaStreamSetCaptureDependencies));
  return h;
}

static Built build(Variant v, cudaStream_t s, const Setup& u) {
  Built b;
  std::vector<cudaGraphConditionalHandle> hs;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  if (v == kIfOne) set_all<<<1, 128, 0, s>>>(u.handles, u.count, u.gate);
  for (int layer = 0; layer < 64; ++layer) {
    for (int side = 0; side < 2; ++side) {
      if (side == 1) work<<<u.work_blocks, 256, 0, s>>>(u.buf, u.n, u.iters);
      switch (v) {
        case kBare: break;
        case kGated: stats<<<u.stats_blocks, 256, 0, s>>>(u.gate, u.ran); break;
        case kGated1: stats<<<1, 256, 0, s>>>(u.gate, u.ran); break;
        case kIfEach: if_launch(s, u, u.stats_blocks, true); break;
        case kIfOne: hs.push_back(if_launch(s, u, u.stats_blocks, false)); break;
        case kOff:
          stats<<<u.stats_blocks, 256, 0, s>>>(u.gate, u.ran);
          b.nodes.push_back(last_node(s));
          break;
        default: break;
      }
    }
  }
  cudaGraph_t g;
  CK(cudaStreamEndCapture(s, &g));
  if (v == kIfOne) {
    int count = static_cast<int>(hs.size());
    CK(cudaMemcpy(u.handles, hs.data(), hs.size() * sizeof(hs[0]), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(u.count, &count, sizeof(int), cudaMemcpyHostToDevice));
  }
  CK(cudaGraphInstantiate(&b.exec, g, 0));
  if (v == kOff)
    b.graph = g;  // its nodes name the launches to switch
  else
    CK(cudaGraphDestroy(g));
  return b;
}

int main(int argc, char** argv) {
  int replays = argc > 1 ? std::atoi(argv[1]) : 2000;
  int iters = argc > 2 ? std::atoi(argv[2]) : 200;
  int dev = 0, sms = 0;
  CK(cudaSetDevice(dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  Setup u{};
  u.n = sms * 256 * 2;
  u.iters = iters;
  u.work_blocks = (u.n + 255) / 256;
  u.stats_blocks = sms * 3;
  CK(cudaMalloc(&u.buf, u.n * sizeof(float)));
  CK(cudaMemset(u.buf, 0, u.n * sizeof(float)));
  CK(cudaMalloc(&u.gate, sizeof(int)));
  CK(cudaMalloc(&u.ran, sizeof(unsigned long long)));
  CK(cudaMalloc(&u.handles, 256 * sizeof(cudaGraphConditionalHandle)));
  CK(cudaMalloc(&u.count, sizeof(int)));
  CK(cudaStreamCreateWithFlags(&u.side, cudaStreamNonBlocking));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::printf("sms %d, stats blocks %d, work iters %d, %d replays\n", sms, u.stats_blocks,
              iters, replays);
  Built built[kVariants];
  for (int v = 0; v < kVariants; ++v) built[v] = build(static_cast<Variant>(v), s, u);
  // correctness: the closed gate runs no body, the open one all of them
  for (int v = 1; v < kVariants; ++v) {
    unsigned long long got[2];
    for (int open = 0; open < 2; ++open) {
      CK(cudaMemsetAsync(u.gate, 0, sizeof(int), s));
      if (open || v == kOff) CK(cudaMemsetAsync(u.gate, 1, 1, s));
      if (v == kOff) set_enabled(built[v], open);
      CK(cudaMemsetAsync(u.ran, 0, sizeof(unsigned long long), s));
      CK(cudaGraphLaunch(built[v].exec, s));
      CK(cudaMemcpyAsync(&got[open], u.ran, sizeof(got[0]), cudaMemcpyDeviceToHost, s));
      CK(cudaStreamSynchronize(s));
    }
    long want = 128L * (v == kGated1 ? 1 : u.stats_blocks);
    std::printf("check %-7s closed ran %llu blocks, open ran %llu (want 0 and %ld): %s\n",
                kNames[v], got[0], got[1], want,
                got[0] == 0 && got[1] == static_cast<unsigned long long>(want) ? "ok"
                                                                               : "WRONG");
  }
  CK(cudaMemsetAsync(u.gate, 0, sizeof(int), s));
  CK(cudaStreamSynchronize(s));
  // the host's time to switch every gated node of "off" (twice per traced replay)
  const int switches = 200;
  auto t0 = std::chrono::steady_clock::now();
  for (int k = 0; k < switches; ++k) set_enabled(built[kOff], k % 2 == 1);
  const double switch_us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
      switches;
  std::printf("off: switching %zu nodes took %.1f us on the host\n", built[kOff].nodes.size(),
              switch_us);
  set_enabled(built[kOff], false);
  // timing: rounds interleave the variants; the gate stays closed (untraced replays)
  const int rounds = 5;
  double best[kVariants], sum[kVariants];
  for (int v = 0; v < kVariants; ++v) best[v] = 1e30, sum[v] = 0;
  for (int r = 0; r < rounds; ++r) {
    for (int v = 0; v < kVariants; ++v) {
      for (int k = 0; k < 20; ++k) CK(cudaGraphLaunch(built[v].exec, s));
      CK(cudaEventRecord(a, s));
      for (int k = 0; k < replays; ++k) CK(cudaGraphLaunch(built[v].exec, s));
      CK(cudaEventRecord(b, s));
      CK(cudaEventSynchronize(b));
      float ms;
      CK(cudaEventElapsedTime(&ms, a, b));
      double us = 1000.0 * ms / replays;
      sum[v] += us;
      if (us < best[v]) best[v] = us;
    }
  }
  for (int v = 0; v < kVariants; ++v)
    std::printf("%-7s %8.2f us/replay (best of %d: %8.2f)  vs bare %+6.2f%%\n", kNames[v],
                sum[v] / rounds, rounds, best[v], 100.0 * (sum[v] / sum[kBare] - 1.0));
  return 0;
}
