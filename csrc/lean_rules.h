// How statistics nodes are taken out of a copy of a captured graph (lean_graph.cpp),
// over any graph type, so that the rule runs on the CPU too: lean_graph.cpp runs it on
// a cudaGraph_t, tests/lean_rules_harness.cpp on a plain graph that the tests build as
// stream capture would (tests/test_lean_rules.py).  No CUDA header here.
//
// `Graph` gives: `Node` (ordered by <), `Edge`; `deps(n)` and `dependents(n)`, each a
// vector of (node, edge data) pairs; `is_kernel(n)`; `full(e)` (a full-completion edge,
// not a programmatic one); `full_edge()`; `destroy(n)`; `add(from, to, e)`;
// `remove(from, to, e)`.  Errors are the graph's (lean_graph.cpp's throw).
#pragma once

#include <algorithm>
#include <cstddef>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

namespace otel_fi {
namespace lean_rules {

template <class Graph>
using Added = std::vector<std::tuple<typename Graph::Node, typename Graph::Node,
                                     typename Graph::Edge>>;

// Takes `node` out of `g`: each dependency becomes one of each dependent (noted in
// `added`), unless it already is, or it is a full dependency of another dependency (the
// order holds through that one).  An edge into a kernel keeps the removed node's
// outgoing edge data, so that a launch made with programmatic dependent launch (PDL)
// keeps it, as a capture without our node would have made it.
template <class Graph>
void take_out(Graph& g, typename Graph::Node node, Added<Graph>* added) {
  using Node = typename Graph::Node;
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
      const bool already = std::any_of(has.begin(), has.end(),
                                       [&](const auto& h) { return h.first == d; });
      if (already) continue;
      auto data = Graph::full_edge();  // full completion, unless a kernel-to-kernel edge had less
      if (!Graph::full(to.second) && g.is_kernel(d) && g.is_kernel(to.first)) data = to.second;
      g.add(d, to.first, data);
      if (added != nullptr) added->emplace_back(d, to.first, data);
    }
  }
}

// Whether `to` follows `from` in `g` other than by their own edge: along a path whose
// first edge is a full one where `full_first` (then `from` completes before `to`
// starts, as the edge said), any path otherwise (a programmatic edge only orders the
// launch).  At most `max_visits` nodes are looked at; past that, no.
template <class Graph>
bool follows(const Graph& g, typename Graph::Node from, typename Graph::Node to,
             bool full_first, size_t max_visits) {
  using Node = typename Graph::Node;
  std::vector<Node> todo;
  std::set<Node> seen;
  for (const auto& first : g.dependents(from)) {
    if (first.first == to || (full_first && !Graph::full(first.second))) continue;
    if (seen.insert(first.first).second) todo.push_back(first.first);
  }
  size_t visits = 0;
  while (!todo.empty()) {
    const Node n = todo.back();
    todo.pop_back();
    if (n == to) return true;
    if (++visits > max_visits) return false;
    for (const auto& next : g.dependents(n))
      if (seen.insert(next.first).second) todo.push_back(next.first);
  }
  return false;
}

// Takes every node of `nodes` out of `g` (take_out), then, with `prune`, drops each
// edge that doing so added where the order it keeps already holds along another path
// (follows).  Without that, a call's inputs' launch on our branch (stats/overlap.py) and
// the join before its outputs' launch leave edges from one call to calls after the next
// beside the application's PDL chain between them, which its own capture did not have
// and which keep a dependent from starting early.  Returns the edges dropped.
template <class Graph>
size_t take_out_all(Graph& g, const std::vector<typename Graph::Node>& nodes, bool prune,
                    size_t max_visits = 4096) {
  using Node = typename Graph::Node;
  Added<Graph> added;
  for (const Node& n : nodes) take_out(g, n, &added);
  if (!prune) return 0;
  const std::set<Node> gone(nodes.begin(), nodes.end());
  size_t dropped = 0;
  for (const auto& [from, to, data] : added) {
    if (gone.count(from) || gone.count(to)) continue;  // went with a later node
    if (follows(g, from, to, Graph::full(data), max_visits)) {
      g.remove(from, to, data);
      ++dropped;
    }
  }
  return dropped;
}

}  // namespace lean_rules
}  // namespace otel_fi
