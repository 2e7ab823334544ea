// Level-5 span hooks in C++: what otel_flashinfer/stats/hooks.py does per call on the
// common path (CUDA tensors of one device, a ready ring, no capture), without Python
// frames.  The C hot path (csrc/hotpath.c) calls them as its before/after hooks:
//
//   before(record, plan, args, kwargs) -> state
//       plans the call's tensor arguments as stats/hooks.input_entries and
//       stats/planning._plan_flat do, takes a ring slot and launches the inputs'
//       statistics into it on the current stream (publishing into the slot's pinned rows);
//   after(record, state, result, error) -> None
//       launches the outputs' statistics into the same slot, records the slot's event and
//       puts one StatsPending on the record.
//
// The garbage collector's cost grows with every container a call leaves behind, so the
// steady state allocates two (the StatsPending and the record's pending list): a
// native state is the int device << 32 | slot (what the call needs later is kept per
// slot here), and the (name, scope, numel) metas of a call site are kept and reused
// while its arguments keep their names and sizes.
//
// Everything else goes to the Python hooks, unchanged: CPU tensors, several devices,
// index arrays the kernel cannot read, a ring not yet made or full, graph capture, any
// error.  A fallback happens before anything is enqueued, so the Python hook sees the
// call as if it were the first to.  A native state that the fast path cannot finish is
// handed to the Python `after` as the `_Open` it would have made itself.
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cmath>
#include <ctime>
#include <exception>
#include <unordered_map>
#include <vector>

#include "py_defer.h"
#include "stats_launch.h"

namespace otel_fi {
namespace {

constexpr int kMaxDevices = 64;
constexpr Py_ssize_t kMaxSeq = 8;  // tensors taken from a tuple/list argument or result

// Interned attribute names and constant strings (made once, at registration).
struct Names {
  PyObject *names, *skip_self, *varargs, *indices_buf, *indptr_buf, *batch_size, *acquire,
      *release, *dev_base, *ctr_base, *pub_base, *slot_bytes, *rows, *native, *kind,
      *native_event, *add_pending, *arg, *gpu, *abandon, *attributes, *unavailable, *fallback_reason, *native_kind, *paged_a, *paged_b,
      *last_page_len_buf, *kv_layout, *nhd, *hnd;
  PyObject* result_names[kMaxSeq];
};
Names N;

// What a call's after needs from its before, kept with the slot the call holds.
struct SlotInfo {
  PyObject* metas = nullptr;  // the inputs' metas (tuple), strong
  PyObject* note = nullptr;   // strong
  PyObject* plan = nullptr;   // the call's ArgPlan, strong: keys the outputs' metas
  int64_t ts = 0;
  int64_t stream = 0;
  bool timed = false;  // the inputs' launch stamped the GPU clock; record.gpu is False

  void clear() {
    Py_CLEAR(metas);
    Py_CLEAR(note);
    Py_CLEAR(plan);
  }
};

// A SlotRing's fast-path addresses, read once the ring's device rows exist.
struct RingView {
  PyObject* ring = nullptr;     // strong
  PyObject* acquire = nullptr;  // ring.acquire, strong
  PyObject* native = nullptr;   // ring._native: the slots' events (list of int), strong
  PyObject* kind = nullptr;     // ring._kind (list of str), strong
  int64_t dev_base = 0, ctr_base = 0, pub_base = 0, slot_bytes = 0, rows = 0;
  std::vector<SlotInfo> info;   // one per slot
};

// The last metas of one call site (an ArgPlan) for its inputs and for its outputs.
struct MetaCache {
  PyObject* in = nullptr;   // tuple, strong
  PyObject* out = nullptr;  // tuple, strong
};
constexpr size_t kMaxCachedPlans = 4096;

struct Hooks {
  PyObject* rings = nullptr;      // StatsRecorder._rings: device index -> SlotRing
  PyObject* py_before = nullptr;  // the Python hooks: every case the fast path leaves
  PyObject* py_after = nullptr;
  PyObject* pending_cls = nullptr;  // stats.pending.StatsPending
  PyObject* open_cls = nullptr;     // stats.recorder._Open
  PyObject* module = nullptr;       // this extension (ring.native_event takes it)
  PyObject* scope_full = nullptr;
  PyObject* scope_sampled = nullptr;
  PyObject* scope_pages = nullptr;
  double max_bytes = 0;
  int64_t max_rows = 0;  // rows per side of a call
  bool gpu_time = false;  // time calls with the launches' stamps (GPU timing is on)
  RingView views[kMaxDevices];
  std::unordered_map<PyObject*, MetaCache> metas;  // by ArgPlan; keys held in `plans`
  PyObject* plans = nullptr;                      // list keeping the keys alive
};

void clear_hooks(Hooks* h) {
  Py_CLEAR(h->rings);
  Py_CLEAR(h->py_before);
  Py_CLEAR(h->py_after);
  Py_CLEAR(h->pending_cls);
  Py_CLEAR(h->open_cls);
  Py_CLEAR(h->module);
  Py_CLEAR(h->scope_full);
  Py_CLEAR(h->scope_sampled);
  Py_CLEAR(h->scope_pages);
  for (RingView& v : h->views) {
    Py_CLEAR(v.ring);
    Py_CLEAR(v.acquire);
    Py_CLEAR(v.native);
    Py_CLEAR(v.kind);
    for (SlotInfo& i : v.info) i.clear();
  }
  for (auto& kv : h->metas) {
    Py_CLEAR(kv.second.in);
    Py_CLEAR(kv.second.out);
  }
  h->metas.clear();
  Py_CLEAR(h->plans);
}

void destroy_capsule(PyObject* capsule) {
  auto* h = static_cast<Hooks*>(PyCapsule_GetPointer(capsule, "otel_flashinfer.stats_hooks"));
  if (h == nullptr) {
    ofi_clear_error();
    return;
  }
  clear_hooks(h);
  delete h;
}

Hooks* hooks_of(PyObject* self) {
  return static_cast<Hooks*>(PyCapsule_GetPointer(self, "otel_flashinfer.stats_hooks"));
}

int64_t now_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

// -- planning ------------------------------------------------------------------------

// The tensors of one side of a call as the kernel reads them, and one (name, scope,
// numel) row per output row: stats/planning._plan_flat's decisions.
struct Row {
  PyObject* name;   // strong
  PyObject* scope;  // borrowed (held by Hooks)
  int64_t numel;
};

struct Plan {
  std::vector<Item> items;
  std::vector<Row> rows;
  int64_t row0 = 0;
  int64_t left_out = 0;
  int device = -1;
  bool fallback = false;  // something only the Python path takes

  Plan() { rows.reserve(8); }
  ~Plan() {
    for (Row& r : rows) Py_DECREF(r.name);
  }
  Py_ssize_t nrows() const { return static_cast<Py_ssize_t>(rows.size()); }
};

int take_device(Plan& p, const at::Tensor& t) {
  if (!t.is_cuda()) {
    p.fallback = true;
    return -1;
  }
  const int d = t.get_device();
  if (p.device < 0) {
    p.device = d;
  } else if (p.device != d) {
    p.fallback = true;
    return -1;
  }
  if (d >= kMaxDevices) p.fallback = true;
  return p.fallback ? -1 : 0;
}

// Appends (name, scope, numel).
int add_meta(Plan& p, PyObject* name, PyObject* scope, int64_t numel) {
  Py_INCREF(name);
  p.rows.push_back(Row{name, scope, numel});
  return 0;
}

bool same_metas(PyObject* cached, const Plan& p) {
  if (cached == nullptr || PyTuple_GET_SIZE(cached) != p.nrows()) return false;
  for (Py_ssize_t i = 0; i < p.nrows(); ++i) {
    PyObject* m = PyTuple_GET_ITEM(cached, i);
    const Row& r = p.rows[i];
    if (PyTuple_GET_ITEM(m, 1) != r.scope) return false;
    PyObject* name = PyTuple_GET_ITEM(m, 0);
    if (name != r.name && PyUnicode_Compare(name, r.name) != 0) return false;
    const int64_t numel = PyLong_AsLongLong(PyTuple_GET_ITEM(m, 2));
    if (numel != r.numel) return false;
  }
  return true;
}

// The rows' metas as a tuple of (name, scope, numel): the cached one when the rows are
// the same (a new reference), else a new one that replaces it.  NULL: error set.
PyObject* metas_of(Plan& p, PyObject** cached) {
  if (same_metas(*cached, p)) {
    Py_INCREF(*cached);
    return *cached;
  }
  ofi_clear_error();
  PyObject* t = PyTuple_New(p.nrows());
  if (t == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < p.nrows(); ++i) {
    const Row& r = p.rows[i];
    PyObject* n = PyLong_FromLongLong(r.numel);
    PyObject* m = n == nullptr ? nullptr : PyTuple_Pack(3, r.name, r.scope, n);
    Py_XDECREF(n);
    if (m == nullptr) {
      Py_DECREF(t);
      return nullptr;
    }
    PyTuple_SET_ITEM(t, i, m);
  }
  Py_INCREF(t);
  Py_XSETREF(*cached, t);
  return t;
}

// The cache entry of a call site; NULL (no caching, no error) past kMaxCachedPlans.
MetaCache* cache_of(Hooks* h, PyObject* plan) {
  auto it = h->metas.find(plan);
  if (it != h->metas.end()) return &it->second;
  if (h->metas.size() >= kMaxCachedPlans || PyList_Append(h->plans, plan) < 0) {
    ofi_clear_error();
    return nullptr;
  }
  return &h->metas[plan];
}

PyObject* metas_for(Hooks* h, Plan& p, PyObject* plan, bool outputs) {
  MetaCache* c = cache_of(h, plan);
  if (c == nullptr) {
    PyObject* none = nullptr;
    PyObject* t = metas_of(p, &none);
    Py_XDECREF(none);  // metas_of kept a reference in `none`
    return t;
  }
  return metas_of(p, outputs ? &c->out : &c->in);
}

// One plain tensor argument (full or sampled).  -1: Python error set.
int add_tensor(const Hooks* h, Plan& p, PyObject* name, PyObject* obj) {
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (dtype_code_or(t.scalar_type(), -1) < 0) return 0;  // no statistic for this dtype
  if (p.nrows() >= h->max_rows) {
    ++p.left_out;
    return 0;
  }
  if (take_device(p, t) < 0) return 0;
  const int64_t numel = t.numel();
  int64_t step = 1;
  if (static_cast<double>(numel) * 8 > h->max_bytes) {  // no dtype is wider than 8 bytes
    const int64_t item = t.element_size();
    if (static_cast<double>(numel) * item > h->max_bytes) {
      const int64_t per = std::max<int64_t>(
          1, static_cast<int64_t>(std::floor(h->max_bytes / static_cast<double>(item))));
      step = static_cast<int64_t>(std::ceil(static_cast<double>(numel) / per));
    }
  }
  const int64_t row = p.row0 + p.nrows();
  if (add_meta(p, name, step > 1 ? h->scope_sampled : h->scope_full, numel) < 0) return -1;
  if (numel > 0) p.items.push_back(describe(t, row, step, std::nullopt, std::nullopt, 0));
  return 0;
}

bool readable_index(const Plan& p, const at::Tensor& t) {
  return t.is_cuda() && t.get_device() == p.device && t.scalar_type() == at::kInt &&
         t.is_contiguous();
}

// A paged KV-cache argument: `cache` (a tensor or a (k, v) pair, one row) over the pages
// indices[indptr[0]:indptr[batch]] reference; with `last_page_len` (a tensor, or null),
// only the filled slots of each request's last page (mask_last_page).
int add_paged(const Hooks* h, Plan& p, PyObject* name, PyObject* cache, PyObject* indices,
              PyObject* indptr, int64_t batch, PyObject* last_page_len, int64_t slot_dim) {
  PyObject* parts[kMaxSeq];
  Py_ssize_t nparts = 0;
  if (PyTuple_Check(cache) || PyList_Check(cache)) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(cache);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* v = PySequence_Fast_GET_ITEM(cache, i);
      if (!THPVariable_Check(v) || dtype_code_or(THPVariable_Unpack(v).scalar_type(), -1) < 0)
        continue;
      if (nparts == kMaxSeq) {  // more than a (k, v) pair: the Python path decides
        p.fallback = true;
        return 0;
      }
      parts[nparts++] = v;
    }
  } else if (THPVariable_Check(cache) &&
             dtype_code_or(THPVariable_Unpack(cache).scalar_type(), -1) >= 0) {
    parts[nparts++] = cache;
  }
  if (nparts == 0) return 0;
  if (p.nrows() >= h->max_rows) {
    ++p.left_out;
    return 0;
  }
  const int64_t row = p.row0 + p.nrows();
  if (add_meta(p, name, h->scope_pages, 0) < 0) return -1;
  for (Py_ssize_t k = 0; k < nparts; ++k)
    if (take_device(p, THPVariable_Unpack(parts[k])) < 0) return 0;
  const at::Tensor& ix = THPVariable_Unpack(indices);
  const at::Tensor& ip = THPVariable_Unpack(indptr);
  if (!readable_index(p, ix) || !readable_index(p, ip)) {
    p.fallback = true;
    return 0;
  }
  const at::Tensor* lp = nullptr;
  if (last_page_len != nullptr) {
    lp = &THPVariable_Unpack(last_page_len);
    if (!readable_index(p, *lp) || lp->numel() < batch) {  // the Python path decides
      p.fallback = true;
      return 0;
    }
  }
  for (Py_ssize_t k = 0; k < nparts; ++k) {
    const at::Tensor& t = THPVariable_Unpack(parts[k]);
    if (t.numel() == 0) continue;
    p.items.push_back(describe(t, row, 1, ix, ip, batch));
    if (lp != nullptr) mask_last_page(p.items.back(), t, *lp, slot_dim);
  }
  return 0;
}

// FlashInfer's _kv_layout as mask_last_page's slot_dim (0: unknown, no masking).
int64_t slot_dim_of(PyObject* layout) {
  if (!PyUnicode_Check(layout)) return 0;
  if (PyUnicode_Compare(layout, N.nhd) == 0) return 3;
  if (PyUnicode_Compare(layout, N.hnd) == 0) return 2;
  return 0;
}

bool is_paged_name(PyObject* name) {
  return PyUnicode_Check(name) && (PyUnicode_Compare(name, N.paged_a) == 0 ||
                                   PyUnicode_Compare(name, N.paged_b) == 0);
}

// getattr(owner, attr, None) as a new reference; NULL with an error set on anything but
// AttributeError.
PyObject* attr_or_none(PyObject* owner, PyObject* attr) {
  PyObject* v = PyObject_GetAttr(owner, attr);
  if (v == nullptr) {
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return nullptr;
    ofi_clear_error();
    Py_RETURN_NONE;
  }
  return v;
}

// stats/hooks._paged: 1 when `owner` has planned page indices (and the entry was added),
// 0 when it has none, -1 with an error set.
int try_paged(const Hooks* h, Plan& p, PyObject* owner, PyObject* name, PyObject* value) {
  PyObject* indices = attr_or_none(owner, N.indices_buf);
  if (indices == nullptr) return -1;
  PyObject* indptr = attr_or_none(owner, N.indptr_buf);
  if (indptr == nullptr) {
    Py_DECREF(indices);
    return -1;
  }
  int rc = 0;
  if (THPVariable_Check(indices) && THPVariable_Check(indptr)) {
    PyObject* batch_obj = attr_or_none(owner, N.batch_size);
    int64_t batch = 0;
    int truth = batch_obj == nullptr ? -1 : PyObject_IsTrue(batch_obj);
    if (truth < 0) {
      rc = -1;
    } else if (truth && !PyLong_Check(batch_obj)) {
      p.fallback = true;  // an odd _batch_size: int() of it is the Python path's business
      rc = 1;
    } else {
      batch = truth ? PyLong_AsLongLong(batch_obj)
                    : THPVariable_Unpack(indptr).numel() - 1;
      if (batch == -1 && PyErr_Occurred()) {  // past int64: the Python path's business
        ofi_clear_error();
        p.fallback = true;
        rc = 1;
      } else {
        PyObject* lpl = attr_or_none(owner, N.last_page_len_buf);
        PyObject* layout = lpl == nullptr ? nullptr : attr_or_none(owner, N.kv_layout);
        if (layout == nullptr) {
          rc = -1;
        } else {
          const int64_t slot_dim = slot_dim_of(layout);
          PyObject* use = THPVariable_Check(lpl) && slot_dim > 0 ? lpl : nullptr;
          rc = add_paged(h, p, name, value, indices, indptr, batch, use, slot_dim) < 0 ? -1 : 1;
        }
        Py_XDECREF(lpl);
        Py_XDECREF(layout);
      }
    }
    Py_XDECREF(batch_obj);
  }
  Py_DECREF(indices);
  Py_DECREF(indptr);
  return rc;
}

// stats/hooks._add: a value that is a tensor, a tuple/list of them, or a paged cache.
int add_value(const Hooks* h, Plan& p, PyObject* owner, PyObject* name, PyObject* value) {
  if (owner != nullptr && is_paged_name(name)) {
    const int rc = try_paged(h, p, owner, name, value);
    if (rc != 0) return rc < 0 ? -1 : 0;
  }
  if (THPVariable_Check(value)) return add_tensor(h, p, name, value);
  if (PyTuple_Check(value) || PyList_Check(value)) {
    const Py_ssize_t n = std::min(PySequence_Fast_GET_SIZE(value), kMaxSeq);
    for (Py_ssize_t i = 0; i < n && !p.fallback; ++i) {
      PyObject* v = PySequence_Fast_GET_ITEM(value, i);
      if (!THPVariable_Check(v)) continue;
      PyObject* sub = PyUnicode_FromFormat("%U.%zd", name, i);
      if (sub == nullptr) return -1;
      const int rc = add_tensor(h, p, sub, v);
      Py_DECREF(sub);
      if (rc < 0) return -1;
    }
  }
  return 0;
}

// The inputs of a call, named as plan.bind names them.  -1: Python error set.
int plan_inputs(const Hooks* h, Plan& p, PyObject* plan, PyObject* args, PyObject* kwargs) {
  PyObject* names = PyObject_GetAttr(plan, N.names);
  if (names == nullptr) return -1;
  if (!PyList_Check(names)) {
    Py_DECREF(names);
    p.fallback = true;
    return 0;
  }
  PyObject* skip = PyObject_GetAttr(plan, N.skip_self);
  const int skip_self = skip == nullptr ? -1 : PyObject_IsTrue(skip);
  Py_XDECREF(skip);
  if (skip_self < 0) {
    Py_DECREF(names);
    return -1;
  }
  const Py_ssize_t nargs = PyTuple_GET_SIZE(args);
  PyObject* owner = nullptr;
  Py_ssize_t start = 0;
  if (skip_self && nargs > 0) {
    owner = PyTuple_GET_ITEM(args, 0);
    start = 1;
  }
  const Py_ssize_t count = PyList_GET_SIZE(names);
  int rc = 0;
  for (Py_ssize_t k = 0; k < nargs - start && rc == 0 && !p.fallback; ++k) {
    PyObject* value = PyTuple_GET_ITEM(args, start + k);
    if (k < count) {
      PyObject* name = PyList_GET_ITEM(names, k);
      if (THPVariable_Check(value) && (owner == nullptr || !is_paged_name(name)))
        rc = add_tensor(h, p, name, value);
      else
        rc = add_value(h, p, owner, name, value);
      continue;
    }
    PyObject* varargs = PyObject_GetAttr(plan, N.varargs);
    if (varargs == nullptr) {
      rc = -1;
      break;
    }
    PyObject* name = PyUnicode_FromFormat(
        "%U.%zd", (varargs != Py_None && PyUnicode_Check(varargs)) ? varargs : N.arg,
        k - count);
    Py_DECREF(varargs);
    if (name == nullptr) {
      rc = -1;
      break;
    }
    rc = add_value(h, p, owner, name, value);
    Py_DECREF(name);
  }
  Py_DECREF(names);
  if (rc < 0) return -1;
  if (kwargs != nullptr && PyDict_Check(kwargs)) {
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (!p.fallback && PyDict_Next(kwargs, &pos, &key, &value))
      if (add_value(h, p, owner, key, value) < 0) return -1;
  }
  return 0;
}

// stats/hooks.output_entries: result.0 .. result.7.
int plan_outputs(const Hooks* h, Plan& p, PyObject* result) {
  if (THPVariable_Check(result)) return add_tensor(h, p, N.result_names[0], result);
  if (PyTuple_Check(result) || PyList_Check(result)) {
    const Py_ssize_t n = std::min(PySequence_Fast_GET_SIZE(result), kMaxSeq);
    for (Py_ssize_t i = 0; i < n && !p.fallback; ++i) {
      PyObject* v = PySequence_Fast_GET_ITEM(result, i);
      if (THPVariable_Check(v) && add_tensor(h, p, N.result_names[i], v) < 0) return -1;
    }
  }
  return 0;
}

// -- the ring --------------------------------------------------------------------------

int64_t int_attr(PyObject* obj, PyObject* attr) {
  PyObject* v = PyObject_GetAttr(obj, attr);
  if (v == nullptr) return -1;
  const int64_t r = PyLong_Check(v) ? PyLong_AsLongLong(v) : 0;
  Py_DECREF(v);
  return r;
}

// The ring of `device` once its fast path is ready; NULL without an error when it is not
// (made, or still being made, by the Python path).  -1 in *err with an error set.
RingView* view_of(Hooks* h, int device, int* err) {
  *err = 0;
  RingView& v = h->views[device];
  if (v.ring != nullptr) return &v;
  PyObject* key = PyLong_FromLong(device);
  if (key == nullptr) {
    *err = -1;
    return nullptr;
  }
  PyObject* ring = PyDict_GetItemWithError(h->rings, key);  // borrowed
  Py_DECREF(key);
  if (ring == nullptr) {
    if (PyErr_Occurred()) *err = -1;
    return nullptr;
  }
  const int64_t dev_base = int_attr(ring, N.dev_base);
  if (dev_base <= 0) {
    if (PyErr_Occurred()) *err = -1;
    return nullptr;
  }
  RingView n;
  n.dev_base = dev_base;
  n.ctr_base = int_attr(ring, N.ctr_base);
  n.pub_base = int_attr(ring, N.pub_base);
  n.slot_bytes = int_attr(ring, N.slot_bytes);
  n.rows = int_attr(ring, N.rows);
  if (PyErr_Occurred()) {
    *err = -1;
    return nullptr;
  }
  n.acquire = PyObject_GetAttr(ring, N.acquire);
  n.native = PyObject_GetAttr(ring, N.native);
  n.kind = PyObject_GetAttr(ring, N.kind);
  if (n.acquire == nullptr || n.native == nullptr || n.kind == nullptr ||
      !PyList_Check(n.native) || !PyList_Check(n.kind) || n.ctr_base <= 0 || n.pub_base <= 0 ||
      n.slot_bytes <= 0 || n.rows < 2 * h->max_rows) {
    Py_XDECREF(n.acquire);
    Py_XDECREF(n.native);
    Py_XDECREF(n.kind);
    if (PyErr_Occurred()) *err = -1;
    return nullptr;  // not a ring this path knows: the Python path
  }
  if (v.ring != nullptr) {  // made meanwhile (the attribute reads can run other threads)
    Py_DECREF(n.acquire);
    Py_DECREF(n.native);
    Py_DECREF(n.kind);
    return &v;
  }
  Py_INCREF(ring);
  n.ring = ring;
  n.info.resize(static_cast<size_t>(PyList_GET_SIZE(n.native)));
  v = n;
  return &v;
}

void release(RingView* v, int64_t slot);

// A free slot, or -1 (none free: the Python path reports the drop).  -2: error set.
int64_t acquire(RingView* v) {
  PyObject* s = PyObject_CallNoArgs(v->acquire);
  if (s == nullptr) return -2;
  const int64_t slot = PyLong_Check(s) ? PyLong_AsLongLong(s) : -1;
  Py_DECREF(s);
  if (slot == -1 && PyErr_Occurred()) return -2;
  if (slot >= PyList_GET_SIZE(v->native)) {  // not a slot of the ring this view read
    release(v, slot);
    return -1;
  }
  return slot;
}

// ring.<method>(slot), keeping any error already set (a failure is dropped: the slot
// then stays taken, which the ring's bound absorbs).
void give_back(RingView* v, PyObject* method, int64_t slot) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyObject* s = PyLong_FromLongLong(slot);
  PyObject* r = s == nullptr ? nullptr : PyObject_CallMethodOneArg(v->ring, method, s);
  Py_XDECREF(s);
  Py_XDECREF(r);
  if (r == nullptr) ofi_clear_error();
  PyErr_Restore(type, value, tb);
}

// A slot nothing was enqueued for.
void release(RingView* v, int64_t slot) { give_back(v, N.release, slot); }

// A slot whose work may still run: the ring frees it once its event completed.
void abandon(RingView* v, int64_t slot) { give_back(v, N.abandon, slot); }

// The slot's CUDA event, marked as the kind its query uses; 0 with an error set.
int64_t slot_event(Hooks* h, RingView* v, int64_t slot) {
  PyObject* ev = PyList_GET_ITEM(v->native, slot);
  int64_t event = PyLong_Check(ev) ? PyLong_AsLongLong(ev) : 0;
  if (event > 0) {
    Py_INCREF(N.native_kind);
    PyList_SetItem(v->kind, slot, N.native_kind);  // steals
    return event;
  }
  ofi_clear_error();
  PyObject* slot_obj = PyLong_FromLongLong(slot);
  if (slot_obj == nullptr) return 0;
  PyObject* r = PyObject_CallMethodObjArgs(v->ring, N.native_event, slot_obj, h->module, nullptr);
  Py_DECREF(slot_obj);
  if (r == nullptr) return 0;
  event = PyLong_AsLongLong(r);
  Py_DECREF(r);
  return event > 0 ? event : 0;
}

int64_t* dev_rows(const RingView* v, int64_t slot) {
  return reinterpret_cast<int64_t*>(v->dev_base + slot * v->slot_bytes);
}

// Where a side of a call publishes; with `timed`, the inputs' launch stamps its end into
// row 0 and the outputs' launch its start into row `lo` (the spare word, kRowWords - 1).
Publish publish_of(const RingView* v, int64_t slot, int side, int64_t lo, int64_t hi,
                   bool timed) {
  Publish pub;
  pub.counter = reinterpret_cast<unsigned int*>(v->ctr_base + (2 * slot + side) * 8);
  pub.publish = reinterpret_cast<int64_t*>(v->pub_base + slot * v->slot_bytes);
  pub.row_lo = lo;
  pub.row_hi = hi;
  pub.rezero = true;
  if (timed && side == 0) pub.stamp_end = pub.publish + (kRowWords - 1);
  if (timed && side == 1) pub.stamp_start = dev_rows(v, slot) + lo * kRowWords + kRowWords - 1;
  return pub;
}

// The current stream of `device` in *out; false when it is capturing (a graph: the
// Python path).  The default stream's handle is null, so the answer is the bool.
bool eager_stream(int device, cudaStream_t* out) {
  *out = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(*out, &capture) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return capture == cudaStreamCaptureStatusNone;
}

PyObject* note_of(int64_t left_out) {
  if (left_out) return PyUnicode_FromFormat("too_many_tensors:%lld",
                                            static_cast<long long>(left_out));
  return PyUnicode_FromStringAndSize("", 0);
}

// -- the hooks -------------------------------------------------------------------------

PyObject* call_python(PyObject* fn, PyObject* const* argv, Py_ssize_t nargs) {
  return PyObject_Vectorcall(fn, argv, static_cast<size_t>(nargs), nullptr);
}

// A native state: the int device << 32 | slot (Python's before never returns an int).
constexpr int kSlotBits = 32;

PyObject* before(PyObject* self, PyObject* const* argv, Py_ssize_t nargs) {
  Hooks* h = hooks_of(self);
  if (h == nullptr) return nullptr;
  if (nargs != 4 || !PyTuple_Check(argv[2])) {
    PyErr_SetString(PyExc_TypeError, "before(record, plan, args: tuple, kwargs)");
    return nullptr;
  }
  const int64_t ts = now_ns();
  Plan p;
  try {
    if (plan_inputs(h, p, argv[1], argv[2], argv[3]) < 0) {
      ofi_clear_error();  // the Python path meets it again and decides
      p.fallback = true;
    }
  } catch (const std::exception&) {
    p.fallback = true;  // a tensor describe() refuses: the Python path reports it
  }
  if (p.fallback || p.device < 0) return call_python(h->py_before, argv, nargs);
  // Everything that can fail without touching the GPU comes first: a failure then hands
  // the call to the Python path, which reports it and keeps the span.
  PyObject* metas = metas_for(h, p, argv[1], false);
  PyObject* note = metas == nullptr ? nullptr : note_of(p.left_out);
  int err = 0;  // any error is cleared below: the Python path then reports what it meets
  RingView* v = note == nullptr ? nullptr : view_of(h, p.device, &err);
  const int64_t slot = v == nullptr ? -1 : acquire(v);
  PyObject* state = slot < 0 ? nullptr
                             : PyLong_FromLongLong((static_cast<int64_t>(p.device) << kSlotBits) |
                                                   slot);
  if (state == nullptr) {
    if (slot >= 0) release(v, slot);
    Py_XDECREF(metas);
    Py_XDECREF(note);
    ofi_clear_error();  // ring not ready, full, or an error: the Python path says which
    return call_python(h->py_before, argv, nargs);
  }
  cudaStream_t stream = nullptr;
  bool launched = false;
  try {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device));
    if (eager_stream(p.device, &stream)) {
      launch_items(p.items, dev_rows(v, slot), stream, sm_count_of(p.device),
                   publish_of(v, slot, 0, 0, p.nrows(), h->gpu_time));
      launched = true;
    }
  } catch (const std::exception&) {
    launched = false;  // nothing was enqueued: the Python path retries and reports
  }
  if (!launched) {
    release(v, slot);
    Py_DECREF(metas);
    Py_DECREF(note);
    Py_DECREF(state);
    return call_python(h->py_before, argv, nargs);
  }
  SlotInfo& info = v->info[static_cast<size_t>(slot)];
  info.clear();  // left by a call that never reached its after
  info.metas = metas;
  info.note = note;
  Py_INCREF(argv[1]);
  info.plan = argv[1];
  info.ts = ts;
  info.stream = static_cast<int64_t>(reinterpret_cast<intptr_t>(stream));
  // Timed by the stamps: record.gpu set keeps the hot path from recording its events.
  info.timed = h->gpu_time && PyObject_SetAttr(argv[0], N.gpu, Py_False) == 0;
  if (h->gpu_time && !info.timed) ofi_clear_error();  // events then, as without these hooks
  return state;
}

// A call this module timed but cannot finish: no GPU time, and the span says why.
void untimed(PyObject* record, const SlotInfo& info) {
  if (!info.timed) return;
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  if (PyObject_SetAttr(record, N.gpu, Py_None) < 0) ofi_clear_error();
  PyObject* attrs = PyObject_GetAttr(record, N.attributes);
  if (attrs == nullptr || PyObject_SetItem(attrs, N.unavailable, N.fallback_reason) < 0)
    ofi_clear_error();
  Py_XDECREF(attrs);
  PyErr_Restore(type, value, tb);
}

// The Python after, given the native state as the _Open it stands for.
PyObject* after_in_python(Hooks* h, PyObject* const* argv, RingView* v, int64_t slot,
                          int device, const SlotInfo& info) {
  untimed(argv[0], info);
  PyObject* open = PyObject_CallFunction(h->open_cls, "OLOLOLi", v->ring,
                                         static_cast<long long>(slot), info.metas,
                                         static_cast<long long>(info.ts), info.note,
                                         static_cast<long long>(info.stream), device);
  if (open == nullptr) {  // (a Ctrl-C deferred by ofi_clear_error may land here):
    abandon(v, slot);     // no _Open owns the slot, and its inputs' rows may be queued
    return nullptr;
  }
  PyObject* args[4] = {argv[0], open, argv[2], argv[3]};
  PyObject* r = call_python(h->py_after, args, 4);
  Py_DECREF(open);
  return r;
}

PyObject* after(PyObject* self, PyObject* const* argv, Py_ssize_t nargs) {
  Hooks* h = hooks_of(self);
  if (h == nullptr) return nullptr;
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "after(record, state, result, error)");
    return nullptr;
  }
  if (!PyLong_CheckExact(argv[1])) return call_python(h->py_after, argv, nargs);
  const int64_t key = PyLong_AsLongLong(argv[1]);
  if (key == -1 && PyErr_Occurred()) return nullptr;
  const int device = static_cast<int>(key >> kSlotBits);
  const int64_t slot = key & ((int64_t{1} << kSlotBits) - 1);
  RingView* v = device >= 0 && device < kMaxDevices ? &h->views[device] : nullptr;
  if (v == nullptr || v->ring == nullptr || slot >= static_cast<int64_t>(v->info.size()) ||
      v->info[static_cast<size_t>(slot)].metas == nullptr) {
    PyErr_SetString(PyExc_ValueError, "after: not a state of these hooks");
    return nullptr;
  }
  SlotInfo info = v->info[static_cast<size_t>(slot)];  // takes its references
  v->info[static_cast<size_t>(slot)] = SlotInfo{};
  struct Drop {
    SlotInfo& i;
    ~Drop() { i.clear(); }
  } drop{info};
  const Py_ssize_t nin = PyTuple_GET_SIZE(info.metas);
  const int64_t ts = now_ns();
  Plan p;
  p.row0 = nin;
  p.device = device;
  if (argv[3] == Py_None) {
    try {
      if (plan_outputs(h, p, argv[2]) < 0) {
        ofi_clear_error();  // the Python path meets it again and reports it
        p.fallback = true;
      }
    } catch (const std::exception&) {
      p.fallback = true;
    }
  }
  // The call is timed here only if the hot path left record.gpu as before made it (a
  // Python GPU-timing hook, in the pure-Python wrapper, would have put its events there).
  if (info.timed) {
    PyObject* gpu = PyObject_GetAttr(argv[0], N.gpu);
    info.timed = gpu == Py_False;
    Py_XDECREF(gpu);
    ofi_clear_error();
  }
  if (p.fallback) return after_in_python(h, argv, v, slot, device, info);
  const int64_t event = slot_event(h, v, slot);
  if (event == 0) {  // the Python path makes (or fails to make) the event and reports
    ofi_clear_error();
    return after_in_python(h, argv, v, slot, device, info);
  }
  cudaStream_t stream = nullptr;
  bool launched = false;
  try {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    if (eager_stream(device, &stream)) {
      const cudaEvent_t ev = reinterpret_cast<cudaEvent_t>(event);
      const cudaStream_t prev = reinterpret_cast<cudaStream_t>(info.stream);
      if (prev != stream) {  // the inputs' launch ran on another stream: wait for it
        C10_CUDA_CHECK(cudaEventRecord(ev, prev));
        C10_CUDA_CHECK(cudaStreamWaitEvent(stream, ev, 0));
      }
      if (p.nrows() > 0 || info.timed)  // no outputs: a one-block launch for the stamp
        launch_items(p.items, dev_rows(v, slot), stream, sm_count_of(device),
                     publish_of(v, slot, 1, nin, nin + std::max<Py_ssize_t>(p.nrows(), 1),
                                info.timed));
      C10_CUDA_CHECK(cudaEventRecord(ev, stream));
      launched = true;
    }
  } catch (const std::exception&) {
    launched = false;  // the Python path retries, reports and keeps the inputs' rows
  }
  if (!launched) return after_in_python(h, argv, v, slot, device, info);
  if (info.timed && PyObject_SetAttr(argv[0], N.gpu, Py_None) < 0) {
    abandon(v, slot);  // its launches are in flight: back only once its event completed
    return nullptr;
  }
  PyObject* pending;
  PyObject* slot_obj = PyLong_FromLongLong(slot);
  PyObject* ts_in = PyLong_FromLongLong(info.ts);
  if (slot_obj == nullptr || ts_in == nullptr) {
    pending = nullptr;
  } else if (p.nrows() > 0) {
    PyObject* metas_out = metas_for(h, p, info.plan, true);
    PyObject* note = note_of(p.left_out);
    PyObject* ts_out = PyLong_FromLongLong(ts);
    pending = metas_out == nullptr || note == nullptr || ts_out == nullptr
                  ? nullptr
                  : PyObject_CallFunctionObjArgs(h->pending_cls, v->ring, slot_obj, info.metas,
                                                 ts_in, info.note, metas_out, ts_out, note,
                                                 info.timed ? Py_True : Py_False, nullptr);
    Py_XDECREF(metas_out);
    Py_XDECREF(note);
    Py_XDECREF(ts_out);
  } else {
    PyObject* empty = PyUnicode_FromStringAndSize("", 0);
    pending = empty == nullptr ? nullptr
                               : PyObject_CallFunctionObjArgs(
                                     h->pending_cls, v->ring, slot_obj, info.metas, ts_in,
                                     info.note, Py_None, ts_in, empty,
                                     info.timed ? Py_True : Py_False, nullptr);
    Py_XDECREF(empty);
  }
  Py_XDECREF(slot_obj);
  Py_XDECREF(ts_in);
  if (pending == nullptr) {
    abandon(v, slot);  // its launches are in flight: back only once its event completed
    return nullptr;
  }
  PyObject* r = PyObject_CallMethodOneArg(argv[0], N.add_pending, pending);
  Py_DECREF(pending);
  if (r == nullptr) return nullptr;
  Py_DECREF(r);
  Py_RETURN_NONE;
}

PyMethodDef kBefore = {"stats_before", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(before)),
                       METH_FASTCALL, "level-5 before hook (C++ fast path)"};
PyMethodDef kAfter = {"stats_after", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(after)),
                      METH_FASTCALL, "level-5 after hook (C++ fast path)"};

PyObject* intern(const char* s) { return PyUnicode_InternFromString(s); }

void init_names() {
  if (N.names != nullptr) return;
  N.names = intern("names");
  N.skip_self = intern("skip_self");
  N.varargs = intern("varargs");
  N.indices_buf = intern("_paged_kv_indices_buf");
  N.indptr_buf = intern("_paged_kv_indptr_buf");
  N.batch_size = intern("_batch_size");
  N.acquire = intern("acquire");
  N.release = intern("release");
  N.dev_base = intern("_dev_base");
  N.ctr_base = intern("_ctr_base");
  N.pub_base = intern("_pub_base");
  N.slot_bytes = intern("_slot_bytes");
  N.rows = intern("rows");
  N.native = intern("_native");
  N.kind = intern("_kind");
  N.native_event = intern("native_event");
  N.add_pending = intern("add_pending");
  N.gpu = intern("gpu");
  N.abandon = intern("abandon");
  N.attributes = intern("attributes");
  N.unavailable = intern("flashinfer.gpu.time_unavailable");
  N.fallback_reason = intern("stats_fallback");
  N.arg = intern("arg");
  N.native_kind = intern("native");
  N.paged_a = intern("paged_kv_cache");
  N.paged_b = intern("kv_cache");
  N.last_page_len_buf = intern("_paged_kv_last_page_len_buf");
  N.kv_layout = intern("_kv_layout");
  N.nhd = intern("NHD");
  N.hnd = intern("HND");
  for (Py_ssize_t i = 0; i < kMaxSeq; ++i)
    N.result_names[i] = PyUnicode_FromFormat("result.%zd", i);
}

}  // namespace

void register_span_hooks(pybind11::module_& m) {
  init_names();
  ofi_defer_init();
  // make_span_hooks(config: dict) -> (before, after); config names the recorder's rings,
  // the Python hooks, StatsPending, _Open, the scopes, max_bytes and max_rows.
  m.def("make_span_hooks", [](pybind11::dict config) {
    auto* h = new Hooks();
    auto take = [&](const char* key) {
      PyObject* v = PyDict_GetItemString(config.ptr(), key);
      if (v == nullptr) {
        clear_hooks(h);
        delete h;
        throw pybind11::key_error(key);
      }
      Py_INCREF(v);
      return v;
    };
    h->rings = take("rings");
    h->py_before = take("before");
    h->py_after = take("after");
    h->pending_cls = take("pending");
    h->open_cls = take("open");
    h->module = take("module");
    h->scope_full = take("scope_full");
    h->scope_sampled = take("scope_sampled");
    h->scope_pages = take("scope_pages");
    h->plans = PyList_New(0);
    try {
      h->max_bytes = config["max_bytes"].cast<double>();
      h->max_rows = config["max_rows"].cast<int64_t>();
      h->gpu_time = config.contains("gpu_time") && config["gpu_time"].cast<bool>();
    } catch (...) {
      clear_hooks(h);
      delete h;
      throw;
    }
    if (!PyDict_Check(h->rings) || h->plans == nullptr) {
      clear_hooks(h);
      delete h;
      throw pybind11::type_error("make_span_hooks: rings must be a dict");
    }
    PyObject* capsule = PyCapsule_New(h, "otel_flashinfer.stats_hooks", destroy_capsule);
    if (capsule == nullptr) {
      clear_hooks(h);
      delete h;
      throw pybind11::error_already_set();
    }
    PyObject* b = PyCFunction_New(&kBefore, capsule);
    PyObject* a = b == nullptr ? nullptr : PyCFunction_New(&kAfter, capsule);
    Py_DECREF(capsule);
    if (a == nullptr) {
      Py_XDECREF(b);
      throw pybind11::error_already_set();
    }
    return pybind11::make_tuple(pybind11::reinterpret_steal<pybind11::object>(b),
                                pybind11::reinterpret_steal<pybind11::object>(a));
  });
}

}  // namespace otel_fi
