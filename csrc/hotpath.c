/* otel_flashinfer._hotpath: the caller's side of a traced call, in C.
 *
 * Python's wrapper (spans.make_wrapper) calls ``enter(args, kwargs)`` before the
 * traced function and ``leave(record, result)`` after it.  Together they do what the
 * pure-Python wrapper does (which stays as the fallback and the reference): read the
 * OTel context, pick ids, fill one CallRecord, attach a NonRecordingSpan context,
 * note the call in the crash journal, and hand the record to the pipeline.  In
 * Python those steps cost 3-4 us per call on a fast core and twice that on the VMs
 * our GPUs live on; here they cost well under a microsecond, because nothing goes
 * through the interpreter's frame machinery.
 *
 * Nothing here raises into the traced program: an internal failure is reported
 * through health.report (counted, logged once), any half-done step is undone, and
 * the call goes on untraced.  No CUDA, no torch headers: tensors are read through
 * their Python attributes, hooks (GPU timing, statistics, blobs) stay Python.
 *
 * CallRecord is a Python class with __slots__; its slots are written through the
 * offsets of their member descriptors (exactly what ``record.x = v`` does), checked
 * once at setup.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <math.h>
#include <unistd.h>

#include "hotpath_api.h"
#include "py_defer.h"
#include "xoshiro.h"

/* ---- ids: xoshiro256** seeded from getrandom, reseeded in a forked child -------- */

static uint64_t rng_s[4];
static volatile int rng_seeded = 0;

static void rng_child_after_fork(void) { rng_seeded = 0; }

static int rng_seed(void) {
    if (otel_fi_xoshiro_seed(rng_s) != 0) return -1;
    rng_seeded = 1;
    return 0;
}

/* Nonzero 64 random bits (an all-zero id is invalid in OTel).  Callers hold the GIL. */
static int rng_next(uint64_t *out) {
    if (!rng_seeded && rng_seed() != 0) return -1;
    *out = otel_fi_xoshiro_next(rng_s);
    return 0;
}

static PyObject *now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return PyLong_FromLongLong((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
}

/* ---- process-wide state, set once by setup() --------------------------------------- */

enum {
    R_NAME, R_TRACE_ID, R_SPAN_ID, R_PARENT, R_ATTRIBUTES, R_SHARED, R_EVENTS, R_LINKS,
    R_PENDING, R_ERROR, R_DESCRIBE, R_DATA, R_KW, R_RESULT, R_GPU, R_START_NS, R_END_NS,
    R_INSTANCE, R_DEADLINE, R_PLAN_LINK, R_TOKEN, R_SLOT, R_STATES, R_CAPTURE, R_COUNT
};
static const char *const record_slot_names[R_COUNT] = {
    "name", "trace_id", "span_id", "parent", "attributes", "shared", "events", "links",
    "pending", "error", "describe", "data", "kw", "result", "gpu", "start_ns", "end_ns",
    "instance", "deadline", "plan_link", "token", "slot", "states", "capture"};

typedef struct {
    int ready;
    PyObject *var;            /* the ContextVar behind OTel's runtime context */
    PyObject *suppress_key, *span_key;
    PyTypeObject *span_context_type, *non_recording_type, *record_type;
    Py_ssize_t offsets[R_COUNT];
    PyObject *empty;          /* the shared () for events/links/pending */
    PyObject *sampled_flags, *default_trace_state;
    PyObject *spans_globals;  /* for process_parent */
    PyObject *graphs_globals; /* for _capturing */
    PyObject *capture_state;  /* graphs.capture_state */
    PyObject *snapshot;       /* describe.snapshot */
    PyObject *tensor_type;    /* torch.Tensor once seen, else NULL */
    PyObject *plans;          /* id(obj) -> plan SpanContext (spans.instances) */
    Py_ssize_t max_plans;
    PyObject *report, *count; /* health.report / health.count */
    PyObject *plain_getters;  /* get_span_context functions that only return self._context */
    const otel_flashinfer_hotpath_api *api; /* lent by the CUDA event pool, once built */
    PyObject *zero, *zero_float, *empty_args;
    PyObject *s_get_span_context, *s_process_parent, *s_capturing, *s_sample_root;
    PyObject *s_root_always, *s_queue, *s_append, *s_max_queue, *s_batch;
    /* NonRecordingSpan.__init__ only stores its argument as _context (checked by
     * native.py): made without running it, one Python frame less per call. */
    int plain_span_init;
    PyObject *s_hot, *s_encoder, *s_encode, *s_add, *s_dtype, *s_device, *s_shape,
        *s_stride, *s_wrapper_errors, *s_journal_full, *s_add_pending, *s_unavailable,
        *s_unready, *s_context;
} State;

static State S;

static void report_error(const char *message) {
    /* Turn the pending exception into one health.report call; never raises. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) PyException_SetTraceback(value, tb);
    if (S.report != NULL) {
        PyObject *msg = PyUnicode_FromString(message);
        PyObject *r = msg ? PyObject_CallFunctionObjArgs(S.report, S.s_wrapper_errors, msg,
                                                         value ? value : Py_None, NULL)
                          : NULL;
        Py_XDECREF(r);
        Py_XDECREF(msg);
    }
    ofi_clear_error();
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/* Slot access on a CallRecord (offsets from its member descriptors). */
static inline PyObject **slot_ptr(PyObject *record, int which) {
    return (PyObject **)((char *)record + S.offsets[which]);
}

static inline void slot_set(PyObject *record, int which, PyObject *value) {
    PyObject **p = slot_ptr(record, which);
    PyObject *old = *p;
    Py_INCREF(value);
    *p = value;
    Py_XDECREF(old);
}

static inline void slot_steal(PyObject *record, int which, PyObject *value) {
    PyObject **p = slot_ptr(record, which);
    PyObject *old = *p;
    *p = value;
    Py_XDECREF(old);
}

static inline PyObject *slot_get(PyObject *record, int which) { /* borrowed, may be NULL */
    return *slot_ptr(record, which);
}

static PyObject *intern(const char *s) { return PyUnicode_InternFromString(s); }

static PyObject *hp_setup(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kw[] = {"var", "suppress_key", "span_key", "span_context_type",
                         "non_recording_type", "record_type", "empty", "sampled_flags",
                         "default_trace_state", "spans_globals", "graphs_globals",
                         "capture_state", "snapshot", "plans", "max_plans", "report", "count",
                         "plain_getters", "plain_span_init", NULL};
    State s;
    memset(&s, 0, sizeof(s));
    int plain_span_init = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO!O!O!OOOO!O!OOO!nOOO!|p", kw, &s.var,
                                     &s.suppress_key, &s.span_key, &PyType_Type,
                                     &s.span_context_type, &PyType_Type, &s.non_recording_type,
                                     &PyType_Type, &s.record_type, &s.empty, &s.sampled_flags,
                                     &s.default_trace_state, &PyDict_Type, &s.spans_globals,
                                     &PyDict_Type, &s.graphs_globals, &s.capture_state,
                                     &s.snapshot, &PyDict_Type, &s.plans, &s.max_plans,
                                     &s.report, &s.count, &PyTuple_Type, &s.plain_getters,
                                     &plain_span_init))
        return NULL;
    s.plain_span_init = plain_span_init;
    if (!PyContextVar_CheckExact(s.var)) {
        PyErr_SetString(PyExc_TypeError, "var must be a contextvars.ContextVar");
        return NULL;
    }
    if (!PyType_IsSubtype(s.span_context_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "span_context_type must be a tuple subclass");
        return NULL;
    }
    /* Every CallRecord slot must be a plain object slot (a T_OBJECT_EX member). */
    PyObject *type_dict = s.record_type->tp_dict;
    for (int i = 0; i < R_COUNT; ++i) {
        PyObject *descr = PyDict_GetItemString(type_dict, record_slot_names[i]);
        if (descr == NULL || Py_TYPE(descr) != &PyMemberDescr_Type) {
            PyErr_Format(PyExc_TypeError, "CallRecord.%s is not a __slots__ member",
                         record_slot_names[i]);
            return NULL;
        }
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type != T_OBJECT_EX || (member->flags & READONLY)) {
            PyErr_Format(PyExc_TypeError, "CallRecord.%s is not a writable object slot",
                         record_slot_names[i]);
            return NULL;
        }
        s.offsets[i] = member->offset;
    }
    PyObject **owned[] = {&s.var, &s.suppress_key, &s.span_key, (PyObject **)&s.span_context_type,
                          (PyObject **)&s.non_recording_type, (PyObject **)&s.record_type,
                          &s.empty, &s.sampled_flags, &s.default_trace_state,
                          &s.spans_globals, &s.graphs_globals, &s.capture_state, &s.snapshot,
                          &s.plans, &s.report, &s.count, &s.plain_getters};
    for (size_t i = 0; i < sizeof(owned) / sizeof(owned[0]); ++i) Py_INCREF(*owned[i]);
    s.zero = PyLong_FromLong(0);
    s.empty_args = PyTuple_New(0);
    s.zero_float = PyFloat_FromDouble(0.0);
#define I(field, text) s.field = intern(text)
    I(s_get_span_context, "get_span_context");
    I(s_process_parent, "process_parent");
    I(s_capturing, "_capturing");
    I(s_sample_root, "sample_root");
    I(s_root_always, "_root_always");
    I(s_queue, "_queue");
    I(s_append, "append");
    I(s_max_queue, "max_queue");
    I(s_batch, "_batch");
    I(s_hot, "_hot");
    I(s_encoder, "_encoder");
    I(s_encode, "encode");
    I(s_add, "add");
    I(s_dtype, "dtype");
    I(s_device, "device");
    I(s_shape, "shape");
    I(s_stride, "stride");
    I(s_wrapper_errors, "wrapper_errors");
    I(s_journal_full, "journal_full");
    I(s_add_pending, "add_pending");
    I(s_unavailable, "unavailable");
    I(s_unready, "unready");
    I(s_context, "_context");
#undef I
    if (PyErr_Occurred()) return NULL;
    s.ready = 1;
    s.api = S.api; /* lent by the event pool, possibly before this setup */
    s.tensor_type = S.tensor_type;
    S = s; /* set once per process; a second setup leaks the first (tests only) */
    Py_RETURN_NONE;
}

/* ---- argument snapshots (level 3+) ---------------------------------------------------- */

static PyObject *tensor_type(void) {
    if (S.tensor_type == NULL) {
        PyObject *modules = PyImport_GetModuleDict();
        PyObject *torch = PyDict_GetItemString(modules, "torch");
        if (torch != NULL) {
            PyObject *t = PyObject_GetAttrString(torch, "Tensor");
            if (t != NULL && PyType_Check(t)) S.tensor_type = t;
            else Py_XDECREF(t);
            ofi_clear_error();
        }
    }
    return S.tensor_type;
}

/* describe.snapshot, with tensors and scalars done here: (dtype, device, ndim, *shape,
 * *stride) for a tensor, the value itself for None/bool/int/float/str. */
static PyObject *snapshot(PyObject *value) {
    if (value == Py_None || PyLong_Check(value) || PyFloat_Check(value) ||
        PyUnicode_Check(value)) {
        Py_INCREF(value);
        return value;
    }
    if (S.api != NULL) {
        PyObject *fast = S.api->snapshot(value);
        if (fast != NULL || PyErr_Occurred()) return fast;
    }
    PyObject *tt = tensor_type();
    if (tt == NULL || !PyObject_TypeCheck(value, (PyTypeObject *)tt))
        return PyObject_CallOneArg(S.snapshot, value);
    PyObject *dtype = NULL, *device = NULL, *shape = NULL, *stride = NULL, *out = NULL;
    dtype = PyObject_GetAttr(value, S.s_dtype);
    if (dtype == NULL) goto done;
    device = PyObject_GetAttr(value, S.s_device);
    if (device == NULL) goto done;
    shape = PyObject_GetAttr(value, S.s_shape);
    if (shape == NULL || !PyTuple_Check(shape)) goto fallback;
    stride = PyObject_CallMethodNoArgs(value, S.s_stride);
    if (stride == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_RuntimeError)) goto done;
        PyErr_Clear(); /* sparse layouts have no strides: shape only */
    } else if (!PyTuple_Check(stride)) {
        goto fallback;
    }
    Py_ssize_t ndim = PyTuple_GET_SIZE(shape);
    Py_ssize_t nstride = stride ? PyTuple_GET_SIZE(stride) : 0;
    out = PyTuple_New(3 + ndim + nstride);
    if (out == NULL) goto done;
    PyTuple_SET_ITEM(out, 0, dtype);
    PyTuple_SET_ITEM(out, 1, device);
    dtype = device = NULL;
    PyObject *n = PyLong_FromSsize_t(ndim);
    if (n == NULL) {
        Py_CLEAR(out);
        goto done;
    }
    PyTuple_SET_ITEM(out, 2, n);
    for (Py_ssize_t i = 0; i < ndim; ++i) {
        PyObject *item = PyTuple_GET_ITEM(shape, i);
        Py_INCREF(item);
        PyTuple_SET_ITEM(out, 3 + i, item);
    }
    for (Py_ssize_t i = 0; i < nstride; ++i) {
        PyObject *item = PyTuple_GET_ITEM(stride, i);
        Py_INCREF(item);
        PyTuple_SET_ITEM(out, 3 + ndim + i, item);
    }
    /* dtype, device and ints cannot point back at a new tuple: no cycle to find, so the
     * collector need not look at it while its record waits in the queue. */
    PyObject_GC_UnTrack(out);
    goto done;
fallback:
    ofi_clear_error();
    out = PyObject_CallOneArg(S.snapshot, value);
done:
    Py_XDECREF(dtype);
    Py_XDECREF(device);
    Py_XDECREF(shape);
    Py_XDECREF(stride);
    return out;
}

/* ---- the crash journal (journal.Journal's begin/end, on its own lists) -------------- */

static inline void put_u16(unsigned char *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void put_u32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put_u64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }

#define BODY_NAME_MAX 64
/* journal_format.BODY = "<IQQQQqHH64sB": flags, trace hi/lo, span, parent span, start,
 * name length, args length, name, state (last). */
#define OFF_FLAGS 0
#define OFF_TRACE_HI 4
#define OFF_TRACE_LO 12
#define OFF_SPAN 20
#define OFF_PARENT_SPAN 28
#define OFF_START 36
#define OFF_NAME_LEN 44
#define OFF_ARGS_LEN 46
#define OFF_NAME 48
#define OFF_STATE (OFF_NAME + BODY_NAME_MAX)
#define ARGS_OFFSET (OFF_STATE + 1 + 3)

static int split_u128(PyObject *value, uint64_t *hi, uint64_t *lo) {
    unsigned char bytes[16];
#if PY_VERSION_HEX >= 0x030D0000
    if (_PyLong_AsByteArray((PyLongObject *)value, bytes, 16, 1, 0, 1) < 0) return -1;
#else
    if (_PyLong_AsByteArray((PyLongObject *)value, bytes, 16, 1, 0) < 0) return -1;
#endif
    memcpy(lo, bytes, 8);
    memcpy(hi, bytes + 8, 8);
    return 0;
}

/* journal.Journal._hot: (free, owners, offsets, buf, epoch, written, slot_size, mask). */
enum { J_FREE, J_OWNERS, J_OFFSETS, J_BUF, J_EPOCH, J_WRITTEN, J_SLOT_SIZE, J_MASK, J_COUNT };

/* The writable memory of a ``_hot`` tuple's buffer, looked up once per tuple: Journal
 * publishes a new tuple before it unmaps the old buffer, and the reference held here
 * keeps the tuple's address from being reused, so a cached pointer is never stale. */
static PyObject *buffer_of_hot = NULL;
static unsigned char *buffer_ptr = NULL;
static Py_ssize_t buffer_len = 0;

static int journal_buffer(PyObject *hot, unsigned char **ptr, Py_ssize_t *len) {
    if (hot != buffer_of_hot) {
        Py_buffer view;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(hot, J_BUF), &view, PyBUF_WRITABLE) < 0)
            return -1;
        buffer_ptr = (unsigned char *)view.buf;
        buffer_len = view.len;
        PyBuffer_Release(&view);
        Py_INCREF(hot);
        Py_XSETREF(buffer_of_hot, hot);
    }
    *ptr = buffer_ptr;
    *len = buffer_len;
    return 0;
}

/* The two halves of a 128-bit trace id; the last one is remembered (a step's calls all
 * share their parent's trace id object). */
static PyObject *split_trace_id = NULL;
static uint64_t split_hi, split_lo;

static PyObject *journal_hot(PyObject *journal) {
    PyObject *hot = PyObject_GetAttr(journal, S.s_hot);
    if (hot == NULL) return NULL;
    if (!PyTuple_CheckExact(hot) || PyTuple_GET_SIZE(hot) != J_COUNT ||
        !PyList_Check(PyTuple_GET_ITEM(hot, J_FREE)) ||
        !PyList_Check(PyTuple_GET_ITEM(hot, J_OWNERS)) ||
        !PyList_Check(PyTuple_GET_ITEM(hot, J_OFFSETS)) ||
        !PyList_Check(PyTuple_GET_ITEM(hot, J_WRITTEN))) {
        Py_DECREF(hot);
        PyErr_SetString(PyExc_TypeError, "journal state is not as expected");
        return NULL;
    }
    return hot;
}

/* Note a call before it runs.  Returns a new reference to the token (or None when every
 * slot is live), NULL with an exception on an internal error. */
static PyObject *journal_begin(PyObject *journal, PyObject *record, PyObject *name_bytes,
                               PyObject *args_bytes) {
    PyObject *hot = journal_hot(journal), *token = NULL, *result = NULL;
    if (hot == NULL) return NULL;
    PyObject *free_list = PyTuple_GET_ITEM(hot, J_FREE);
    PyObject *owners = PyTuple_GET_ITEM(hot, J_OWNERS);
    PyObject *offsets = PyTuple_GET_ITEM(hot, J_OFFSETS);
    PyObject *written = PyTuple_GET_ITEM(hot, J_WRITTEN);
    Py_ssize_t nfree = PyList_GET_SIZE(free_list);
    if (nfree == 0) {
        PyObject *r = PyObject_CallOneArg(S.count, S.s_journal_full);
        if (r == NULL) goto done;
        Py_DECREF(r);
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    long long epoch = PyLong_AsLongLong(PyTuple_GET_ITEM(hot, J_EPOCH));
    long long slot_size = PyLong_AsLongLong(PyTuple_GET_ITEM(hot, J_SLOT_SIZE));
    Py_ssize_t index = PyLong_AsSsize_t(PyList_GET_ITEM(free_list, nfree - 1));
    if (PyErr_Occurred()) goto done;
    if (index < 0 || index >= PyList_GET_SIZE(owners) || index >= PyList_GET_SIZE(offsets) ||
        index >= PyList_GET_SIZE(written))
        goto bad_state;
    Py_ssize_t offset = PyLong_AsSsize_t(PyList_GET_ITEM(offsets, index));
    if (offset == -1 && PyErr_Occurred()) goto done;
    uint64_t trace_hi, trace_lo, span_id, parent_span = 0;
    PyObject *parent = slot_get(record, R_PARENT);
    PyObject *trace_id = slot_get(record, R_TRACE_ID);
    if (trace_id != split_trace_id) {
        if (split_u128(trace_id, &split_hi, &split_lo) < 0) goto done;
        Py_INCREF(trace_id);
        Py_XSETREF(split_trace_id, trace_id);
    }
    trace_hi = split_hi;
    trace_lo = split_lo;
    span_id = PyLong_AsUnsignedLongLongMask(slot_get(record, R_SPAN_ID));
    if (parent != Py_None) {
        if (!PyTuple_Check(parent) || PyTuple_GET_SIZE(parent) < 2) goto bad_state;
        parent_span = PyLong_AsUnsignedLongLongMask(PyTuple_GET_ITEM(parent, 1));
    }
    long long start_ns = PyLong_AsLongLong(slot_get(record, R_START_NS));
    if (PyErr_Occurred()) goto done;
    unsigned char *base;
    Py_ssize_t base_len;
    if (journal_buffer(hot, &base, &base_len) < 0) goto done;
    if (offset < 0 || slot_size < ARGS_OFFSET || offset + slot_size > base_len) goto bad_state;
    token = PyLong_FromLongLong(epoch | (long long)index);
    if (token == NULL) goto done;
    /* Taken: from here on nothing can fail. */
    if (PyList_SetSlice(free_list, nfree - 1, nfree, NULL) < 0) goto done;
    Py_INCREF(token);
    PyList_SetItem(owners, index, token); /* steals */
    unsigned char *slot = base + offset;
    Py_ssize_t args_len = 0;
    if (args_bytes != NULL && PyBytes_Check(args_bytes)) {
        args_len = PyBytes_GET_SIZE(args_bytes);
        if (args_len > slot_size - ARGS_OFFSET) args_len = slot_size - ARGS_OFFSET;
        if (args_len > 0xFFFF) args_len = 0xFFFF;
        if (PyList_GET_ITEM(written, index) != args_bytes) {
            memcpy(slot + ARGS_OFFSET, PyBytes_AS_STRING(args_bytes), (size_t)args_len);
            Py_INCREF(args_bytes);
            PyList_SetItem(written, index, args_bytes);
        }
    }
    Py_ssize_t name_len = PyBytes_GET_SIZE(name_bytes);
    if (name_len > BODY_NAME_MAX) name_len = BODY_NAME_MAX;
    put_u32(slot + OFF_FLAGS, parent != Py_None ? 1u : 0u);
    put_u64(slot + OFF_TRACE_HI, trace_hi);
    put_u64(slot + OFF_TRACE_LO, trace_lo);
    put_u64(slot + OFF_SPAN, span_id);
    put_u64(slot + OFF_PARENT_SPAN, parent_span);
    put_u64(slot + OFF_START, (uint64_t)start_ns);
    put_u16(slot + OFF_NAME_LEN, (uint16_t)name_len);
    put_u16(slot + OFF_ARGS_LEN, (uint16_t)args_len);
    memcpy(slot + OFF_NAME, PyBytes_AS_STRING(name_bytes), (size_t)name_len);
    memset(slot + OFF_NAME + name_len, 0, (size_t)(BODY_NAME_MAX - name_len));
    __atomic_store_n(slot + OFF_STATE, (unsigned char)1, __ATOMIC_RELEASE);
    result = token;
    token = NULL;
    goto done;
bad_state:
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "journal state is not as expected");
done:
    Py_XDECREF(token);
    Py_DECREF(hot);
    return result;
}

/* The call of ``token`` finished: clear its note (journal.Journal.end). 0 or -1. */
static int journal_end(PyObject *journal, PyObject *token) {
    int rc = -1;
    PyObject *hot = journal_hot(journal);
    if (hot == NULL) return -1;
    PyObject *owners = PyTuple_GET_ITEM(hot, J_OWNERS);
    long long mask = PyLong_AsLongLong(PyTuple_GET_ITEM(hot, J_MASK));
    long long tok = PyLong_AsLongLong(token);
    if (PyErr_Occurred()) goto done;
    Py_ssize_t index = (Py_ssize_t)(tok & mask);
    if (index >= PyList_GET_SIZE(owners)) goto done;
    int same = PyObject_RichCompareBool(PyList_GET_ITEM(owners, index), token, Py_EQ);
    if (same < 0) goto done;
    if (!same) { /* a call begun before a fork, or a slot already given back */
        rc = 0;
        goto done;
    }
    PyObject *offsets = PyTuple_GET_ITEM(hot, J_OFFSETS);
    if (index >= PyList_GET_SIZE(offsets)) goto done;
    Py_ssize_t offset = PyLong_AsSsize_t(PyList_GET_ITEM(offsets, index));
    if (offset == -1 && PyErr_Occurred()) goto done;
    unsigned char *base;
    Py_ssize_t base_len;
    if (journal_buffer(hot, &base, &base_len) < 0) goto done;
    if (offset >= 0 && offset + OFF_STATE < base_len)
        __atomic_store_n(base + offset + OFF_STATE, (unsigned char)0, __ATOMIC_RELEASE);
    Py_INCREF(S.zero);
    PyList_SetItem(owners, index, S.zero);
    PyObject *idx = PyLong_FromSsize_t(index);
    if (idx == NULL) goto done;
    rc = PyList_Append(PyTuple_GET_ITEM(hot, J_FREE), idx);
    Py_DECREF(idx);
done:
    if (rc < 0 && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "journal state is not as expected");
    Py_DECREF(hot);
    return rc;
}

/* ---- the per-wrapper Entry object --------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *api_name;   /* str */
    PyObject *base_attrs; /* dict shared by every record until the worker owns it */
    PyObject *name_bytes; /* journal name */
    PyObject *plan;       /* spans.ArgPlan */
    PyObject *describe;   /* callable set on record.describe from level 3 */
    PyObject *on_capture; /* callable(record, capture) */
    PyObject *befores;    /* tuple of callables(record, plan, args, kwargs) -> state */
    PyObject *afters;     /* tuple of callables(record, state, result, error), in call order */
    PyObject *journal;    /* journal.Journal or None */
    PyObject *runtime;    /* runtime.Runtime (sample_root) */
    PyObject *submit;     /* pipeline.submit */
    /* pipeline.Pipeline whose queue submit_record appends to directly, or NULL: its
     * max_queue and _batch, fixed for its life, read once. */
    PyObject *pipeline;
    Py_ssize_t max_queue, batch;
    PyObject *gpu;        /* gpu_timing.NativeTimer (GPU time of eager CUDA calls) or None */
    /* The journal bytes of the last call's arguments and the snapshots they encode: a
     * call with the same snapshots reuses them without the encoder's hashing. */
    PyObject *last_data, *last_kw, *last_bytes;
    /* The last call's positional snapshots: an equal new one is replaced by the old
     * object, so repeated shapes leave no new tuple behind (nothing more for the garbage
     * collector) and compare by identity afterwards. */
#define LAST_ARGS 16
    PyObject *last_args[LAST_ARGS];
    int detailed, is_method, is_init, is_plan, is_run, skip_self;
} Entry;

static int entry_traverse(Entry *e, visitproc visit, void *arg) {
    Py_VISIT(e->api_name);
    Py_VISIT(e->base_attrs);
    Py_VISIT(e->name_bytes);
    Py_VISIT(e->plan);
    Py_VISIT(e->describe);
    Py_VISIT(e->on_capture);
    Py_VISIT(e->befores);
    Py_VISIT(e->afters);
    Py_VISIT(e->journal);
    Py_VISIT(e->runtime);
    Py_VISIT(e->submit);
    Py_VISIT(e->pipeline);
    Py_VISIT(e->gpu);
    Py_VISIT(e->last_data);
    Py_VISIT(e->last_kw);
    Py_VISIT(e->last_bytes);
    for (int i = 0; i < LAST_ARGS; ++i) Py_VISIT(e->last_args[i]);
    return 0;
}

static int entry_clear(Entry *e) {
    Py_CLEAR(e->api_name);
    Py_CLEAR(e->base_attrs);
    Py_CLEAR(e->name_bytes);
    Py_CLEAR(e->plan);
    Py_CLEAR(e->describe);
    Py_CLEAR(e->on_capture);
    Py_CLEAR(e->befores);
    Py_CLEAR(e->afters);
    Py_CLEAR(e->journal);
    Py_CLEAR(e->runtime);
    Py_CLEAR(e->submit);
    Py_CLEAR(e->pipeline);
    Py_CLEAR(e->gpu);
    Py_CLEAR(e->last_data);
    Py_CLEAR(e->last_kw);
    Py_CLEAR(e->last_bytes);
    for (int i = 0; i < LAST_ARGS; ++i) Py_CLEAR(e->last_args[i]);
    return 0;
}

static void entry_dealloc(Entry *e) {
    PyObject_GC_UnTrack(e);
    entry_clear(e);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

/* obj.<name> as a size >= 0 in *out; -1 with an error set otherwise. */
static int read_size(PyObject *obj, PyObject *name, Py_ssize_t *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    *out = PyLong_AsSsize_t(v);
    Py_DECREF(v);
    if (*out == -1 && PyErr_Occurred()) return -1;
    if (*out < 0) {
        PyErr_Format(PyExc_ValueError, "%U must not be negative", name);
        return -1;
    }
    return 0;
}

static int entry_init(Entry *e, PyObject *args, PyObject *kwargs) {
    static char *kw[] = {"api_name", "base_attrs", "name_bytes", "plan", "describe",
                         "on_capture", "befores", "afters", "journal", "runtime", "submit",
                         "gpu", "detailed", "is_method", "is_init", "is_plan", "is_run", "skip_self",
                         "pipeline", NULL};
    PyObject *api_name, *base_attrs, *name_bytes, *plan, *describe, *on_capture, *befores,
        *afters, *journal, *runtime, *submit, *gpu, *pipeline = Py_None;
    int detailed, is_method, is_init, is_plan, is_run, skip_self;
    if (!S.ready) {
        PyErr_SetString(PyExc_RuntimeError, "_hotpath.setup() was not called");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "UO!O!OOOO!O!OOOOpppppp|O", kw, &api_name,
                                     &PyDict_Type, &base_attrs, &PyBytes_Type, &name_bytes,
                                     &plan, &describe, &on_capture, &PyTuple_Type, &befores,
                                     &PyTuple_Type, &afters, &journal, &runtime, &submit,
                                     &gpu, &detailed, &is_method, &is_init, &is_plan, &is_run,
                                     &skip_self, &pipeline))
        return -1;
    Py_ssize_t max_queue = 0, batch = 0;
    if (pipeline != Py_None && (read_size(pipeline, S.s_max_queue, &max_queue) < 0 ||
                                read_size(pipeline, S.s_batch, &batch) < 0))
        return -1;
    entry_clear(e);
#define SET(f) (Py_INCREF(f), e->f = f)
    SET(api_name);
    SET(base_attrs);
    SET(name_bytes);
    SET(plan);
    SET(describe);
    SET(on_capture);
    SET(befores);
    SET(afters);
    SET(journal);
    SET(runtime);
    SET(submit);
    SET(gpu);
#undef SET
    if (pipeline != Py_None) {
        Py_INCREF(pipeline);
        e->pipeline = pipeline;
    }
    e->max_queue = max_queue;
    e->batch = batch;
    e->detailed = detailed;
    e->is_method = is_method;
    e->is_init = is_init;
    e->is_plan = is_plan;
    e->is_run = is_run;
    e->skip_self = skip_self;
    return 0;
}

/* pipeline.submit without its Python frame: append to the pipeline's queue (read each
 * time: a fork starts a new one), leaving to submit the rare calls that must drop the
 * oldest record, wake the worker for a full batch, or wake an idle worker (the first
 * record into an empty queue).  -1: error set. */
static int submit_record(Entry *e, PyObject *record) {
    if (e->pipeline != NULL) {
        PyObject *queue = PyObject_GetAttr(e->pipeline, S.s_queue);
        if (queue == NULL) return -1;
        Py_ssize_t n = PyObject_Size(queue);
        if (n > 0 && n < e->max_queue && n + 1 != e->batch) {
            PyObject *r = PyObject_CallMethodOneArg(queue, S.s_append, record);
            Py_DECREF(queue);
            if (r == NULL) return -1;
            Py_DECREF(r);
            return 0;
        }
        Py_DECREF(queue);
        if (n < 0) return -1;
    }
    PyObject *r = PyObject_CallOneArg(e->submit, record);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* The NonRecordingSpan that carries a call's span context as the current span. */
static PyObject *new_current_span(PyObject *span_context) {
    PyTypeObject *type = S.non_recording_type;
    if (!S.plain_span_init) return PyObject_CallOneArg((PyObject *)type, span_context);
    PyObject *span = type->tp_new(type, S.empty_args, NULL);
    if (span == NULL) return NULL;
    if (PyObject_SetAttr(span, S.s_context, span_context) < 0) {
        Py_DECREF(span);
        return NULL;
    }
    return span;
}

static PyObject *new_record(Entry *e, PyObject *trace_id, PyObject *span_id, PyObject *parent) {
    PyObject *record = S.record_type->tp_alloc(S.record_type, 0);
    if (record == NULL) return NULL;
    /* Kept out of the cyclic collector: a record waits in the queue for the worker, and
     * thousands of them would be traversed by every young collection and promoted into
     * the old generation, each full collection then walking the whole heap on whichever
     * thread allocates.  Records die by reference count; the wrapper clears the slots
     * that could close a cycle back to the record (states, capture, token) as it ends
     * the call. */
    PyObject_GC_UnTrack(record);
    slot_set(record, R_NAME, e->api_name);
    slot_set(record, R_TRACE_ID, trace_id);
    slot_set(record, R_SPAN_ID, span_id);
    slot_set(record, R_PARENT, parent);
    slot_set(record, R_ATTRIBUTES, e->base_attrs);
    slot_set(record, R_SHARED, Py_True);
    slot_set(record, R_EVENTS, S.empty);
    slot_set(record, R_LINKS, S.empty);
    slot_set(record, R_PENDING, S.empty);
    static const int nones[] = {R_ERROR, R_DESCRIBE, R_DATA, R_KW, R_RESULT, R_GPU,
                                R_PLAN_LINK, R_TOKEN, R_SLOT, R_STATES, R_CAPTURE};
    for (size_t i = 0; i < sizeof(nones) / sizeof(nones[0]); ++i)
        slot_set(record, nones[i], Py_None);
    slot_set(record, R_START_NS, S.zero);
    slot_set(record, R_END_NS, S.zero);
    slot_set(record, R_INSTANCE, S.zero);
    slot_set(record, R_DEADLINE, S.zero_float);
    return record;
}

static PyObject *new_span_context(PyObject *trace_id, PyObject *span_id) {
    PyObject *sc = S.span_context_type->tp_alloc(S.span_context_type, 6);
    if (sc == NULL) return NULL;
    PyObject *items[6] = {trace_id, span_id, Py_False, S.sampled_flags,
                          S.default_trace_state, Py_True};
    for (int i = 0; i < 6; ++i) {
        Py_INCREF(items[i]);
        PyTuple_SET_ITEM(sc, i, items[i]);
    }
    return sc;
}

/* Remember/forget the plan span of a wrapper object (spans._Instances, same dict). */
static int plans_forget(PyObject *key) {
    if (PyDict_DelItem(S.plans, key) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError)) return -1;
        PyErr_Clear();
    }
    return 0;
}

static int plans_remember(PyObject *key, PyObject *span_context) {
    if (plans_forget(key) < 0 || PyDict_SetItem(S.plans, key, span_context) < 0) return -1;
    if (PyDict_GET_SIZE(S.plans) > S.max_plans) { /* drop the oldest */
        Py_ssize_t pos = 0;
        PyObject *oldest, *value;
        if (PyDict_Next(S.plans, &pos, &oldest, &value)) {
            Py_INCREF(oldest);
            int rc = PyDict_DelItem(S.plans, oldest);
            Py_DECREF(oldest);
            return rc;
        }
    }
    return 0;
}

static int same_snapshot(PyObject *a, PyObject *b);

static PyObject *snapshots(Entry *e, PyObject *args) {
    Py_ssize_t start = e->skip_self ? 1 : 0, n = PyTuple_GET_SIZE(args);
    if (start > n) start = n;
    PyObject *out = PyList_New(n - start);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = start; i < n; ++i) {
        PyObject *snap = snapshot(PyTuple_GET_ITEM(args, i));
        if (snap == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        Py_ssize_t k = i - start;
        if (k < LAST_ARGS) {
            PyObject *prev = e->last_args[k];
            if (prev != NULL && prev != snap) {
                Py_INCREF(prev);
                int same = same_snapshot(prev, snap);
                if (same < 0) {
                    Py_DECREF(prev);
                    Py_DECREF(snap);
                    Py_DECREF(out);
                    return NULL;
                }
                if (same) {
                    Py_DECREF(snap);
                    snap = prev; /* the reference taken above */
                } else {
                    Py_DECREF(prev);
                }
            }
            if (e->last_args[k] != snap) {
                Py_INCREF(snap);
                Py_XSETREF(e->last_args[k], snap);
            }
        }
        PyList_SET_ITEM(out, k, snap);
    }
    /* A new list of fresh or cached snapshots: nothing in it refers back to it. */
    PyObject_GC_UnTrack(out);
    return out;
}

static PyObject *kw_snapshots(PyObject *kwargs) {
    PyObject *out = PyDict_New();
    if (out == NULL) return NULL;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(kwargs, &pos, &key, &value)) {
        PyObject *snap = snapshot(value);
        if (snap == NULL || PyDict_SetItem(out, key, snap) < 0) {
            Py_XDECREF(snap);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(snap);
    }
    return out;
}

/* Whether two argument snapshots encode the same: same types all the way down (1, True
 * and 1.0 are equal but encode differently) and equal values; only tensor facts and
 * scalars qualify.  1, 0, or -1 with an exception. */
static int same_value(PyObject *a, PyObject *b) {
    if (a == b) return 1;
    if (Py_TYPE(a) != Py_TYPE(b)) return 0;
    if (PyFloat_CheckExact(a)) { /* 0.0 == -0.0, but they encode differently */
        double x = PyFloat_AS_DOUBLE(a), y = PyFloat_AS_DOUBLE(b);
        return x == y && signbit(x) == signbit(y);
    }
    if (!(PyLong_CheckExact(a) || PyUnicode_CheckExact(a)))
        return 0;
    return PyObject_RichCompareBool(a, b, Py_EQ);
}

static int same_snapshot(PyObject *a, PyObject *b) {
    if (a == b) return 1;
    if (Py_TYPE(a) != Py_TYPE(b)) return 0;
    if (!PyTuple_CheckExact(a)) return same_value(a, b);
    Py_ssize_t n = PyTuple_GET_SIZE(a);
    if (n != PyTuple_GET_SIZE(b)) return 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject *x = PyTuple_GET_ITEM(a, i), *y = PyTuple_GET_ITEM(b, i);
        if (x == y) continue;
        if (i < 2) { /* dtype and device: equal objects of one type */
            if (Py_TYPE(x) != Py_TYPE(y)) return 0;
            int r = PyObject_RichCompareBool(x, y, Py_EQ);
            if (r <= 0) return r;
            continue;
        }
        int r = same_value(x, y);
        if (r <= 0) return r;
    }
    return 1;
}

static int same_snapshots(PyObject *last, PyObject *now) {
    if (last == NULL || now == NULL) return 0;
    if (PyList_Check(last)) {
        Py_ssize_t n = PyList_GET_SIZE(last);
        if (!PyList_Check(now) || PyList_GET_SIZE(now) != n) return 0;
        for (Py_ssize_t i = 0; i < n; ++i) {
            int r = same_snapshot(PyList_GET_ITEM(last, i), PyList_GET_ITEM(now, i));
            if (r <= 0) return r;
        }
        return 1;
    }
    if (PyDict_Check(last)) {
        if (!PyDict_Check(now) || PyDict_GET_SIZE(now) != PyDict_GET_SIZE(last)) return 0;
        Py_ssize_t pos = 0, pos2 = 0;
        PyObject *k1, *v1, *k2, *v2;
        while (PyDict_Next(last, &pos, &k1, &v1) && PyDict_Next(now, &pos2, &k2, &v2)) {
            int r = PyObject_RichCompareBool(k1, k2, Py_EQ);
            if (r <= 0) return r;
            r = same_snapshot(v1, v2);
            if (r <= 0) return r;
        }
        return 1;
    }
    return last == now; /* None and None */
}

/* The journal bytes of this call's argument snapshots (level 3): the last call's when
 * its snapshots were the same, else the journal's encoder. */
static PyObject *journal_args(Entry *e, PyObject *record) {
    PyObject *data = slot_get(record, R_DATA), *kw = slot_get(record, R_KW);
    if (e->last_bytes != NULL) {
        /* same_snapshots may run Python code (__eq__), which may replace e->last_* */
        PyObject *ld = e->last_data, *lk = e->last_kw, *lb = e->last_bytes;
        Py_XINCREF(ld);
        Py_XINCREF(lk);
        Py_INCREF(lb);
        int same = same_snapshots(ld, data);
        if (same > 0) same = same_snapshots(lk, kw);
        Py_XDECREF(ld);
        Py_XDECREF(lk);
        if (same > 0) return lb;
        Py_DECREF(lb);
        if (same < 0) return NULL;
    }
    PyObject *encoder = PyObject_GetAttr(e->journal, S.s_encoder);
    if (encoder == NULL) return NULL;
    PyObject *bytes = PyObject_CallMethodObjArgs(encoder, S.s_encode, data, kw, e->plan, NULL);
    Py_DECREF(encoder);
    if (bytes == NULL) return NULL;
    Py_INCREF(data);
    Py_INCREF(kw);
    Py_INCREF(bytes);
    Py_XSETREF(e->last_data, data);
    Py_XSETREF(e->last_kw, kw);
    Py_XSETREF(e->last_bytes, bytes);
    return bytes;
}

/* Whether a call touches CUDA (gpu_timing._on_cuda): a CUDA tensor among the arguments,
 * or first in a tuple/list argument.  1, 0, or -1 with an exception. */
static int on_cuda(PyObject *args, PyObject *kwargs) {
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject *value = PyTuple_GET_ITEM(args, i);
        int r = S.api->is_cuda(value);
        if (r >= 0) {
            if (r) return 1;
            continue;
        }
        if ((PyTuple_Check(value) || PyList_Check(value)) && PySequence_Fast_GET_SIZE(value) > 0 &&
            S.api->is_cuda(PySequence_Fast_GET_ITEM(value, 0)) == 1)
            return 1;
    }
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(kwargs, &pos, &key, &value))
        if (S.api->is_cuda(value) == 1) return 1;
    return 0;
}

/* A GPU time that will not come (gpu_timing.Unavailable), as a pending item. */
static int gpu_unavailable(Entry *e, PyObject *record, long long code) {
    PyObject *c = PyLong_FromLongLong(code);
    if (c == NULL) return -1;
    PyObject *pending = PyObject_CallMethodOneArg(e->gpu, S.s_unavailable, c);
    Py_DECREF(c);
    if (pending == NULL) return -1;
    PyObject *r = PyObject_CallMethodOneArg(record, S.s_add_pending, pending);
    Py_DECREF(pending);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* The start event of an eager CUDA call: until leave, record.gpu holds -(slot + 1), which
 * no packed pair can equal. */
static int gpu_begin(Entry *e, PyObject *record, PyObject *args, PyObject *kwargs) {
    /* A before hook that times the call itself (level 5's statistics launches stamp
     * the GPU clock) has set record.gpu already: no events then. */
    PyObject *timed = slot_get(record, R_GPU);
    if (timed != NULL && timed != Py_None) return 0;
    if (S.api == NULL) { /* the event pool is still compiling, or failed: Python says so */
        PyObject *r = PyObject_CallMethodObjArgs(e->gpu, S.s_unready, record, args, kwargs, NULL);
        if (r == NULL) return -1;
        Py_DECREF(r);
        return 0;
    }
    int cuda = on_cuda(args, kwargs);
    if (cuda <= 0) return cuda;
    int64_t start = S.api->record();
    if (start < 0) return gpu_unavailable(e, record, start);
    PyObject *slot = PyLong_FromLongLong(-(start + 1));
    if (slot == NULL) {
        S.api->release(start);
        return -1;
    }
    slot_steal(record, R_GPU, slot);
    return 0;
}

/* The end event: record.gpu becomes the packed pair ``start << 16 | end``. */
static int gpu_end(Entry *e, PyObject *record) {
    PyObject *slot = slot_get(record, R_GPU);
    if (slot == NULL || !PyLong_CheckExact(slot) || S.api == NULL) return 0;
    long long start = -PyLong_AsLongLong(slot) - 1;
    if (start < 0) return 0; /* already a packed pair */
    int64_t end = S.api->record();
    if (end < 0) {
        S.api->release(start);
        slot_set(record, R_GPU, Py_None);
        return gpu_unavailable(e, record, end);
    }
    PyObject *packed = PyLong_FromLongLong((start << 16) | end);
    if (packed == NULL) {
        S.api->release(start);
        S.api->release(end);
        slot_set(record, R_GPU, Py_None);
        return -1;
    }
    slot_steal(record, R_GPU, packed);
    return 0;
}

/* span.get_span_context(), read straight from ``span._context`` when the span's class
 * uses one of the getters known to do just that (the SDK's Span, NonRecordingSpan). */
static PyObject *current_span_context(PyObject *span) {
    PyObject *getter = _PyType_Lookup(Py_TYPE(span), S.s_get_span_context); /* borrowed */
    if (getter != NULL) {
        Py_ssize_t n = PyTuple_GET_SIZE(S.plain_getters);
        for (Py_ssize_t i = 0; i < n; ++i) {
            if (PyTuple_GET_ITEM(S.plain_getters, i) != getter) continue;
            PyObject *context = PyObject_GetAttr(span, S.s_context);
            if (context != NULL) return context;
            ofi_clear_error();
            break;
        }
    }
    return PyObject_CallMethodNoArgs(span, S.s_get_span_context);
}

/* A record that will not be submitted gives back the events it holds (a started call's
 * slot, or a packed pair), so a failure cannot drain the pool. */
static void gpu_drop(PyObject *record) {
    PyObject *slot = slot_get(record, R_GPU);
    if (slot == NULL || !PyLong_CheckExact(slot) || S.api == NULL) return;
    long long value = PyLong_AsLongLong(slot);
    if (value == -1 && PyErr_Occurred()) {
        ofi_clear_error();
        return;
    }
    if (value < 0) {
        S.api->release(-value - 1);
    } else {
        S.api->release(value >> 16);
        S.api->release(value & 0xFFFF);
    }
    slot_set(record, R_GPU, Py_None);
}

/* Exceptions that are not ``Exception`` (KeyboardInterrupt, SystemExit) belong to the
 * program, as in the Python wrapper: they propagate instead of being reported. */
static int pending_is_fatal(void) {
    return PyErr_Occurred() != NULL && !PyErr_ExceptionMatches(PyExc_Exception);
}

/* enter(args, kwargs) -> CallRecord of a traced call about to run, or None (not
 * traced: suppressed, not sampled, or an internal error, which is reported). */
static PyObject *entry_enter(Entry *e, PyObject *const *argv, Py_ssize_t nargs) {
    if (nargs != 2 || !PyTuple_Check(argv[0]) || !PyDict_Check(argv[1]) ||
        e->befores == NULL) {
        PyErr_SetString(PyExc_TypeError, "enter(args: tuple, kwargs: dict) of an initialised Entry");
        return NULL; /* a programming error of ours, not the user's call */
    }
    PyObject *args = argv[0], *kwargs = argv[1];
    PyObject *ctx = NULL, *parent = NULL, *trace_id = NULL, *span_id = NULL, *record = NULL;
    PyObject *span_context = NULL, *nrs = NULL, *new_ctx = NULL, *token = NULL;
    PyObject *slot = NULL, *key = NULL;
    const char *where = "tracing a call failed before the call";
    int fatal = 0;

    if (PyContextVar_Get(S.var, NULL, &ctx) < 0) goto error;
    if (ctx == NULL || !PyDict_Check(ctx)) goto untraced;
    PyObject *suppress = PyDict_GetItemWithError(ctx, S.suppress_key);
    if (suppress != NULL) {
        int truth = PyObject_IsTrue(suppress);
        if (truth < 0) goto error;
        if (truth) goto untraced;
    } else if (PyErr_Occurred()) {
        goto error;
    }
    PyObject *span = PyDict_GetItemWithError(ctx, S.span_key);
    if (span != NULL) {
        parent = current_span_context(span);
        if (parent == NULL) goto error;
    } else if (PyErr_Occurred()) {
        goto error;
    } else {
        parent = PyDict_GetItemWithError(S.spans_globals, S.s_process_parent);
        if (parent == NULL && PyErr_Occurred()) goto error;
        if (parent == NULL) parent = Py_None;
        Py_INCREF(parent);
    }
    int valid = 0;
    if (parent != Py_None) {
        if (!PyObject_TypeCheck(parent, S.span_context_type) || PyTuple_GET_SIZE(parent) < 6) {
            PyErr_SetString(PyExc_TypeError, "the current span's context is not a SpanContext");
            goto error;
        }
        valid = PyObject_IsTrue(PyTuple_GET_ITEM(parent, 5));
        if (valid < 0) goto error;
    }
    uint64_t bits;
    if (valid) {
        long flags = PyLong_AsLong(PyTuple_GET_ITEM(parent, 3));
        if (flags == -1 && PyErr_Occurred()) goto error;
        if (!(flags & 1)) goto untraced;
        trace_id = PyTuple_GET_ITEM(parent, 0);
        if (!PyLong_CheckExact(trace_id) || !PyLong_CheckExact(PyTuple_GET_ITEM(parent, 1))) {
            trace_id = NULL;
            PyErr_SetString(PyExc_TypeError, "the current span's ids are not ints");
            goto error;
        }
        Py_INCREF(trace_id);
    } else {
        uint64_t hi, lo;
        if (rng_next(&hi) < 0 || rng_next(&lo) < 0) {
            PyErr_SetString(PyExc_OSError, "getrandom failed");
            goto error;
        }
        unsigned char bytes[16];
        memcpy(bytes, &lo, 8);
        memcpy(bytes + 8, &hi, 8);
        trace_id = _PyLong_FromByteArray(bytes, 16, 1, 0);
        if (trace_id == NULL) goto error;
        /* The SDK's default sampler takes every root: the runtime says so once it knows,
         * and the call to ask it is skipped. */
        PyObject *always = PyObject_GetAttr(e->runtime, S.s_root_always);
        if (always == NULL) goto error;
        int truth = always == Py_True;
        Py_DECREF(always);
        if (!truth) {
            PyObject *sampled = PyObject_CallMethodObjArgs(e->runtime, S.s_sample_root, trace_id,
                                                           e->api_name, NULL);
            if (sampled == NULL) goto error;
            truth = PyObject_IsTrue(sampled);
            Py_DECREF(sampled);
            if (truth < 0) goto error;
        }
        if (!truth) goto untraced;
        Py_DECREF(parent);
        parent = Py_None;
        Py_INCREF(parent);
    }
    if (rng_next(&bits) < 0) {
        PyErr_SetString(PyExc_OSError, "getrandom failed");
        goto error;
    }
    span_id = PyLong_FromUnsignedLongLong(bits);
    if (span_id == NULL) goto error;
    record = new_record(e, trace_id, span_id, parent);
    if (record == NULL) goto error;
    span_context = new_span_context(trace_id, span_id);
    if (span_context == NULL) goto error;

    if (e->is_method && PyTuple_GET_SIZE(args) > 0) {
        key = PyLong_FromVoidPtr(PyTuple_GET_ITEM(args, 0));
        if (key == NULL) goto error;
        slot_set(record, R_INSTANCE, key);
        if (e->is_init) {
            if (plans_forget(key) < 0) goto error;
        } else if (e->is_plan) {
            if (plans_remember(key, span_context) < 0) goto error;
        } else if (e->is_run) {
            PyObject *plan_context = PyDict_GetItemWithError(S.plans, key);
            if (plan_context != NULL) slot_set(record, R_PLAN_LINK, plan_context);
            else if (PyErr_Occurred()) goto error;
        }
    }
    PyObject *capturing = PyDict_GetItemWithError(S.graphs_globals, S.s_capturing);
    if (capturing == NULL && PyErr_Occurred()) goto error;
    if (capturing != NULL && capturing != Py_None) {
        PyObject *capture = PyObject_CallNoArgs(S.capture_state);
        if (capture == NULL) goto error;
        if (capture != Py_None) {
            PyObject *r = PyObject_CallFunctionObjArgs(e->on_capture, record, capture, NULL);
            if (r == NULL) {
                Py_DECREF(capture);
                goto error;
            }
            Py_DECREF(r);
        }
        slot_steal(record, R_CAPTURE, capture);
    }
    PyObject *args_bytes = NULL;
    if (e->detailed) {
        PyObject *data = snapshots(e, args);
        if (data == NULL) goto error;
        slot_steal(record, R_DATA, data);
        if (PyDict_GET_SIZE(kwargs) > 0) {
            PyObject *kw = kw_snapshots(kwargs);
            if (kw == NULL) goto error;
            slot_steal(record, R_KW, kw);
        }
    }
    Py_ssize_t nbefore = PyTuple_GET_SIZE(e->befores);
    if (nbefore > 0) {
        PyObject *states = PyList_New(0); /* never exposed with NULL items; owned here */
        if (states == NULL) goto error;
        for (Py_ssize_t i = 0; i < nbefore; ++i) {
            PyObject *state = PyObject_CallFunctionObjArgs(PyTuple_GET_ITEM(e->befores, i),
                                                           record, e->plan, args, kwargs, NULL);
            if (state == NULL || PyList_Append(states, state) < 0) {
                Py_XDECREF(state);
                Py_DECREF(states);
                goto error; /* states begun so far: abandoned like Python's */
            }
            Py_DECREF(state);
        }
        slot_steal(record, R_STATES, states);
    }
    if (e->gpu != Py_None && slot_get(record, R_CAPTURE) == Py_None &&
        gpu_begin(e, record, args, kwargs) < 0)
        goto error;
    PyObject *start = now_ns();
    if (start == NULL) goto error;
    slot_steal(record, R_START_NS, start);
    if (e->journal != Py_None) {
        if (e->detailed) {
            args_bytes = journal_args(e, record);
            if (args_bytes == NULL) goto error;
        }
        slot = journal_begin(e->journal, record, e->name_bytes, args_bytes);
        Py_XDECREF(args_bytes);
        if (slot == NULL) goto error;
    }
    nrs = new_current_span(span_context);
    if (nrs == NULL) goto error_journal;
    new_ctx = PyObject_CallNoArgs((PyObject *)Py_TYPE(ctx));
    if (new_ctx == NULL || !PyDict_Check(new_ctx)) goto error_journal;
    if (PyDict_Update(new_ctx, ctx) < 0 || PyDict_SetItem(new_ctx, S.span_key, nrs) < 0)
        goto error_journal;
    token = PyContextVar_Set(S.var, new_ctx);
    if (token == NULL) goto error_journal;
    slot_steal(record, R_TOKEN, token);
    if (slot != NULL) slot_steal(record, R_SLOT, slot);
    slot = NULL;
    goto done;

error_journal:
    if (slot != NULL && slot != Py_None) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (journal_end(e->journal, slot) < 0) ofi_clear_error();
        PyErr_Restore(type, value, tb);
    }
error:
    fatal = pending_is_fatal();
    if (!fatal) report_error(where);
untraced:
    if (record != NULL) gpu_drop(record);
    Py_CLEAR(record);
done:
    Py_XDECREF(ctx);
    Py_XDECREF(parent);
    Py_XDECREF(trace_id);
    Py_XDECREF(span_id);
    Py_XDECREF(span_context);
    Py_XDECREF(nrs);
    Py_XDECREF(new_ctx);
    Py_XDECREF(slot);
    Py_XDECREF(key);
    if (fatal) return NULL;
    if (record == NULL) Py_RETURN_NONE;
    return record;
}

/* leave(record, result): the traced call returned ``result``. Never raises; the journal
 * note is cleared even when a step before it failed. */
static PyObject *entry_leave(Entry *e, PyObject *const *argv, Py_ssize_t nargs) {
    if (nargs != 2 || e->befores == NULL || !PyObject_TypeCheck(argv[0], S.record_type)) {
        PyErr_SetString(PyExc_TypeError, "leave(record, result) of an initialised Entry");
        return NULL;
    }
    PyObject *record = argv[0], *result = argv[1];
    int submitted = 0;
    PyObject *slot = slot_get(record, R_SLOT);
    if (slot != NULL && slot != Py_None) Py_INCREF(slot);
    else slot = NULL;
    slot_set(record, R_SLOT, Py_None);
    PyObject *end = now_ns();
    if (end == NULL) goto error;
    slot_steal(record, R_END_NS, end);
    PyObject *token = slot_get(record, R_TOKEN);
    if (token != NULL && token != Py_None) {
        Py_INCREF(token);
        slot_set(record, R_TOKEN, Py_None);
        int rc = PyContextVar_Reset(S.var, token);
        Py_DECREF(token);
        /* Ended in another context than it began in (a coroutine closed outside its
         * task): nothing of ours is current there, and the span still ends. */
        if (rc < 0 && (PyErr_ExceptionMatches(PyExc_ValueError) ||
                       PyErr_ExceptionMatches(PyExc_RuntimeError)))
            PyErr_Clear();
        else if (rc < 0)
            goto error;
    }
    if (e->gpu != Py_None && gpu_end(e, record) < 0) goto error;
    PyObject *states = slot_get(record, R_STATES);
    Py_ssize_t nafter = PyTuple_GET_SIZE(e->afters);
    if (nafter > 0 && states != NULL && PyList_Check(states)) {
        Py_INCREF(states);
        slot_set(record, R_STATES, Py_None);
        Py_ssize_t n = PyList_GET_SIZE(states);
        for (Py_ssize_t i = 0; i < nafter && i < n; ++i) {
            PyObject *r = PyObject_CallFunctionObjArgs(PyTuple_GET_ITEM(e->afters, i), record,
                                                       PyList_GET_ITEM(states, n - 1 - i),
                                                       result, Py_None, NULL);
            if (r == NULL) {
                Py_DECREF(states);
                goto error;
            }
            Py_DECREF(r);
        }
        Py_DECREF(states);
    }
    if (e->detailed) {
        PyObject *snap = snapshot(result);
        if (snap == NULL) goto error;
        slot_steal(record, R_RESULT, snap);
        slot_set(record, R_DESCRIBE, e->describe);
    }
    PyObject *capture = slot_get(record, R_CAPTURE);
    if (capture != NULL && capture != Py_None) {
        Py_INCREF(capture);
        slot_set(record, R_CAPTURE, Py_None);
        PyObject *r = PyObject_CallMethodOneArg(capture, S.s_add, record);
        Py_DECREF(capture);
        if (r == NULL) goto error;
        Py_DECREF(r);
    }
    if (submit_record(e, record) < 0) goto error;
    submitted = 1;
    if (slot != NULL) {
        int rc = journal_end(e->journal, slot);
        Py_CLEAR(slot);
        if (rc < 0) goto error;
    }
    Py_RETURN_NONE;
error:;
    int fatal = pending_is_fatal();
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    if (fatal) PyErr_Fetch(&type, &value, &tb);
    else report_error("tracing a call failed after the call");
    if (!submitted) gpu_drop(record);
    if (slot != NULL) {
        if (journal_end(e->journal, slot) < 0) report_error("clearing a journal note failed");
        Py_DECREF(slot);
    }
    if (fatal) {
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *entry_journal_end(Entry *e, PyObject *token) {
    if (e->journal != Py_None && token != Py_None && journal_end(e->journal, token) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *entry_gpu_end(Entry *e, PyObject *record) {
    if (!PyObject_TypeCheck(record, S.record_type)) {
        PyErr_SetString(PyExc_TypeError, "gpu_end(record)");
        return NULL;
    }
    if (e->gpu != Py_None && gpu_end(e, record) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef entry_methods[] = {
    {"gpu_end", (PyCFunction)entry_gpu_end, METH_O,
     "record the end event of a call that raised"},
    {"enter", (PyCFunction)(void (*)(void))entry_enter, METH_FASTCALL,
     "enter(args, kwargs) -> CallRecord or None"},
    {"leave", (PyCFunction)(void (*)(void))entry_leave, METH_FASTCALL,
     "leave(record, result) -> None; never raises"},
    {"journal_end", (PyCFunction)entry_journal_end, METH_O,
     "clear the journal note of a token (the error path)"},
    {NULL, NULL, 0, NULL}};

static PyTypeObject EntryType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "otel_flashinfer._hotpath.Entry",
    .tp_basicsize = sizeof(Entry),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The native enter/leave of one traced target (see spans.make_wrapper).",
    .tp_traverse = (traverseproc)entry_traverse,
    .tp_clear = (inquiry)entry_clear,
    .tp_dealloc = (destructor)entry_dealloc,
    .tp_init = (initproc)entry_init,
    .tp_new = PyType_GenericNew,
    .tp_methods = entry_methods,
};

/* ---- Switch: a hook whose target can change -------------------------------------- */

/* Entries hold their hooks in tuples fixed when the wrapper is made, but a better
 * implementation of a hook can arrive later (the statistics extension builds in the
 * background).  A Switch forwards every call to its current ``target`` (one vectorcall
 * more), and setting ``target`` swaps it for every wrapper at once. */
typedef struct {
    PyObject_HEAD
    PyObject *target;
    vectorcallfunc vectorcall;
} Switch;

static PyObject *switch_call(PyObject *self, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames) {
    PyObject *target = ((Switch *)self)->target;
    if (target == NULL) { /* cleared by the collector's teardown */
        PyErr_SetString(PyExc_RuntimeError, "Switch has no target");
        return NULL;
    }
    Py_INCREF(target); /* a swap during the call must not free it */
    PyObject *r = PyObject_Vectorcall(target, args, nargsf, kwnames);
    Py_DECREF(target);
    return r;
}

static int switch_set_target(Switch *self, PyObject *value, void *closure) {
    if (value == NULL || !PyCallable_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "Switch.target must be callable");
        return -1;
    }
    Py_INCREF(value);
    Py_SETREF(self->target, value);
    return 0;
}

static PyObject *switch_get_target(Switch *self, void *closure) {
    PyObject *target = self->target != NULL ? self->target : Py_None;
    Py_INCREF(target);
    return target;
}

static int switch_init(Switch *self, PyObject *args, PyObject *kwds) {
    PyObject *target;
    if (!PyArg_ParseTuple(args, "O:Switch", &target)) return -1;
    return switch_set_target(self, target, NULL);
}

static int switch_traverse(Switch *self, visitproc visit, void *arg) {
    Py_VISIT(self->target);
    return 0;
}

static int switch_clear(Switch *self) {
    Py_CLEAR(self->target);
    return 0;
}

static void switch_dealloc(Switch *self) {
    PyObject_GC_UnTrack(self);
    switch_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *switch_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Switch *self = (Switch *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->target = Py_None;
    Py_INCREF(Py_None);
    self->vectorcall = switch_call;
    return (PyObject *)self;
}

static PyGetSetDef switch_getset[] = {
    {"target", (getter)switch_get_target, (setter)switch_set_target,
     "the callable every call goes to", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject SwitchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "otel_flashinfer._hotpath.Switch",
    .tp_basicsize = sizeof(Switch),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Switch(target): calls go to target, which can be replaced.",
    .tp_vectorcall_offset = offsetof(Switch, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_traverse = (traverseproc)switch_traverse,
    .tp_clear = (inquiry)switch_clear,
    .tp_dealloc = (destructor)switch_dealloc,
    .tp_init = (initproc)switch_init,
    .tp_new = switch_new,
    .tp_getset = switch_getset,
};

/* ---- Wrapper: the traced function itself ------------------------------------------ */

/* What spans._native_wrapper's Python function did, without its frame: enter, the call,
 * leave, and on an exception ``failed(record, exc)`` (the rare path stays in Python)
 * before the user's exception goes on unchanged.  Binds to instances like a function
 * (a method descriptor) and keeps a __dict__ for functools.update_wrapper's names. */
typedef struct {
    PyObject_HEAD
    Entry *entry;
    PyObject *fn;
    PyObject *failed;
    PyObject *dict;
    vectorcallfunc vectorcall;
} Wrapper;

static PyObject *wrapper_call(PyObject *self, PyObject *const *args, size_t nargsf,
                              PyObject *kwnames) {
    Wrapper *w = (Wrapper *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *pair[2] = {NULL, NULL};
    pair[0] = PyTuple_New(nargs);
    pair[1] = PyDict_New();
    if (pair[0] == NULL || pair[1] == NULL) goto fail;
    for (Py_ssize_t i = 0; i < nargs; ++i) {
        Py_INCREF(args[i]);
        PyTuple_SET_ITEM(pair[0], i, args[i]);
    }
    for (Py_ssize_t i = 0; i < nkw; ++i)
        if (PyDict_SetItem(pair[1], PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0)
            goto fail;
    PyObject *record = entry_enter(w->entry, pair, 2);
    Py_CLEAR(pair[0]);
    Py_CLEAR(pair[1]);
    if (record == NULL) return NULL; /* fatal (MemoryError, KeyboardInterrupt): as Python */
    PyObject *result = PyObject_Vectorcall(w->fn, args, nargsf, kwnames);
    if (record == Py_None) {
        Py_DECREF(record);
        return result;
    }
    if (result == NULL) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb != NULL && value != NULL) PyException_SetTraceback(value, tb);
        PyObject *r = PyObject_CallFunctionObjArgs(w->failed, record, value, NULL);
        Py_DECREF(record);
        if (r == NULL && pending_is_fatal()) { /* KeyboardInterrupt meanwhile: it goes on */
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            return NULL;
        }
        if (r == NULL) ofi_clear_error(); /* failed() reports its own errors; the user's wins */
        Py_XDECREF(r);
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    PyObject *pair2[2] = {record, result};
    PyObject *r = entry_leave(w->entry, pair2, 2);
    Py_DECREF(record);
    if (r == NULL) {
        Py_DECREF(result);
        return NULL;
    }
    Py_DECREF(r);
    return result;
fail:
    Py_XDECREF(pair[0]);
    Py_XDECREF(pair[1]);
    return NULL;
}

static int wrapper_init(Wrapper *self, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"entry", "fn", "failed", NULL};
    PyObject *entry, *fn, *failed;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OO:Wrapper", kw, &EntryType, &entry, &fn,
                                     &failed))
        return -1;
    if (!PyCallable_Check(fn) || !PyCallable_Check(failed)) {
        PyErr_SetString(PyExc_TypeError, "Wrapper(entry, fn, failed): fn and failed must be callable");
        return -1;
    }
    Py_INCREF(entry);
    Py_XSETREF(self->entry, (Entry *)entry);
    Py_INCREF(fn);
    Py_XSETREF(self->fn, fn);
    Py_INCREF(failed);
    Py_XSETREF(self->failed, failed);
    return 0;
}

static PyObject *wrapper_descr_get(PyObject *self, PyObject *obj, PyObject *type) {
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(self);
        return self;
    }
    return PyMethod_New(self, obj);
}

static int wrapper_traverse(Wrapper *self, visitproc visit, void *arg) {
    Py_VISIT(self->entry);
    Py_VISIT(self->fn);
    Py_VISIT(self->failed);
    Py_VISIT(self->dict);
    return 0;
}

static int wrapper_clear(Wrapper *self) {
    Py_CLEAR(self->entry);
    Py_CLEAR(self->fn);
    Py_CLEAR(self->failed);
    Py_CLEAR(self->dict);
    return 0;
}

static void wrapper_dealloc(Wrapper *self) {
    PyObject_GC_UnTrack(self);
    wrapper_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *wrapper_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Wrapper *self = (Wrapper *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->vectorcall = wrapper_call;
    return (PyObject *)self;
}

static PyObject *wrapper_repr(Wrapper *self) {
    PyObject *name = self->dict != NULL ? PyDict_GetItemString(self->dict, "__qualname__") : NULL;
    if (name != NULL) return PyUnicode_FromFormat("<traced function %S>", name);
    return PyUnicode_FromFormat("<traced function at %p>", self);
}

static PyGetSetDef wrapper_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL}};

/* Pickled and copied as the function it stands for: pickle saves a reference by name
 * (``__module__`` + ``__qualname__``, where this wrapper is installed), and copy.copy and
 * deepcopy return it, as they do a function (a model holding one could not be copied,
 * nor a partial of one sent to a spawned worker). */
static PyObject *wrapper_reduce(Wrapper *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *name = self->dict != NULL ? PyDict_GetItemString(self->dict, "__qualname__") : NULL;
    if (name == NULL) {
        PyErr_SetString(PyExc_TypeError, "cannot pickle a traced function without a name");
        return NULL;
    }
    Py_INCREF(name);
    return name;
}

static PyObject *wrapper_same(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    Py_INCREF(self);
    return self;
}

static PyMethodDef wrapper_methods[] = {
    {"__reduce__", (PyCFunction)wrapper_reduce, METH_NOARGS, NULL},
    {"__copy__", (PyCFunction)wrapper_same, METH_NOARGS, NULL},
    {"__deepcopy__", (PyCFunction)wrapper_same, METH_O, NULL},
    {NULL, NULL, 0, NULL}};

static PyTypeObject WrapperType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "otel_flashinfer._hotpath.Wrapper",
    .tp_basicsize = sizeof(Wrapper),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_vectorcall_offset = offsetof(Wrapper, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = wrapper_descr_get,
    .tp_dictoffset = offsetof(Wrapper, dict),
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_repr = (reprfunc)wrapper_repr,
    .tp_traverse = (traverseproc)wrapper_traverse,
    .tp_clear = (inquiry)wrapper_clear,
    .tp_dealloc = (destructor)wrapper_dealloc,
    .tp_init = (initproc)wrapper_init,
    .tp_new = wrapper_new,
    .tp_getset = wrapper_getset,
    .tp_methods = wrapper_methods,
};

/* ---- CUDA graph replays that are not traced ----------------------------------------- */

/* One graph's replays that are surely not traced, as ``graphs``' sampler armed them
 * (``ReplaySampler.arm``): ``count`` replays more, or every replay before ``until``
 * (``time.monotonic()`` seconds; CLOCK_MONOTONIC, the same clock on Linux); with both,
 * until the first of the two runs out.
 * ``skipped`` counts those the gate let through since Python last took them. */
typedef struct {
    PyObject_HEAD
    long long count;
    long long skipped;
    double until;
    /* A graph whose statistics launches are gated (level 5, not every replay traced):
     * its captured launches run when a word in device memory says so, and Python writes
     * that word before each replay it sees.  ``gate_key(gate_device, False)`` (the
     * statistics extension's) is what the word must be for an untraced replay on the
     * current stream; ``gate_closed`` what Python last wrote, closed (-1: open or not
     * known; a key is never negative).  An armed replay goes straight to torch only
     * while the two agree: on another stream, or with the word open, it asks.  NULL:
     * not gated. */
    PyObject *gate_key;
    PyObject *gate_device;
    long long gate_closed;
    /* A gated graph with an executable copy that leaves its statistics nodes out
     * (stats/lean_graph.py): an armed replay launches ``lean_exec`` through ``lean``
     * (the statistics extension's lean_launch capsule) on ``lean_device``'s current
     * stream, with the GIL released, instead of torch's replay.  A failed launch
     * counts ``lean_failed``, drops the copy and disarms, and the replay goes to
     * Python, which falls back to torch's.  0: no copy. */
    PyObject *lean;
    long long lean_exec;
    int lean_device;
    long long lean_failed;
} GraphSkip;

typedef int (*lean_launch_fn)(int64_t exec, int device);

static PyMemberDef graph_skip_members[] = {
    {"count", T_LONGLONG, offsetof(GraphSkip, count), 0, "replays still surely untraced"},
    {"skipped", T_LONGLONG, offsetof(GraphSkip, skipped), 0, "replays the gate let through"},
    {"until", T_DOUBLE, offsetof(GraphSkip, until), 0, "untraced before this monotonic time"},
    {"gate_key", T_OBJECT, offsetof(GraphSkip, gate_key), 0,
     "gated graphs: the statistics extension's gate_key(device, on), else None"},
    {"gate_device", T_OBJECT, offsetof(GraphSkip, gate_device), 0,
     "gated graphs: the device index gate_key is asked about"},
    {"gate_closed", T_LONGLONG, offsetof(GraphSkip, gate_closed), 0,
     "gated graphs: the closed word last written (its gate_key), -1: open or unknown"},
    {"lean", T_OBJECT, offsetof(GraphSkip, lean), 0,
     "the statistics extension's lean_launch capsule, or None"},
    {"lean_exec", T_LONGLONG, offsetof(GraphSkip, lean_exec), 0,
     "the executable graph without statistics that armed replays launch (0: none)"},
    {"lean_device", T_INT, offsetof(GraphSkip, lean_device), 0, "the device of lean_exec"},
    {"lean_failed", T_LONGLONG, offsetof(GraphSkip, lean_failed), 0,
     "launches of lean_exec that failed (each dropped it)"},
    {NULL, 0, 0, 0, NULL}};

static void graph_skip_dealloc(GraphSkip *self) {
    Py_CLEAR(self->gate_key);
    Py_CLEAR(self->gate_device);
    Py_CLEAR(self->lean);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *graph_skip_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    GraphSkip *self = (GraphSkip *)PyType_GenericNew(type, args, kwds);
    if (self != NULL) self->gate_closed = -1;
    return (PyObject *)self;
}

static PyTypeObject GraphSkipType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "otel_flashinfer._hotpath.GraphSkip",
    .tp_basicsize = sizeof(GraphSkip),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_members = graph_skip_members,
    .tp_dealloc = (destructor)graph_skip_dealloc,
    .tp_new = graph_skip_new,
};

/* A gated graph's word is closed for a replay on the current stream (see GraphSkip);
 * an error (reported by nobody: the replay asks, and Python's write reports) says no. */
static int gate_still_closed(GraphSkip *skip) {
    if (skip->gate_closed < 0 || skip->gate_device == NULL) return 0;
    PyObject *args[2] = {skip->gate_device, Py_False};
    PyObject *key = PyObject_Vectorcall(skip->gate_key, args, 2, NULL);
    if (key == NULL) {
        PyErr_Clear();
        return 0;
    }
    long long now = PyLong_AsLongLong(key);
    Py_DECREF(key);
    if (now == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return now == skip->gate_closed;
}

/* ``CUDAGraph.replay`` while traced: a replay its graph's GraphSkip says is untraced
 * goes straight to the original replay, counted; every other replay (and a graph we
 * did not capture) runs ``slow``, graphs.py's Python replay.  The Python path cost an
 * untraced replay about 2 us of CPU on the CI box (more when replays are paced), a
 * third of ``REPLAY_EVERY=auto``'s whole 1% budget for a 629 us step.  Binds to
 * instances like a function. */
typedef struct {
    PyObject_HEAD
    PyObject *original; /* the replay torch had */
    PyObject *slow;     /* graphs.py's replay_ */
    PyObject *skips;    /* graphs._skips.data: weakref(graph) -> GraphSkip */
    vectorcallfunc vectorcall;
} ReplayGate;

/* An armed graph's replay: whether it goes straight to torch (counted), by its gate's
 * word (gated graphs), ``until`` and ``count``. */
static int skip_armed(GraphSkip *skip) {
    if (skip->gate_key != NULL && skip->gate_key != Py_None && !gate_still_closed(skip))
        return 0; /* asks: Python writes the word for this stream, and arms again */
    if (skip->until > 0.0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        if ((double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec >= skip->until) {
            skip->until = 0.0; /* the deadline came first (or alone): this one asks */
            skip->count = 0;
            return 0;
        }
        /* With a count too, the first of the two to run out ends it. */
        if (skip->count > 0 && --skip->count == 0) skip->until = 0.0;
    } else if (skip->count > 0) {
        skip->count--;
    } else {
        return 0;
    }
    skip->skipped++;
    return 1;
}

/* An armed replay of a graph armed for a lean copy: 1 launched, 0 not armed for one
 * (torch's replay goes), -1 the copy is gone or its launch failed (counted): disarmed,
 * and Python's replay goes, which falls back to torch's with the statistics' word
 * closed (armed for a copy, the gate does not check the word). */
static int lean_replay(GraphSkip *skip) {
    if (skip->lean == NULL || skip->lean == Py_None) return 0;
    skip->skipped--; /* counted again once launched; else Python's replay counts it */
    if (skip->lean_exec != 0) {
        lean_launch_fn fn = NULL;
        if (PyCapsule_CheckExact(skip->lean))
            fn = (lean_launch_fn)PyCapsule_GetPointer(skip->lean, "otel_flashinfer.lean_launch");
        int rc = -1;
        if (fn == NULL) {
            PyErr_Clear();
        } else {
            long long exec = skip->lean_exec;
            int device = skip->lean_device;
            Py_BEGIN_ALLOW_THREADS
            rc = fn(exec, device);
            Py_END_ALLOW_THREADS
        }
        if (rc == 0) {
            skip->skipped++;
            return 1;
        }
        skip->lean_failed++;
        skip->lean_exec = 0;
    }
    skip->count = 0;
    skip->until = 0.0;
    return -1;
}

static int skip_now(PyObject *graph, PyObject *skips, int *lean) {
    PyObject *ref = PyWeakref_NewRef(graph, NULL); /* the graph's basic ref, reused */
    if (ref == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *found = PyDict_GetItemWithError(skips, ref); /* borrowed */
    Py_DECREF(ref);
    if (found == NULL) {
        PyErr_Clear();
        return 0;
    }
    if (!Py_IS_TYPE(found, &GraphSkipType)) return 0;
    GraphSkip *skip = (GraphSkip *)found;
    if (skip->until <= 0.0 && skip->count <= 0) return 0;
    Py_INCREF(found); /* borrowed from the dict, and a gated graph's check calls out */
    int skipped = skip_armed(skip);
    if (skipped) *lean = lean_replay(skip);
    Py_DECREF(found);
    return skipped;
}

static PyObject *gate_call(PyObject *self, PyObject *const *args, size_t nargsf,
                           PyObject *kwnames) {
    ReplayGate *g = (ReplayGate *)self;
    if (g->slow == NULL || g->original == NULL || g->skips == NULL) {
        PyErr_SetString(PyExc_TypeError, "ReplayGate was not initialised");
        return NULL;
    }
    int lean = 0;
    if (PyVectorcall_NARGS(nargsf) >= 1 && PyDict_CheckExact(g->skips) &&
        skip_now(args[0], g->skips, &lean)) {
        if (lean > 0) Py_RETURN_NONE; /* torch's replay returns None too */
        if (lean == 0) return PyObject_Vectorcall(g->original, args, nargsf, kwnames);
    }
    return PyObject_Vectorcall(g->slow, args, nargsf, kwnames);
}

static int gate_init(ReplayGate *self, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"original", "slow", "skips", NULL};
    PyObject *original, *slow, *skips;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO!:ReplayGate", kw, &original, &slow,
                                     &PyDict_Type, &skips))
        return -1;
    if (!PyCallable_Check(original) || !PyCallable_Check(slow)) {
        PyErr_SetString(PyExc_TypeError, "ReplayGate(original, slow, skips): original and "
                                         "slow must be callable");
        return -1;
    }
    Py_INCREF(original);
    Py_XSETREF(self->original, original);
    Py_INCREF(slow);
    Py_XSETREF(self->slow, slow);
    Py_INCREF(skips);
    Py_XSETREF(self->skips, skips);
    return 0;
}

static int gate_traverse(ReplayGate *self, visitproc visit, void *arg) {
    Py_VISIT(self->original);
    Py_VISIT(self->slow);
    Py_VISIT(self->skips);
    return 0;
}

static int gate_clear(ReplayGate *self) {
    Py_CLEAR(self->original);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->skips);
    return 0;
}

static void gate_dealloc(ReplayGate *self) {
    PyObject_GC_UnTrack(self);
    gate_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *gate_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    ReplayGate *self = (ReplayGate *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->vectorcall = gate_call;
    return (PyObject *)self;
}

static PyMemberDef gate_members[] = {
    {"original", T_OBJECT, offsetof(ReplayGate, original), READONLY, "torch's replay"},
    {NULL, 0, 0, 0, NULL}};

/* __name__, __qualname__, __doc__ and __wrapped__: the original replay's, for code
 * that inspects CUDAGraph.replay as the function it was. */
static PyObject *gate_get_of_original(ReplayGate *self, void *name) {
    if (self->original == NULL) {
        PyErr_SetString(PyExc_AttributeError, (const char *)name);
        return NULL;
    }
    if (strcmp((const char *)name, "__wrapped__") == 0) {
        Py_INCREF(self->original);
        return self->original;
    }
    return PyObject_GetAttrString(self->original, (const char *)name);
}

static PyGetSetDef gate_getset[] = {
    {"__name__", (getter)gate_get_of_original, NULL, NULL, "__name__"},
    {"__qualname__", (getter)gate_get_of_original, NULL, NULL, "__qualname__"},
    {"__doc__", (getter)gate_get_of_original, NULL, NULL, "__doc__"},
    {"__wrapped__", (getter)gate_get_of_original, NULL, NULL, "__wrapped__"},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject ReplayGateType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "otel_flashinfer._hotpath.ReplayGate",
    .tp_basicsize = sizeof(ReplayGate),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_vectorcall_offset = offsetof(ReplayGate, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = wrapper_descr_get,
    .tp_traverse = (traverseproc)gate_traverse,
    .tp_clear = (inquiry)gate_clear,
    .tp_dealloc = (destructor)gate_dealloc,
    .tp_init = (initproc)gate_init,
    .tp_new = gate_new,
    .tp_members = gate_members,
    .tp_getset = gate_getset,
};

/* ---- module ------------------------------------------------------------------------ */

static PyObject *hp_snapshot(PyObject *self, PyObject *value) {
    if (!S.ready) {
        PyErr_SetString(PyExc_RuntimeError, "_hotpath.setup() was not called");
        return NULL;
    }
    return snapshot(value);
}

static PyObject *hp_gpu_drop(PyObject *self, PyObject *record) {
    if (!S.ready || !PyObject_TypeCheck(record, S.record_type)) {
        PyErr_SetString(PyExc_TypeError, "gpu_drop(record)");
        return NULL;
    }
    gpu_drop(record);
    Py_RETURN_NONE;
}

static PyObject *hp_register_api(PyObject *self, PyObject *capsule) {
    const otel_flashinfer_hotpath_api *api =
        PyCapsule_GetPointer(capsule, "otel_flashinfer.hotpath_api");
    if (api == NULL) return NULL;
    if (api->version != OTEL_FLASHINFER_HOTPATH_API_VERSION) {
        PyErr_Format(PyExc_RuntimeError, "event pool API version %d, expected %d", api->version,
                     OTEL_FLASHINFER_HOTPATH_API_VERSION);
        return NULL;
    }
    static PyObject *held = NULL; /* the struct lives in the pool's module: keep it */
    Py_INCREF(capsule);
    Py_XSETREF(held, capsule);
    S.api = api;
    Py_RETURN_NONE;
}

/* untrack(obj): keep an object that waits in the queue out of the cyclic collector (a
 * graph's replay record and its span context: thousands queued would be traversed by
 * every young collection and promoted to the old generation).  Only for objects that
 * die by reference count: nothing they reach refers back to them. */
static PyObject *hp_untrack(PyObject *self, PyObject *obj) {
    if (PyObject_IS_GC(obj) && PyObject_GC_IsTracked(obj)) PyObject_GC_UnTrack(obj);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"untrack", hp_untrack, METH_O, "keep an acyclic queued object out of the collector"},
    {"gpu_drop", hp_gpu_drop, METH_O, "give back the GPU events of a record not submitted"},
    {"register_api", hp_register_api, METH_O,
     "use the CUDA event pool's events and tensor facts (a capsule)"},
    {"setup", (PyCFunction)(void (*)(void))hp_setup, METH_VARARGS | METH_KEYWORDS,
     "bind the OTel context, CallRecord and helpers (once per process)"},
    {"snapshot", hp_snapshot, METH_O, "describe.snapshot with tensors done in C"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_hotpath",
                                        "The caller's side of a traced call, in C.", -1,
                                        module_methods};

PyMODINIT_FUNC PyInit__hotpath(void) {
    ofi_defer_init();
    if (PyType_Ready(&EntryType) < 0 || PyType_Ready(&SwitchType) < 0 ||
        PyType_Ready(&WrapperType) < 0 || PyType_Ready(&GraphSkipType) < 0 ||
        PyType_Ready(&ReplayGateType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) return NULL;
    struct { const char *name; PyTypeObject *type; } types[] = {
        {"Entry", &EntryType}, {"Switch", &SwitchType}, {"Wrapper", &WrapperType},
        {"GraphSkip", &GraphSkipType}, {"ReplayGate", &ReplayGateType}};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); ++i) {
        Py_INCREF(types[i].type);
        if (PyModule_AddObject(m, types[i].name, (PyObject *)types[i].type) < 0) {
            Py_DECREF(types[i].type);
            Py_DECREF(m);
            return NULL;
        }
    }
    if (PyModule_AddIntConstant(m, "BODY_SIZE", OFF_STATE + 1) < 0 ||
        PyModule_AddIntConstant(m, "ARGS_OFFSET", ARGS_OFFSET) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    static int atfork_done = 0;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, rng_child_after_fork);
        atfork_done = 1;
    }
    return m;
}
