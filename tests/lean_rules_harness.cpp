// lean_rules::take_out_all (csrc/lean_rules.h) on a plain graph, for
// tests/test_lean_rules.py.  Reads from stdin: "reverse <0|1>" (list each node's edges
// newest first, as a driver may), then "node <id> <kernel 0|1>", "edge <from> <to>
// <programmatic 0|1>", "weak <from> <to>" (the graph refuses to remove that edge) and
// "remove <id> <branch 0|1>" lines; prints the edges left, one "<from> <to>
// <programmatic>" a line.  A run that throws prints "refused: <why>" and exits 3.
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
  std::vector<std::tuple<int, int, int>> list;  // in the order they were made
  bool reverse = false;

  std::vector<std::pair<int, int>> side(int n, bool deps) const {
    std::vector<std::pair<int, int>> r;
    for (const auto& [f, t, e] : list) {
      if (deps && t == n) r.emplace_back(f, e);
      if (!deps && f == n) r.emplace_back(t, e);
    }
    if (reverse) std::reverse(r.begin(), r.end());
    return r;
  }
  std::vector<std::pair<int, int>> deps(int n) const { return side(n, true); }
  std::vector<std::pair<int, int>> dependents(int n) const { return side(n, false); }
  bool is_kernel(int n) const { return kernel.at(n); }
  static bool full(int e) { return e == 0; }
  static int full_edge() { return 0; }
  void destroy(int n) {
    if (!kernel.erase(n)) throw std::runtime_error("destroyed twice");
    list.erase(std::remove_if(list.begin(), list.end(),
                              [n](const auto& x) {
                                return std::get<0>(x) == n || std::get<1>(x) == n;
                              }),
               list.end());
  }
  void add(int from, int to, int e) {
    if (!kernel.count(from) || !kernel.count(to)) throw std::runtime_error("no such node");
    list.emplace_back(from, to, e);
  }
  std::vector<std::pair<int, int>> stuck;  // edges the graph refuses to remove
  bool remove(int from, int to, int e) {
    if (std::find(stuck.begin(), stuck.end(), std::make_pair(from, to)) != stuck.end())
      return false;
    const auto it = std::find(list.begin(), list.end(), std::make_tuple(from, to, e));
    if (it == list.end()) return false;
    list.erase(it);
    return true;
  }
};

int main() {
  Plain g;
  std::vector<int> remove;
  std::vector<bool> join;
  std::string word;
  while (std::cin >> word) {
    int a = 0, b = 0, c = 0;
    if (word == "reverse") {
      std::cin >> a;
      g.reverse = a != 0;
    } else if (word == "node") {
      std::cin >> a >> b;
      g.kernel[a] = b != 0;
    } else if (word == "edge") {
      std::cin >> a >> b >> c;
      g.list.emplace_back(a, b, c);
    } else if (word == "weak") {
      std::cin >> a >> b;
      g.stuck.emplace_back(a, b);
    } else if (word == "remove") {
      std::cin >> a >> b;
      remove.push_back(a);
      join.push_back(b == 0);
    } else {
      std::cerr << "unknown word " << word << "\n";
      return 2;
    }
  }
  try {
    otel_fi::lean_rules::take_out_all(g, remove, join);
  } catch (const std::exception& e) {
    std::cout << "refused: " << e.what() << "\n";
    return 3;
  }
  for (const auto& [f, t, e] : g.list) std::cout << f << " " << t << " " << e << "\n";
  return 0;
}
