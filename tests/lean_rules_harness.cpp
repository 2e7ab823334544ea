// lean_rules::take_out (csrc/lean_rules.h) on a plain graph, for tests/test_lean_rules.py.
// Reads from stdin: "prune <0|1>", then "node <id> <kernel 0|1>", "edge <from> <to>
// <programmatic 0|1>" and "remove <id>" lines, in that order of use; prints the edges
// left, one "<from> <to> <programmatic>" a line.
#include <algorithm>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "lean_rules.h"

struct Plain {
  using Node = int;
  using Edge = int;  // 0: full completion, 1: programmatic
  std::map<int, bool> kernel;
  std::vector<std::tuple<int, int, int>> edges;  // in the order they were made, as CUDA's

  std::vector<std::pair<int, int>> deps(int n) const {
    std::vector<std::pair<int, int>> r;
    for (const auto& [f, t, e] : edges)
      if (t == n) r.emplace_back(f, e);
    return r;
  }
  std::vector<std::pair<int, int>> dependents(int n) const {
    std::vector<std::pair<int, int>> r;
    for (const auto& [f, t, e] : edges)
      if (f == n) r.emplace_back(t, e);
    return r;
  }
  bool is_kernel(int n) const { return kernel.at(n); }
  static bool full(int e) { return e == 0; }
  static int full_edge() { return 0; }
  void destroy(int n) {
    kernel.erase(n);
    edges.erase(std::remove_if(edges.begin(), edges.end(),
                               [n](const auto& x) {
                                 return std::get<0>(x) == n || std::get<1>(x) == n;
                               }),
                edges.end());
  }
  void add(int from, int to, int e) { edges.emplace_back(from, to, e); }
  void remove(int from, int to, int e) {
    const auto it = std::find(edges.begin(), edges.end(), std::make_tuple(from, to, e));
    if (it == edges.end()) throw std::runtime_error("no such edge");
    edges.erase(it);
  }
};

int main() {
  Plain g;
  bool prune = false;
  std::string word;
  std::vector<int> remove;
  while (std::cin >> word) {
    if (word == "prune") {
      int t;
      std::cin >> t;
      prune = t != 0;
    } else if (word == "node") {
      int id, k;
      std::cin >> id >> k;
      g.kernel[id] = k != 0;
    } else if (word == "edge") {
      int f, t, e;
      std::cin >> f >> t >> e;
      g.add(f, t, e);
    } else if (word == "remove") {
      int id;
      std::cin >> id;
      remove.push_back(id);
    } else {
      std::cerr << "unknown word " << word << "\n";
      return 2;
    }
  }
  const size_t dropped = otel_fi::lean_rules::take_out_all(g, remove, prune);
  std::cerr << "dropped " << dropped << "\n";
  for (const auto& [f, t, e] : g.edges) std::cout << f << " " << t << " " << e << "\n";
  return 0;
}
