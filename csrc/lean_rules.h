// How statistics nodes are taken out of a copy of a captured graph (lean_graph.cpp),
// over any graph type, so that the rule runs on the CPU too: lean_graph.cpp runs it on
// a cudaGraph_t, tests/lean_rules_harness.cpp on a plain graph that the tests build as
// stream capture would (tests/test_lean_rules.py).  No CUDA header here.
//
// `Graph` gives: `Node` (ordered by std::less), `Edge`; `deps(n)` and `dependents(n)`,
// each a vector of (node, edge data) pairs; `is_kernel(n)`; `full(e)` (a full-completion
// edge, not a programmatic one); `full_edge()`; `destroy(n)`; `add(from, to, e)`;
// `remove(from, to, e)`, false where the graph refused.  Errors throw (lean_graph.cpp's,
// or std::runtime_error here): the copy is then not made, and the nodes are switched
// instead (stats/lean_graph.py).
#pragma once

#include <algorithm>
#include <cstddef>
#include <set>
#include <stdexcept>
#include <utility>
#include <vector>

namespace otel_fi {
namespace lean_rules {

// Takes `node` out of `g`.  With `join`, each dependency becomes one of each dependent
// unless it already is, or it is a full dependency of another dependency (the order
// holds through that one).  An edge into a kernel keeps the removed node's outgoing
// edge data, so that a launch made with programmatic dependent launch (PDL) keeps it,
// as a capture without our node would have made it; an existing programmatic edge
// where a full one is needed becomes full.  Without `join` (a launch
// on our branch stream, stats/overlap.py), nothing is joined: the branch waited for
// what the call itself depends on, and whatever waited for the branch waited for the
// call too, so no order of the application's runs through it.  Joining around it left
// edges from each call to the calls after the next beside the application's PDL chain
// (the branch's launches chain from one call to the next: an event wait adds to a
// stream's dependencies), which the application's own capture did not have and which
// keep a dependent from starting early (tests/test_lean_rules.py).
template <class Graph>
void take_out(Graph& g, typename Graph::Node node, bool join) {
  using Node = typename Graph::Node;
  if (!join) {
    g.destroy(node);
    return;
  }
  const auto in = g.deps(node);
  const auto out = g.dependents(node);
  std::vector<Node> from;
  for (const auto& dep : in) {
    bool through_other = false;
    for (const auto& other : in) {
      if (other.first == dep.first || through_other) continue;
      for (const auto& b : g.deps(other.first)) {
        if (b.first == dep.first && Graph::full(b.second)) {
          through_other = true;
          break;
        }
      }
    }
    if (!through_other) from.push_back(dep.first);
  }
  g.destroy(node);
  for (const auto& to : out) {
    const auto has = g.deps(to.first);
    for (const Node& d : from) {
      auto data = Graph::full_edge();  // full completion, unless a kernel-to-kernel edge had less
      if (!Graph::full(to.second) && g.is_kernel(d) && g.is_kernel(to.first)) data = to.second;
      const auto it = std::find_if(has.begin(), has.end(),
                                   [&](const auto& h) { return h.first == d; });
      if (it != has.end()) {
        if (Graph::full(it->second) || !Graph::full(data)) continue;
        if (!g.remove(d, to.first, it->second))  // a weaker order than needed: no copy
          throw std::runtime_error("could not make a programmatic edge a full one");
      }
      g.add(d, to.first, data);
    }
  }
}

// Takes every node of `nodes` out of `g` (take_out; `join[i]` false for one launched on
// our branch), each once; returns how many.  The branch's launches go first: a launch
// joined around may leave out a dependency that is a full one of a branch launch beside
// it (the order held through that one), and taking that branch launch out afterwards
// without a join would lose the order.  With the branch's launches gone first, the
// joins see only what the application's own capture had around them.
template <class Graph>
size_t take_out_all(Graph& g, const std::vector<typename Graph::Node>& nodes,
                    const std::vector<bool>& join) {
  std::set<typename Graph::Node> gone;
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < nodes.size(); ++i) {
      const bool joined = i < join.size() ? join[i] : true;
      if (joined != (pass == 1) || gone.count(nodes[i])) continue;  // noted twice: once
      gone.insert(nodes[i]);
      take_out(g, nodes[i], joined);
    }
  }
  return gone.size();
}

}  // namespace lean_rules
}  // namespace otel_fi
