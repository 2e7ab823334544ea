/* Native OTLP span encoder: CallRecords straight to ExportTraceServiceRequest bytes
 * (protobuf) or to one OTLP/JSON line, without building SDK spans.
 *
 * Why: the SDK path rebuilds every record as a ReadableSpan and encodes it through
 * protobuf's Python objects (about 130 us per level-3 span on a small host, 300 us
 * more for JSON), all while holding the GIL the engine needs.  Here a steady-state
 * span costs its ids, times and a copy of attribute blocks encoded once:
 *   - resource and scope arrive pre-encoded (Python, once per encoder);
 *   - a wrapper's shared base attributes are encoded once per dict;
 *   - argument attributes are encoded once per call site and reused while the call's
 *     argument snapshots stay equal (the hot path already hands over equal snapshots
 *     as the same objects, so the check is mostly pointer compares);
 *   - GPU times are resolved through the event pool's C API (hotpath_api.h) when the
 *     pool lends one, so a timed call needs no Python on the worker either.
 * The request is assembled (a copy of the spans' bytes) with the GIL released.
 *
 * Everything here mirrors opentelemetry-exporter-otlp-proto-common's encoder, field
 * for field (tests/test_native_encoder.py decodes both and compares).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "hotpath_api.h"
#include "fast_double.h"
#include "stats_api.h"
#include "xoshiro.h"

/* ---- a growable byte buffer ---------------------------------------------------------- */

typedef struct {
    unsigned char *p;
    size_t len, cap;
} Buf;

/* Set while a thread writes with the GIL released (encode_replay's templated children):
 * a failed allocation is then only noted, and raised once the GIL is back. */
static _Thread_local int buf_nogil = 0, buf_oom = 0;

/* The slow half of buf_grow, out of line: the encoder's hot loops inline only the
 * bounds check (a call per put was 11% of the encoder thread's time, `perf` on the CPU
 * box, every replay traced at level 3). */
static __attribute__((noinline)) int buf_grow_slow(Buf *b, size_t need) {
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < need) cap *= 2;
    unsigned char *p = PyMem_RawRealloc(b->p, cap);
    if (p == NULL) {
        if (buf_nogil)
            buf_oom = 1;
        else
            PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int buf_grow(Buf *b, size_t extra) {
    size_t need = b->len + extra;
    return need <= b->cap ? 0 : buf_grow_slow(b, need);
}

static inline int put(Buf *b, const void *data, size_t n) {
    if (buf_grow(b, n) < 0) return -1;
    memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

static inline int put_c(Buf *b, unsigned char c) {
    if (b->len == b->cap && buf_grow(b, 1) < 0) return -1;
    b->p[b->len++] = c;
    return 0;
}

#define PUT_LIT(b, s) put((b), (s), sizeof(s) - 1)

static void buf_free(Buf *b) {
    PyMem_RawFree(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* ---- protobuf wire format ---------------------------------------------------------- */

static inline int varint_size(uint64_t v) {
    int n = 1;
    while (v >= 0x80) {
        v >>= 7;
        ++n;
    }
    return n;
}

static inline int pb_varint(Buf *b, uint64_t v) {
    if (buf_grow(b, 10) < 0) return -1;
    unsigned char *p = b->p + b->len;
    while (v >= 0x80) {
        *p++ = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    *p++ = (unsigned char)v;
    b->len = (size_t)(p - b->p);
    return 0;
}

static inline int pb_tag(Buf *b, int field, int wire) {
    return pb_varint(b, ((uint64_t)field << 3) | (uint64_t)wire);
}

static inline int pb_fixed64(Buf *b, int field, uint64_t v) {
    if (pb_tag(b, field, 1) < 0) return -1;
    unsigned char x[8];
    for (int i = 0; i < 8; ++i) x[i] = (unsigned char)(v >> (8 * i));
    return put(b, x, 8);
}

static inline int pb_fixed32(Buf *b, int field, uint32_t v) {
    if (pb_tag(b, field, 5) < 0) return -1;
    unsigned char x[4];
    for (int i = 0; i < 4; ++i) x[i] = (unsigned char)(v >> (8 * i));
    return put(b, x, 4);
}

static inline int pb_bytes(Buf *b, int field, const void *data, size_t n) {
    if (pb_tag(b, field, 2) < 0 || pb_varint(b, n) < 0) return -1;
    return put(b, data, n);
}

/* A nested message: reserve one length byte, write the body, then fix the length
 * (moving the body when it needs a longer varint). */
static inline int pb_open(Buf *b, int field, size_t *mark) {
    if (pb_tag(b, field, 2) < 0 || put_c(b, 0) < 0) return -1;
    *mark = b->len;
    return 0;
}

static int pb_close(Buf *b, size_t mark) {
    size_t n = b->len - mark;
    int k = varint_size(n);
    if (k > 1) {
        if (buf_grow(b, (size_t)k - 1) < 0) return -1;
        memmove(b->p + mark + k - 1, b->p + mark, n);
        b->len += (size_t)k - 1;
    }
    unsigned char *p = b->p + mark - 1;
    uint64_t v = n;
    while (v >= 0x80) {
        *p++ = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    *p = (unsigned char)v;
    return 0;
}

/* ---- JSON (the OTLP/JSON mapping: camelCase, int64 as strings, hex ids) ------------- */

static const char HEX[] = "0123456789abcdef";

static int js_str(Buf *b, const char *s, Py_ssize_t n) {
    if (buf_grow(b, (size_t)n + 2) < 0 || put_c(b, '"') < 0) return -1;
    for (Py_ssize_t i = 0; i < n; ++i) {
        /* a run that needs no escaping (attribute keys and names: all of it) in one copy */
        Py_ssize_t j = i;
        while (j < n && (unsigned char)s[j] >= 0x20 && s[j] != '"' && s[j] != '\\') ++j;
        if (j > i) {
            if (put(b, s + i, (size_t)(j - i)) < 0) return -1;
            if (j == n) break;
            i = j;
        }
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            if (put_c(b, '\\') < 0 || put_c(b, c) < 0) return -1;
        } else if (c < 0x20) {
            char esc[7];
            const char *short_esc = c == '\n' ? "\\n" : c == '\t' ? "\\t" : c == '\r' ? "\\r"
                                    : c == '\b' ? "\\b" : c == '\f' ? "\\f" : NULL;
            if (short_esc != NULL) {
                if (put(b, short_esc, 2) < 0) return -1;
            } else {
                snprintf(esc, sizeof esc, "\\u%04x", c);
                if (put(b, esc, 6) < 0) return -1;
            }
        }
    }
    return put_c(b, '"');
}

static int js_hex(Buf *b, const unsigned char *data, int n) {
    if (buf_grow(b, (size_t)n * 2 + 2) < 0) return -1;
    unsigned char *p = b->p + b->len;
    *p++ = '"';
    for (int i = 0; i < n; ++i) {
        *p++ = (unsigned char)HEX[data[i] >> 4];
        *p++ = (unsigned char)HEX[data[i] & 15];
    }
    *p++ = '"';
    b->len = (size_t)(p - b->p);
    return 0;
}

static int js_u64(Buf *b, uint64_t v, int quoted) {
    char tmp[24];
    char *p = tmp + sizeof tmp;
    if (quoted) *--p = '"';
    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (quoted) *--p = '"';
    return put(b, p, (size_t)(tmp + sizeof tmp - p));
}

static int js_i64(Buf *b, long long v) {
    if (v >= 0) return js_u64(b, (uint64_t)v, 1);
    uint64_t m = (uint64_t)(-(v + 1)) + 1; /* |v|, also for LLONG_MIN */
    char tmp[24];
    char *p = tmp + sizeof tmp;
    *--p = '"';
    do {
        *--p = (char)('0' + m % 10);
        m /= 10;
    } while (m);
    *--p = '-';
    *--p = '"';
    return put(b, p, (size_t)(tmp + sizeof tmp - p));
}

static int js_double(Buf *b, double v) {
    if (isnan(v)) return PUT_LIT(b, "\"NaN\"");
    if (isinf(v)) return v > 0 ? PUT_LIT(b, "\"Infinity\"") : PUT_LIT(b, "\"-Infinity\"");
    char text[40];
    return put(b, text, (size_t)otel_fi_format_double(v, text)); /* fast_double.h */
}

static const char BASE64[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int js_base64(Buf *b, const unsigned char *s, Py_ssize_t n) {
    if (put_c(b, '"') < 0) return -1;
    for (Py_ssize_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16;
        if (i + 1 < n) v |= (uint32_t)s[i + 1] << 8;
        if (i + 2 < n) v |= s[i + 2];
        char out[4] = {BASE64[(v >> 18) & 63], BASE64[(v >> 12) & 63],
                       i + 1 < n ? BASE64[(v >> 6) & 63] : '=', i + 2 < n ? BASE64[v & 63] : '='};
        if (put(b, out, 4) < 0) return -1;
    }
    return put_c(b, '"');
}

/* ---- the encoder object ------------------------------------------------------------ */

enum { FMT_PROTOBUF = 0, FMT_JSON = 1 };

enum {
    R_NAME, R_TRACE_ID, R_SPAN_ID, R_PARENT, R_ATTRIBUTES, R_SHARED, R_EVENTS, R_LINKS,
    R_PENDING, R_ERROR, R_DESCRIBE, R_DATA, R_KW, R_RESULT, R_GPU, R_START_NS, R_END_NS,
    R_INSTANCE, R_PLAN_LINK, R_DEADLINE, R_COUNT
};
static const char *const record_slot_names[R_COUNT] = {
    "name", "trace_id", "span_id", "parent", "attributes", "shared", "events", "links",
    "pending", "error", "describe", "data", "kw", "result", "gpu", "start_ns", "end_ns",
    "instance", "plan_link", "deadline"};

/* The event pool's API (hotpath_api.h), shared by every encoder once lent. */
static const otel_flashinfer_hotpath_api *gpu_api = NULL;
static PyObject *gpu_api_capsule = NULL;
#define NOT_READY (-(((int64_t)1) << 40))

typedef struct {
    PyObject_HEAD
    int fmt;
    Py_ssize_t offsets[R_COUNT];
    PyObject *record_type;
    PyObject *empty;          /* CallRecord's shared () */
    PyObject *default_state;  /* DEFAULT_TRACE_STATE: nothing to encode */
    PyObject *state_header;   /* callable(trace_state) -> "k=v,..." for the rare others */
    PyObject *blocks;         /* dict: base attribute dict -> (bytes, count, dict) */
    PyObject *described;      /* dict: describer -> [data, kw, result, bytes, count, dict] */
    PyObject *memos;          /* dict: replay prototype address -> its memo (proto_memo) */
    PyObject *extra;          /* dict of attributes every span gets (a forked child's pid) */
    PyObject *extra_block;    /* its encoding (bytes), or NULL */
    Py_ssize_t extra_count;
    PyObject *s_attributes;   /* "attributes" (the describer's method) */
    PyObject *s_popleft, *s_context, *s_attrs;
    PyObject *k_instance, *k_gpu_time, *k_cuda_error, *k_nonfinite;
    PyTypeObject *raw_stats; /* stats.decode.RawStats: rows still as the kernel wrote them */
    Py_ssize_t max_attributes, max_events, max_links;
    /* resource + scope, pre-encoded: protobuf field bodies or JSON fragments */
    Buf resource, scope;
    PyObject *resource_schema, *scope_schema; /* str */
    Buf spans;                /* spans encoded since the last take() */
    Buf tmp;                  /* scratch for blocks */
    Buf rconst;               /* a replay's values that every child repeats (RConst) */
    Py_ssize_t count;         /* spans in ``spans`` */
    Py_ssize_t taken;         /* records the last drain took off its queue */
    unsigned long long encoded, failed, attr_errors, gpu_resolved, describe_errors;
    unsigned long long stats_resolved; /* level-5 records resolved here, not in Python */
    unsigned long long replays, children; /* replay records written whole, their children */
    unsigned long long templated; /* children copied from their prototype's byte template */
    /* pipeline.ReplayRecord (CallRecord.replay_type): the children come from prototypes */
    PyTypeObject *replay_type;
    Py_ssize_t replay_offsets[5];
    PyObject *k_replay_index;
    uint64_t rng[4]; /* xoshiro256**: the children's span ids, reseeded after fork */
    long rng_pid;
    int busy; /* inside add/drain: Python callbacks must not re-enter (they could take()) */
    unsigned long busy_thread; /* the thread that set ``busy`` (reset tells a fork by it) */
    long pid;
    /* ``flashinfer.instance.id`` strings of recent objects (an engine calls few) */
#define INSTANCE_CACHE 16
    unsigned long long inst_key[INSTANCE_CACHE];
    PyObject *inst_value[INSTANCE_CACHE];
} Encoder;

static inline PyObject *slot(Encoder *e, PyObject *record, int which) {
    return *(PyObject **)((char *)record + e->offsets[which]);
}

static inline void slot_set(Encoder *e, PyObject *record, int which, PyObject *value) {
    PyObject **p = (PyObject **)((char *)record + e->offsets[which]);
    PyObject *old = *p;
    Py_INCREF(value);
    *p = value;
    Py_XDECREF(old);
}

static int as_bytes(PyObject *value, unsigned char *out, int n) {
    if (value == NULL || !PyLong_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "an id is not an int");
        return -1;
    }
#if PY_VERSION_HEX >= 0x030D0000
    return _PyLong_AsByteArray((PyLongObject *)value, out, (size_t)n, 0, 0, 1);
#else
    return _PyLong_AsByteArray((PyLongObject *)value, out, (size_t)n, 0, 0);
#endif
}

/* A 64-bit id, big-endian, without the generic byte-array conversion. */
static int id64(PyObject *value, unsigned char *out) {
    if (value == NULL || !PyLong_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "an id is not an int");
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(value);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    for (int i = 7; i >= 0; --i) {
        out[i] = (unsigned char)v;
        v >>= 8;
    }
    return 0;
}

static int as_u64(PyObject *value, uint64_t *out) {
    if (value == NULL || !PyLong_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "a time is not an int");
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(value);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

/* ---- attribute values -------------------------------------------------------------- */

/* -2: a value the OTLP encoder cannot carry (the SDK logs and skips it; so do we). */
static int value_pb(Buf *b, PyObject *v, int depth);
static int value_js(Buf *b, PyObject *v, int depth);
static int kv_pb(Buf *b, int field, PyObject *key, PyObject *value, int depth);
static int kv_js(Buf *b, PyObject *key, PyObject *value, int depth);

static int key_utf8(PyObject *key, const char **s, Py_ssize_t *n) {
    if (!PyUnicode_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "attribute key is not a str");
        return -2;
    }
    *s = PyUnicode_AsUTF8AndSize(key, n);
    return *s == NULL ? -2 : 0;
}

/* An int attribute as OTLP's int64: -2 (skipped, as the SDK skips it) when it does not fit. */
static int as_int64(PyObject *v, long long *x) {
    int overflow = 0;
    *x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow) {
        PyErr_SetString(PyExc_OverflowError, "int attribute does not fit int64");
        return -2;
    }
    return 0;
}

static int value_pb(Buf *b, PyObject *v, int depth) {
    /* the AnyValue body (fields of the oneof, always written when set) */
    if (v == Py_None) return 0;
    if (PyBool_Check(v)) {
        if (pb_tag(b, 2, 0) < 0) return -1;
        return pb_varint(b, v == Py_True);
    }
    if (PyUnicode_Check(v)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(v, &n);
        if (s == NULL) return -2;
        return pb_bytes(b, 1, s, (size_t)n);
    }
    if (PyLong_Check(v)) {
        long long x;
        if (as_int64(v, &x) < 0) return -2;
        if (pb_tag(b, 3, 0) < 0) return -1;
        return pb_varint(b, (uint64_t)x);
    }
    if (PyFloat_Check(v)) {
        double d = PyFloat_AS_DOUBLE(v);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        return pb_fixed64(b, 4, bits);
    }
    if (PyBytes_Check(v)) return pb_bytes(b, 7, PyBytes_AS_STRING(v), (size_t)PyBytes_GET_SIZE(v));
    if (depth > 8) {
        PyErr_SetString(PyExc_ValueError, "attribute nested too deeply");
        return -2;
    }
    if (PyTuple_Check(v) || PyList_Check(v)) {
        /* A nested dict's key may run Python (its __str__), which may change or free
         * what is being written: ``v`` and each item are held, the size read again. */
        size_t mark;
        if (pb_open(b, 5, &mark) < 0) return -1;
        int rc = 0;
        Py_INCREF(v);
        for (Py_ssize_t i = 0; rc >= 0 && i < PySequence_Fast_GET_SIZE(v); ++i) {
            PyObject *item = PySequence_Fast_GET_ITEM(v, i);
            size_t inner;
            if (pb_open(b, 1, &inner) < 0) {
                rc = -1;
                break;
            }
            Py_INCREF(item);
            rc = value_pb(b, item, depth + 1);
            Py_DECREF(item);
            if (rc >= 0 && pb_close(b, inner) < 0) rc = -1;
        }
        Py_DECREF(v);
        return rc < 0 ? rc : pb_close(b, mark);
    }
    if (PyDict_Check(v)) {
        size_t mark;
        if (pb_open(b, 6, &mark) < 0) return -1;
        PyObject *k, *item;
        Py_ssize_t pos = 0;
        int rc = 0;
        Py_INCREF(v);
        while (rc >= 0 && PyDict_Next(v, &pos, &k, &item)) {
            Py_INCREF(item); /* the key's __str__ may take it out of the dict */
            PyObject *key = PyObject_Str(k);
            rc = key == NULL ? -2 : kv_pb(b, 1, key, item, depth + 1);
            Py_XDECREF(key);
            Py_DECREF(item);
        }
        Py_DECREF(v);
        return rc < 0 ? rc : pb_close(b, mark);
    }
    PyErr_Format(PyExc_TypeError, "Invalid type %.100s of attribute value", Py_TYPE(v)->tp_name);
    return -2;
}

static int kv_pb(Buf *b, int field, PyObject *key, PyObject *value, int depth) {
    const char *s;
    Py_ssize_t n;
    int rc = key_utf8(key, &s, &n);
    if (rc < 0) return rc;
    size_t mark, inner;
    if (pb_open(b, field, &mark) < 0 || pb_bytes(b, 1, s, (size_t)n) < 0 ||
        pb_open(b, 2, &inner) < 0)
        return -1;
    rc = value_pb(b, value, depth);
    if (rc < 0) return rc;
    if (pb_close(b, inner) < 0) return -1;
    return pb_close(b, mark);
}

static int value_js(Buf *b, PyObject *v, int depth) {
    if (v == Py_None) return PUT_LIT(b, "{}");
    if (PyBool_Check(v))
        return v == Py_True ? PUT_LIT(b, "{\"boolValue\":true}") : PUT_LIT(b, "{\"boolValue\":false}");
    if (PyUnicode_Check(v)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(v, &n);
        if (s == NULL) return -2;
        if (PUT_LIT(b, "{\"stringValue\":") < 0 || js_str(b, s, n) < 0) return -1;
        return put_c(b, '}');
    }
    if (PyLong_Check(v)) {
        long long x;
        if (as_int64(v, &x) < 0) return -2;
        if (PUT_LIT(b, "{\"intValue\":") < 0 || js_i64(b, x) < 0) return -1;
        return put_c(b, '}');
    }
    if (PyFloat_Check(v)) {
        if (PUT_LIT(b, "{\"doubleValue\":") < 0 || js_double(b, PyFloat_AS_DOUBLE(v)) < 0)
            return -1;
        return put_c(b, '}');
    }
    if (PyBytes_Check(v)) {
        if (PUT_LIT(b, "{\"bytesValue\":") < 0 ||
            js_base64(b, (const unsigned char *)PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v)) < 0)
            return -1;
        return put_c(b, '}');
    }
    if (depth > 8) {
        PyErr_SetString(PyExc_ValueError, "attribute nested too deeply");
        return -2;
    }
    if (PyTuple_Check(v) || PyList_Check(v)) {
        /* held while written, as in value_pb */
        if (PySequence_Fast_GET_SIZE(v) == 0) return PUT_LIT(b, "{\"arrayValue\":{}}");
        if (PUT_LIT(b, "{\"arrayValue\":{\"values\":[") < 0) return -1;
        int rc = 0;
        Py_INCREF(v);
        for (Py_ssize_t i = 0; rc >= 0 && i < PySequence_Fast_GET_SIZE(v); ++i) {
            PyObject *item = PySequence_Fast_GET_ITEM(v, i);
            if (i && put_c(b, ',') < 0) {
                rc = -1;
                break;
            }
            Py_INCREF(item);
            rc = value_js(b, item, depth + 1);
            Py_DECREF(item);
        }
        Py_DECREF(v);
        return rc < 0 ? rc : PUT_LIT(b, "]}}");
    }
    if (PyDict_Check(v)) {
        if (PyDict_GET_SIZE(v) == 0) return PUT_LIT(b, "{\"kvlistValue\":{}}");
        if (PUT_LIT(b, "{\"kvlistValue\":{\"values\":[") < 0) return -1;
        PyObject *k, *item;
        Py_ssize_t pos = 0;
        int first = 1, rc = 0;
        Py_INCREF(v);
        while (rc >= 0 && PyDict_Next(v, &pos, &k, &item)) {
            if (!first && put_c(b, ',') < 0) {
                rc = -1;
                break;
            }
            first = 0;
            Py_INCREF(item); /* the key's __str__ may take it out of the dict */
            PyObject *key = PyObject_Str(k);
            rc = key == NULL ? -2 : kv_js(b, key, item, depth + 1);
            Py_XDECREF(key);
            Py_DECREF(item);
        }
        Py_DECREF(v);
        return rc < 0 ? rc : PUT_LIT(b, "]}}");
    }
    PyErr_Format(PyExc_TypeError, "Invalid type %.100s of attribute value", Py_TYPE(v)->tp_name);
    return -2;
}

static int kv_js(Buf *b, PyObject *key, PyObject *value, int depth) {
    const char *s;
    Py_ssize_t n;
    int rc = key_utf8(key, &s, &n);
    if (rc < 0) return rc;
    if (PUT_LIT(b, "{\"key\":") < 0 || js_str(b, s, n) < 0 || PUT_LIT(b, ",\"value\":") < 0)
        return -1;
    rc = value_js(b, value, depth);
    if (rc < 0) return rc;
    return put_c(b, '}');
}

/* One attribute into a list of attributes.  In JSON, ``*first`` tracks the commas.
 * 1: written, 0: skipped (a value the encoder cannot carry; counted), -1: error. */
static int attr(Encoder *e, Buf *b, int field, PyObject *key, PyObject *value, int *first) {
    size_t start = b->len;
    int rc;
    if (e->fmt == FMT_PROTOBUF) {
        rc = kv_pb(b, field, key, value, 0);
    } else {
        if (!*first && put_c(b, ',') < 0) return -1;
        rc = kv_js(b, key, value, 0);
    }
    if (rc == -2) {
        PyErr_Clear();
        b->len = start; /* roll back the half-written attribute */
        e->attr_errors++;
        return 0;
    }
    if (rc < 0) return -1;
    *first = 0;
    return 1;
}

/* Every item of a mapping, up to ``limit`` (<0: none); returns how many were written,
 * counting those past the limit in ``*dropped``. */
static Py_ssize_t attrs_of(Encoder *e, Buf *b, int field, PyObject *mapping, Py_ssize_t limit,
                           Py_ssize_t *dropped, int *first) {
    Py_ssize_t written = 0;
    if (mapping == NULL || mapping == Py_None) return 0;
    if (PyDict_Check(mapping)) {
        PyObject *k, *v;
        Py_ssize_t pos = 0;
        while (PyDict_Next(mapping, &pos, &k, &v)) {
            if (limit >= 0 && written >= limit) {
                ++*dropped;
                continue;
            }
            int rc = attr(e, b, field, k, v, first);
            if (rc < 0) return -1;
            written += rc;
        }
        return written;
    }
    PyObject *items = PyMapping_Items(mapping);
    if (items == NULL) return -1;
    Py_ssize_t n = PyList_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject *pair = PyList_GET_ITEM(items, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) continue;
        if (limit >= 0 && written >= limit) {
            ++*dropped;
            continue;
        }
        int rc = attr(e, b, field, PyTuple_GET_ITEM(pair, 0), PyTuple_GET_ITEM(pair, 1), first);
        if (rc < 0) {
            Py_DECREF(items);
            return -1;
        }
        written += rc;
    }
    Py_DECREF(items);
    return written;
}

/* An attribute block: a dict encoded on its own (no separators), kept as bytes. */
static PyObject *encode_block(Encoder *e, PyObject *dict, Py_ssize_t *count) {
    e->tmp.len = 0;
    int first = 1;
    Py_ssize_t dropped = 0;
    Py_ssize_t n = attrs_of(e, &e->tmp, 9, dict, -1, &dropped, &first);
    if (n < 0) return NULL;
    *count = n;
    return PyBytes_FromStringAndSize((const char *)e->tmp.p, (Py_ssize_t)e->tmp.len);
}

/* Appends a cached block, with its separator; ``limit`` left is checked by the caller. */
static int put_block(Encoder *e, Buf *b, PyObject *bytes, Py_ssize_t count, int *first) {
    if (count == 0) return 0;
    if (e->fmt == FMT_JSON && !*first && put_c(b, ',') < 0) return -1;
    *first = 0;
    return put(b, PyBytes_AS_STRING(bytes), (size_t)PyBytes_GET_SIZE(bytes));
}

/* ---- snapshots: is this call's argument description the last one's? ---------------- */

static int same(PyObject *a, PyObject *b);

static int same_tuple(PyObject *a, PyObject *b) {
    Py_ssize_t n = PyTuple_GET_SIZE(a);
    if (n != PyTuple_GET_SIZE(b)) return 0;
    for (Py_ssize_t i = 0; i < n; ++i)
        if (!same(PyTuple_GET_ITEM(a, i), PyTuple_GET_ITEM(b, i))) return 0;
    return 1;
}

/* Equal AND of one type all the way down (1 and 1.0 and True are equal in Python but
 * encode differently); anything unusual compares unequal, which only costs a miss. */
static int same(PyObject *a, PyObject *b) {
    if (a == b) return 1;
    if (a == NULL || b == NULL || Py_TYPE(a) != Py_TYPE(b)) return 0;
    if (PyTuple_Check(a)) return same_tuple(a, b);
    if (PyFloat_CheckExact(a)) { /* bit for bit: -0.0 is not 0.0, a NaN is itself */
        double x = PyFloat_AS_DOUBLE(a), y = PyFloat_AS_DOUBLE(b);
        return memcmp(&x, &y, sizeof x) == 0;
    }
    if (PyLong_CheckExact(a) || PyUnicode_CheckExact(a)) {
        int rc = PyObject_RichCompareBool(a, b, Py_EQ);
        if (rc < 0) PyErr_Clear();
        return rc == 1;
    }
    if (PyUnicode_Check(a)) { /* describe.Opaque */
        int rc = PyObject_RichCompareBool(a, b, Py_EQ);
        if (rc < 0) PyErr_Clear();
        return rc == 1;
    }
    if (PyList_CheckExact(a)) {
        Py_ssize_t n = PyList_GET_SIZE(a);
        if (n != PyList_GET_SIZE(b)) return 0;
        for (Py_ssize_t i = 0; i < n; ++i)
            if (!same(PyList_GET_ITEM(a, i), PyList_GET_ITEM(b, i))) return 0;
        return 1;
    }
    if (PyDict_CheckExact(a)) {
        if (PyDict_GET_SIZE(a) != PyDict_GET_SIZE(b)) return 0;
        PyObject *k, *v;
        Py_ssize_t pos = 0;
        while (PyDict_Next(a, &pos, &k, &v)) {
            PyObject *w = PyDict_GetItemWithError(b, k);
            if (w == NULL) {
                PyErr_Clear();
                return 0;
            }
            if (!same(v, w)) return 0;
        }
        return 1;
    }
    /* torch.dtype and torch.device (a tensor's facts; a device is a new object on
     * every call): equal objects of one type */
    int rc = PyObject_RichCompareBool(a, b, Py_EQ);
    if (rc < 0) PyErr_Clear();
    return rc == 1;
}

/* The argument block of a traced call: reused while the call site's snapshots stay the
 * same, else built by the describer's ``attributes(data, kw, result)`` and kept. */
static int describe_block(Encoder *e, PyObject *record, PyObject **bytes, Py_ssize_t *count,
                          PyObject **dict) {
    PyObject *describer = slot(e, record, R_DESCRIBE);
    PyObject *data = slot(e, record, R_DATA), *kw = slot(e, record, R_KW);
    PyObject *result = slot(e, record, R_RESULT);
    if (data == NULL) data = Py_None;
    if (kw == NULL) kw = Py_None;
    if (result == NULL) result = Py_None;
    PyObject *entry = PyDict_GetItemWithError(e->described, describer);
    if (entry == NULL && PyErr_Occurred()) return -1;
    if (entry != NULL && same(PyList_GET_ITEM(entry, 0), data) &&
        same(PyList_GET_ITEM(entry, 1), kw) && same(PyList_GET_ITEM(entry, 2), result)) {
        *bytes = PyList_GET_ITEM(entry, 3);
        *count = PyLong_AsSsize_t(PyList_GET_ITEM(entry, 4));
        *dict = PyList_GET_ITEM(entry, 5);
        return 0;
    }
    PyObject *attrs = PyObject_CallMethodObjArgs(describer, e->s_attributes, data, kw, result,
                                                 NULL);
    if (attrs == NULL) return -1;
    if (!PyDict_Check(attrs)) {
        Py_DECREF(attrs);
        PyErr_SetString(PyExc_TypeError, "describer.attributes() did not return a dict");
        return -1;
    }
    Py_ssize_t n;
    PyObject *block = encode_block(e, attrs, &n);
    if (block == NULL) {
        Py_DECREF(attrs);
        return -1;
    }
    PyObject *nobj = PyLong_FromSsize_t(n);
    PyObject *fresh = nobj ? PyList_New(6) : NULL;
    if (fresh == NULL) {
        Py_XDECREF(nobj);
        Py_DECREF(block);
        Py_DECREF(attrs);
        return -1;
    }
    Py_INCREF(data);
    Py_INCREF(kw);
    Py_INCREF(result);
    PyList_SET_ITEM(fresh, 0, data);
    PyList_SET_ITEM(fresh, 1, kw);
    PyList_SET_ITEM(fresh, 2, result);
    PyList_SET_ITEM(fresh, 3, block);
    PyList_SET_ITEM(fresh, 4, nobj);
    PyList_SET_ITEM(fresh, 5, attrs);
    if (PyDict_GET_SIZE(e->described) > 4096) PyDict_Clear(e->described);
    int rc = PyDict_SetItem(e->described, describer, fresh);
    Py_DECREF(fresh);
    if (rc < 0) return -1;
    *bytes = block;
    *count = n;
    *dict = attrs;
    return 0;
}

/* The base dict's block (a wrapper's constant attributes), encoded once per dict. */
static int base_block(Encoder *e, PyObject *dict, PyObject **bytes, Py_ssize_t *count) {
    PyObject *key = PyLong_FromVoidPtr(dict);
    if (key == NULL) return -1;
    PyObject *entry = PyDict_GetItemWithError(e->blocks, key);
    if (entry == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(key);
            return -1;
        }
        Py_ssize_t n;
        PyObject *block = encode_block(e, dict, &n);
        entry = block ? Py_BuildValue("(NnO)", block, n, dict) : NULL; /* holds the dict */
        /* Bounded like ``described``: a wrapper made per request (``traced(fn)`` in a
         * loop) brings a new dict each time.  Cleared before the insert, so the entry
         * returned below stays alive until the next base block. */
        if (entry != NULL && PyDict_GET_SIZE(e->blocks) >= 4096) PyDict_Clear(e->blocks);
        if (entry == NULL || PyDict_SetItem(e->blocks, key, entry) < 0) {
            Py_XDECREF(entry);
            Py_DECREF(key);
            return -1;
        }
        Py_DECREF(entry); /* the dict holds it */
    }
    Py_DECREF(key);
    *bytes = PyTuple_GET_ITEM(entry, 0);
    *count = PyLong_AsSsize_t(PyTuple_GET_ITEM(entry, 1));
    return 0;
}

/* A block, or as much of its dict as the limit leaves room for. */
static int block_within(Encoder *e, Buf *b, PyObject *bytes, Py_ssize_t count, PyObject *dict,
                        Py_ssize_t *written, Py_ssize_t *dropped, int *first) {
    Py_ssize_t room = e->max_attributes - *written;
    if (count <= room) {
        if (put_block(e, b, bytes, count, first) < 0) return -1;
        *written += count;
        return 0;
    }
    Py_ssize_t n = attrs_of(e, b, 9, dict, room < 0 ? 0 : room, dropped, first);
    if (n < 0) return -1;
    *written += n;
    return 0;
}

/* ---- one span ------------------------------------------------------------------------ */

static int put_ids_pb(Buf *b, int field_trace, const unsigned char *trace, int field_span,
                      const unsigned char *span) {
    if (field_trace && pb_bytes(b, field_trace, trace, 16) < 0) return -1;
    return pb_bytes(b, field_span, span, 8);
}

static int trace_state_text(Encoder *e, PyObject *state, PyObject **text) {
    *text = NULL;
    if (state == NULL || state == Py_None || state == e->default_state) return 0;
    Py_ssize_t n = PyObject_Length(state);
    if (n < 0) {
        PyErr_Clear();
        return 0;
    }
    if (n == 0) return 0;
    *text = PyObject_CallOneArg(e->state_header, state);
    return *text == NULL ? -1 : 0;
}

static int event_one(Encoder *e, Buf *b, PyObject *name, PyObject *attrs, uint64_t ts,
                     int *first_event) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(name, &n);
    if (s == NULL) return -1;
    Py_ssize_t dropped = 0;
    int first = 1;
    if (e->fmt == FMT_PROTOBUF) {
        size_t mark;
        if (pb_open(b, 11, &mark) < 0 || pb_fixed64(b, 1, ts) < 0) return -1;
        if (n && pb_bytes(b, 2, s, (size_t)n) < 0) return -1;
        if (attrs_of(e, b, 3, attrs, -1, &dropped, &first) < 0) return -1;
        return pb_close(b, mark);
    }
    if (!*first_event && put_c(b, ',') < 0) return -1;
    *first_event = 0;
    if (PUT_LIT(b, "{\"timeUnixNano\":") < 0 || js_u64(b, ts, 1) < 0) return -1;
    if (n && (PUT_LIT(b, ",\"name\":") < 0 || js_str(b, s, n) < 0)) return -1;
    size_t before = b->len;
    if (PUT_LIT(b, ",\"attributes\":[") < 0) return -1;
    Py_ssize_t w = attrs_of(e, b, 3, attrs, -1, &dropped, &first);
    if (w < 0) return -1;
    if (w == 0) b->len = before;
    else if (put_c(b, ']') < 0) return -1;
    return put_c(b, '}');
}

static PyObject *k_exc_type, *k_exc_message, *k_exc_stack, *k_exc_escaped, *s_true_text,
    *s_exception;

static int error_event(Encoder *e, Buf *b, PyObject *error, uint64_t ts, int *first_event) {
    if (!PyTuple_Check(error) || PyTuple_GET_SIZE(error) != 3) {
        PyErr_SetString(PyExc_TypeError, "record.error is not (type, message, stack)");
        return -1;
    }
    PyObject *attrs = PyDict_New();
    if (attrs == NULL) return -1;
    if (PyDict_SetItem(attrs, k_exc_type, PyTuple_GET_ITEM(error, 0)) < 0 ||
        PyDict_SetItem(attrs, k_exc_message, PyTuple_GET_ITEM(error, 1)) < 0 ||
        PyDict_SetItem(attrs, k_exc_stack, PyTuple_GET_ITEM(error, 2)) < 0 ||
        PyDict_SetItem(attrs, k_exc_escaped, s_true_text) < 0) {
        Py_DECREF(attrs);
        return -1;
    }
    int rc = event_one(e, b, s_exception, attrs, ts, first_event);
    Py_DECREF(attrs);
    return rc;
}

static int link_one(Encoder *e, Buf *b, PyObject *context, PyObject *attrs, int *first_link) {
    /* context: a SpanContext (trace_id, span_id, is_remote, flags, state, valid) */
    if (!PyTuple_Check(context) || PyTuple_GET_SIZE(context) < 3) {
        PyErr_SetString(PyExc_TypeError, "a link's context is not a SpanContext");
        return -1;
    }
    unsigned char trace[16], span[8];
    if (as_bytes(PyTuple_GET_ITEM(context, 0), trace, 16) < 0 ||
        as_bytes(PyTuple_GET_ITEM(context, 1), span, 8) < 0)
        return -1;
    int remote = PyObject_IsTrue(PyTuple_GET_ITEM(context, 2));
    if (remote < 0) return -1;
    uint32_t flags = 0x100 | (remote ? 0x200 : 0);
    Py_ssize_t dropped = 0;
    int first = 1;
    if (e->fmt == FMT_PROTOBUF) {
        size_t mark;
        if (pb_open(b, 13, &mark) < 0 || put_ids_pb(b, 1, trace, 2, span) < 0) return -1;
        if (attrs_of(e, b, 4, attrs, -1, &dropped, &first) < 0) return -1;
        if (pb_fixed32(b, 6, flags) < 0) return -1;
        return pb_close(b, mark);
    }
    if (!*first_link && put_c(b, ',') < 0) return -1;
    *first_link = 0;
    if (PUT_LIT(b, "{\"traceId\":") < 0 || js_hex(b, trace, 16) < 0 ||
        PUT_LIT(b, ",\"spanId\":") < 0 || js_hex(b, span, 8) < 0)
        return -1;
    size_t before = b->len;
    if (PUT_LIT(b, ",\"attributes\":[") < 0) return -1;
    Py_ssize_t w = attrs_of(e, b, 4, attrs, -1, &dropped, &first);
    if (w < 0) return -1;
    if (w == 0) b->len = before;
    else if (put_c(b, ']') < 0) return -1;
    if (PUT_LIT(b, ",\"flags\":") < 0 || js_u64(b, flags, 0) < 0) return -1;
    return put_c(b, '}');
}

/* ---- level-5 statistics rows, decoded here ---------------------------------------------
 * A RawStats is (rows: bytes, metas, offset, ts_ns): the pinned slot's copy and what
 * the host knew of each row (name, scope, numel).  Each row is eight words
 * (csrc/tensor_stats.h): min key, max key, finite sum (double), finite, nan, inf, seen,
 * spare; stats/decode.py's ``_attrs`` is the reference these events must match. */

#define ROW_BYTES 64
static const char *const EVENT_NAME = "flashinfer.tensor_stats";

static inline uint64_t row_word(const unsigned char *row, int i) {
    uint64_t v;
    memcpy(&v, row + 8 * i, 8);
    return v;
}

static inline double unkey(uint64_t key) {
    uint64_t bits = (key & (1ULL << 63)) ? key ^ (1ULL << 63) : ~key;
    double d;
    memcpy(&d, &bits, 8);
    return d;
}

/* One attribute with a C value (kind 's' string, 'i' int64, 'd' double, 'b' bool). */
static int kv_c(Encoder *e, Buf *b, int field, const char *key, char kind, const char *sval,
                Py_ssize_t slen, long long ival, double dval, int *first) {
    size_t klen = strlen(key);
    if (e->fmt == FMT_PROTOBUF) {
        size_t mark, inner;
        if (pb_open(b, field, &mark) < 0 || pb_bytes(b, 1, key, klen) < 0 ||
            pb_open(b, 2, &inner) < 0)
            return -1;
        if (kind == 's' && pb_bytes(b, 1, sval, (size_t)slen) < 0) return -1;
        if (kind == 'i' && (pb_tag(b, 3, 0) < 0 || pb_varint(b, (uint64_t)ival) < 0)) return -1;
        if (kind == 'b' && (pb_tag(b, 2, 0) < 0 || pb_varint(b, ival != 0) < 0)) return -1;
        if (kind == 'd') {
            uint64_t bits;
            memcpy(&bits, &dval, 8);
            if (pb_fixed64(b, 4, bits) < 0) return -1;
        }
        if (pb_close(b, inner) < 0) return -1;
        *first = 0;
        return pb_close(b, mark);
    }
    if (!*first && put_c(b, ',') < 0) return -1;
    *first = 0;
    if (PUT_LIT(b, "{\"key\":") < 0 || js_str(b, key, (Py_ssize_t)klen) < 0 ||
        PUT_LIT(b, ",\"value\":") < 0)
        return -1;
    if (kind == 's' && (PUT_LIT(b, "{\"stringValue\":") < 0 || js_str(b, sval, slen) < 0)) return -1;
    if (kind == 'i' && (PUT_LIT(b, "{\"intValue\":") < 0 || js_i64(b, ival) < 0)) return -1;
    if (kind == 'd' && (PUT_LIT(b, "{\"doubleValue\":") < 0 || js_double(b, dval) < 0)) return -1;
    if (kind == 'b')
        return ival ? PUT_LIT(b, "{\"boolValue\":true}}") : PUT_LIT(b, "{\"boolValue\":false}}");
    return PUT_LIT(b, "}}");
}

/* A row meta's fields as C values (references held while in use): what a statistics
 * event needs, read with the GIL so that the event can be written without it. */
typedef struct {
    PyObject *name, *scope; /* owned */
    const char *ns, *ss;
    Py_ssize_t nlen, slen;
    long long numel;
} MetaC;

typedef struct {
    const unsigned char *rows;
    Py_ssize_t nrows;
    PyObject *metas; /* sequence, borrowed */
    uint64_t ts;
    const MetaC *mc; /* the metas read already (encode_replay), or NULL */
} RawView;

/* Checks a RawStats and views it; -1 with an exception when malformed. */
static int raw_view(PyObject *raw, RawView *v) {
    if (PyTuple_GET_SIZE(raw) != 4 || !PyBytes_Check(PyTuple_GET_ITEM(raw, 0))) {
        PyErr_SetString(PyExc_TypeError, "RawStats is (rows: bytes, metas, offset, ts_ns)");
        return -1;
    }
    PyObject *rows = PyTuple_GET_ITEM(raw, 0), *metas = PyTuple_GET_ITEM(raw, 1);
    Py_ssize_t offset = PyLong_AsSsize_t(PyTuple_GET_ITEM(raw, 2));
    if (offset == -1 && PyErr_Occurred()) return -1;
    if (!PyTuple_Check(metas) && !PyList_Check(metas)) {
        PyErr_SetString(PyExc_TypeError, "RawStats metas is not a tuple or list");
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(metas);
    Py_ssize_t size = PyBytes_GET_SIZE(rows);
    if (offset < 0 || offset > size || n > (size - offset) / ROW_BYTES) {
        PyErr_SetString(PyExc_ValueError, "RawStats rows are shorter than their metas");
        return -1;
    }
    if (as_u64(PyTuple_GET_ITEM(raw, 3), &v->ts) < 0) return -1;
    v->rows = (const unsigned char *)PyBytes_AS_STRING(rows) + offset;
    v->nrows = n;
    v->metas = metas;
    v->mc = NULL;
    return 0;
}

static int raw_nonfinite(const RawView *v);

/* Rows in ``n`` views, and whether any saw NaN/Inf (``*nonfinite`` set, never cleared). */
static Py_ssize_t views_rows(const RawView *v, int n, int *nonfinite) {
    Py_ssize_t rows = 0;
    for (int i = 0; i < n; ++i) {
        rows += v[i].nrows;
        *nonfinite = *nonfinite || raw_nonfinite(&v[i]);
    }
    return rows;
}

static int raw_nonfinite(const RawView *v) {
    for (Py_ssize_t i = 0; i < v->nrows; ++i) {
        const unsigned char *row = v->rows + i * ROW_BYTES;
        if (row_word(row, 4) || row_word(row, 5)) return 1;
    }
    return 0;
}

/* (name, scope, numel) of a meta: a plain tuple, or a RowMeta's fields. */
static int meta_fields(PyObject *meta, PyObject **name, PyObject **scope, long long *numel) {
    PyObject *n, *s, *k;
    if (PyTuple_CheckExact(meta) && PyTuple_GET_SIZE(meta) == 3) {
        n = PyTuple_GET_ITEM(meta, 0);
        s = PyTuple_GET_ITEM(meta, 1);
        k = PyTuple_GET_ITEM(meta, 2);
        Py_INCREF(n);
        Py_INCREF(s);
        Py_INCREF(k);
    } else {
        n = PyObject_GetAttrString(meta, "name");
        s = n ? PyObject_GetAttrString(meta, "scope") : NULL;
        k = s ? PyObject_GetAttrString(meta, "numel") : NULL;
        if (k == NULL) {
            Py_XDECREF(n);
            Py_XDECREF(s);
            return -1;
        }
    }
    *numel = PyLong_AsLongLong(k);
    Py_DECREF(k);
    if ((*numel == -1 && PyErr_Occurred()) || !PyUnicode_Check(n) || !PyUnicode_Check(s)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "a row meta is malformed");
        Py_DECREF(n);
        Py_DECREF(s);
        return -1;
    }
    *name = n;
    *scope = s;
    return 0;
}

/* An OTLP/JSON attribute up to its value, for a key that needs no escaping and a value
 * type known here: one literal copy (and the comma before it unless ``first``). */
#define JS_KV(b, key, type, first)                                                         \
    ((first) ? PUT_LIT(b, "{\"key\":\"" key "\",\"value\":{\"" type "\":")               \
             : PUT_LIT(b, ",{\"key\":\"" key "\",\"value\":{\"" type "\":"))

/* One row meta as C values (with the GIL); -1 with an exception. */
static int meta_read(PyObject *meta, MetaC *m) {
    if (meta_fields(meta, &m->name, &m->scope, &m->numel) < 0) return -1;
    m->ns = PyUnicode_AsUTF8AndSize(m->name, &m->nlen);
    m->ss = m->ns ? PyUnicode_AsUTF8AndSize(m->scope, &m->slen) : NULL;
    if (m->ss != NULL) return 0;
    Py_DECREF(m->name);
    Py_DECREF(m->scope);
    return -1;
}

static void metas_free(MetaC *m, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; ++i) {
        Py_DECREF(m[i].name);
        Py_DECREF(m[i].scope);
    }
}

/* The first ``n`` row metas of ``v`` (with the GIL); -1 with an exception. */
static int metas_read(const RawView *v, Py_ssize_t n, MetaC *out) {
    for (Py_ssize_t i = 0; i < n; ++i)
        if (meta_read(PySequence_Fast_GET_ITEM(v->metas, i), &out[i]) < 0) {
            metas_free(out, i);
            return -1;
        }
    return 0;
}

/* One flashinfer.tensor_stats event per row.  With ``v->mc`` it calls no Python (the
 * GIL may be released); without, it reads each row's meta itself. */
static int raw_events(Encoder *e, Buf *b, const RawView *v, Py_ssize_t limit, int *first_event,
                      Py_ssize_t *written) {
    for (Py_ssize_t i = 0; i < v->nrows && *written < limit; ++i, ++*written) {
        const unsigned char *row = v->rows + i * ROW_BYTES;
        MetaC own;
        const MetaC *m = v->mc ? &v->mc[i] : &own;
        if (v->mc == NULL && meta_read(PySequence_Fast_GET_ITEM(v->metas, i), &own) < 0)
            return -1;
        const char *ns = m->ns, *ss = m->ss;
        Py_ssize_t nlen = m->nlen, slen = m->slen;
        long long numel = m->numel;
        int rc = 0;
        uint64_t min_key = row_word(row, 0), max_key = row_word(row, 1);
        double total;
        memcpy(&total, row + 16, 8);
        long long finite = (long long)row_word(row, 3), nan = (long long)row_word(row, 4);
        long long inf = (long long)row_word(row, 5), seen = (long long)row_word(row, 6);
        int pages = rc == 0 && slen == 16 && memcmp(ss, "referenced_pages", 16) == 0;
        int sampled = rc == 0 && slen == 7 && memcmp(ss, "sampled", 7) == 0;
        size_t mark = 0;
        int first = 1;
        if (rc == 0) {
            if (e->fmt == FMT_PROTOBUF) {
                rc = pb_open(b, 11, &mark) < 0 || pb_fixed64(b, 1, v->ts) < 0 ||
                     pb_bytes(b, 2, EVENT_NAME, strlen(EVENT_NAME)) < 0 ? -1 : 0;
            } else {
                if (!*first_event && put_c(b, ',') < 0) rc = -1;
                if (rc == 0 && (PUT_LIT(b, "{\"timeUnixNano\":") < 0 || js_u64(b, v->ts, 1) < 0 ||
                                PUT_LIT(b, ",\"name\":\"flashinfer.tensor_stats\",\"attributes\":[") < 0))
                    rc = -1;
            }
            *first_event = 0;
        }
        const double qnan = NAN;
        double lo = qnan, hi = qnan;
        if (min_key || max_key) {
            lo = unkey(~min_key);
            hi = unkey(max_key);
        }
        double mean = finite ? total / (double)finite : qnan;
        if (rc == 0 && e->fmt == FMT_JSON) {
            /* the same attributes as below, each key's JSON written as one literal */
            rc = JS_KV(b, "flashinfer.tensor", "stringValue", first) < 0 ||
                 js_str(b, ns, nlen) < 0 || PUT_LIT(b, "}}") < 0 ||
                 JS_KV(b, "scope", "stringValue", 0) < 0 || js_str(b, ss, slen) < 0 ||
                 PUT_LIT(b, "}}") < 0 || JS_KV(b, "numel", "intValue", 0) < 0 ||
                 js_i64(b, pages ? seen : numel) < 0 || PUT_LIT(b, "}}") < 0 ? -1 : 0;
            if (rc == 0 && sampled)
                rc = JS_KV(b, "sampled_numel", "intValue", 0) < 0 || js_i64(b, seen) < 0 ||
                     PUT_LIT(b, "}}") < 0 ? -1 : 0;
            if (rc == 0 && seen)
                rc = JS_KV(b, "min", "doubleValue", 0) < 0 || js_double(b, lo) < 0 ||
                     PUT_LIT(b, "}}") < 0 || JS_KV(b, "max", "doubleValue", 0) < 0 ||
                     js_double(b, hi) < 0 || PUT_LIT(b, "}}") < 0 ||
                     JS_KV(b, "mean", "doubleValue", 0) < 0 || js_double(b, mean) < 0 ||
                     PUT_LIT(b, "}}") < 0 ? -1 : 0;
            if (rc == 0)
                rc = JS_KV(b, "nan_count", "intValue", 0) < 0 || js_i64(b, nan) < 0 ||
                     PUT_LIT(b, "}}") < 0 || JS_KV(b, "inf_count", "intValue", 0) < 0 ||
                     js_i64(b, inf) < 0 || PUT_LIT(b, "}}") < 0 ? -1 : 0;
            first = 0;
        } else {
            if (rc == 0) rc = kv_c(e, b, 3, "flashinfer.tensor", 's', ns, nlen, 0, 0, &first);
            if (rc == 0) rc = kv_c(e, b, 3, "scope", 's', ss, slen, 0, 0, &first);
            if (rc == 0)
                rc = kv_c(e, b, 3, "numel", 'i', NULL, 0, pages ? seen : numel, 0, &first);
            if (rc == 0 && sampled)
                rc = kv_c(e, b, 3, "sampled_numel", 'i', NULL, 0, seen, 0, &first);
            if (rc == 0 && seen) {
                rc = kv_c(e, b, 3, "min", 'd', NULL, 0, 0, lo, &first);
                if (rc == 0) rc = kv_c(e, b, 3, "max", 'd', NULL, 0, 0, hi, &first);
                if (rc == 0) rc = kv_c(e, b, 3, "mean", 'd', NULL, 0, 0, mean, &first);
            }
            if (rc == 0) rc = kv_c(e, b, 3, "nan_count", 'i', NULL, 0, nan, 0, &first);
            if (rc == 0) rc = kv_c(e, b, 3, "inf_count", 'i', NULL, 0, inf, 0, &first);
        }
        if (rc == 0) rc = e->fmt == FMT_PROTOBUF ? pb_close(b, mark) : PUT_LIT(b, "]}");
        if (v->mc == NULL) metas_free(&own, 1);
        if (rc < 0) return -1;
    }
    return 0;
}

/* "<pid>:<id>" (CallRecord.instance_id), borrowed from a small cache. */
static PyObject *instance_text(Encoder *e, unsigned long long id) {
    int i = (int)((id >> 4) % INSTANCE_CACHE);
    if (e->inst_value[i] != NULL && e->inst_key[i] == id) return e->inst_value[i];
    char text[48];
    int n = snprintf(text, sizeof text, "%ld:%llu", e->pid, id);
    PyObject *value = PyUnicode_FromStringAndSize(text, n);
    if (value == NULL) return NULL;
    Py_XSETREF(e->inst_value[i], value);
    e->inst_key[i] = id;
    return value;
}

static void instance_forget(Encoder *e) {
    for (int i = 0; i < INSTANCE_CACHE; ++i) Py_CLEAR(e->inst_value[i]);
}

/* Where a replay's child's start and end come from (graphs.TIME_SOURCE_ATTR): "gpu"
 * (its statistics launches' clock stamps, placed from the replay's host start by the
 * graph's first launch) or "replay" (the replay's own host start and end). */
static int time_source(Encoder *e, Buf *b, int placed, int *first) {
    return kv_c(e, b, 9, "flashinfer.cuda_graph.time_source", 's', placed ? "gpu" : "replay",
                placed ? 3 : 6, 0, 0, first);
}

/* Encodes ``record`` into e->spans.  ``gpu_ns`` >= 0 adds flashinfer.gpu.time_ns (a GPU
 * time this encoder resolved itself). */
/* ``extra``: statistics rows resolved in C (resolve_stats), encoded after the record's
 * own events as if they were RawStats there. */
/* Where a child's per-replay values sit in its encoded bytes (encode_replay's byte
 * templates): each region [at, end) is rewritten per child, everything between them is
 * copied.  Absolute positions in the batch while a span is encoded; relative to its
 * start (``base``) once kept. */
enum { M_TRACE, M_SPAN, M_PARENT, M_START, M_END, M_INDEX, M_NONFINITE, M_EVENTS, M_COUNT };
typedef struct {
    size_t base, end;
    size_t at[M_COUNT], to[M_COUNT];
    int index_first; /* the index was the span's first attribute (no JSON comma) */
    Py_ssize_t written, dropped; /* attributes written and dropped before nonfinite */
} Marks;

#define MARK_AT(mk, k) do { if (mk) (mk)->at[k] = b->len; } while (0)
#define MARK_TO(mk, k) do { if (mk) (mk)->to[k] = b->len; } while (0)
/* A value a child's template rewrites: written (``goto fail`` if that fails), marked. */
#define MARKED(mk, k, write) \
    do { MARK_AT(mk, k); if ((write) < 0) goto fail; MARK_TO(mk, k); } while (0)

/* ``replay_index`` >= 0: a replay's child, which says its replay (and ``drop_why``, why it
 * has no statistics, when not NULL); ``mk``: where its per-replay values went
 * (encode_replay keeps the bytes as a template). */
static int encode_record(Encoder *e, PyObject *record, long long gpu_ns, const RawView *extra,
                         int n_extra, long long replay_index, int placed,
                         const char *drop_why, Marks *mk) {
    Buf *b = &e->spans;
    size_t start = b->len;
    unsigned char trace[16], span[8], parent_span[8];
    PyObject *parent = slot(e, record, R_PARENT);
    PyObject *name = slot(e, record, R_NAME);
    PyObject *attributes = slot(e, record, R_ATTRIBUTES);
    PyObject *state_text = NULL;
    uint64_t start_ns, end_ns;
    int has_parent = parent != NULL && parent != Py_None;
    if (has_parent && (!PyTuple_Check(parent) || PyTuple_GET_SIZE(parent) < 5)) {
        PyErr_SetString(PyExc_TypeError, "record.parent is not a SpanContext");
        return -1;
    }
    if (as_bytes(slot(e, record, R_TRACE_ID), trace, 16) < 0 ||
        id64(slot(e, record, R_SPAN_ID), span) < 0 ||
        (has_parent && id64(PyTuple_GET_ITEM(parent, 1), parent_span) < 0) ||
        as_u64(slot(e, record, R_START_NS), &start_ns) < 0 ||
        as_u64(slot(e, record, R_END_NS), &end_ns) < 0)
        return -1;
    if (name == NULL || !PyUnicode_Check(name) || attributes == NULL || !PyDict_Check(attributes)) {
        PyErr_SetString(PyExc_TypeError, "record.name or record.attributes has the wrong type");
        return -1;
    }
    if (has_parent && trace_state_text(e, PyTuple_GET_ITEM(parent, 4), &state_text) < 0)
        return -1;
    int remote = has_parent ? PyObject_IsTrue(PyTuple_GET_ITEM(parent, 2)) : 0;
    if (remote < 0) goto fail;
    uint32_t flags = 0x100 | (remote ? 0x200 : 0);
    Py_ssize_t name_len;
    const char *name_s = PyUnicode_AsUTF8AndSize(name, &name_len);
    if (name_s == NULL) goto fail;

    size_t span_mark = 0;
    int js = e->fmt == FMT_JSON;
    if (!js) {
        if (pb_open(b, 2, &span_mark) < 0) goto fail;
        if (mk) mk->base = b->len;
        if (put_ids_pb(b, 1, trace, 2, span) < 0) goto fail;
        if (mk) {
            mk->at[M_SPAN] = b->len - 8, mk->to[M_SPAN] = b->len;
            mk->at[M_TRACE] = b->len - 26, mk->to[M_TRACE] = b->len - 10;
        }
        if (state_text != NULL) {
            Py_ssize_t n;
            const char *s = PyUnicode_AsUTF8AndSize(state_text, &n);
            if (s == NULL || (n && pb_bytes(b, 3, s, (size_t)n) < 0)) goto fail;
        }
        if (has_parent && pb_bytes(b, 4, parent_span, 8) < 0) goto fail;
        if (mk) mk->at[M_PARENT] = b->len - 8, mk->to[M_PARENT] = b->len;
        if (name_len && pb_bytes(b, 5, name_s, (size_t)name_len) < 0) goto fail;
        if (pb_tag(b, 6, 0) < 0 || pb_varint(b, 1) < 0) goto fail; /* SPAN_KIND_INTERNAL */
        if (pb_fixed64(b, 7, start_ns) < 0) goto fail;
        if (mk) mk->at[M_START] = b->len - 8, mk->to[M_START] = b->len;
        if (pb_fixed64(b, 8, end_ns) < 0) goto fail;
        if (mk) mk->at[M_END] = b->len - 8, mk->to[M_END] = b->len;
    } else {
        if (e->count && put_c(b, ',') < 0) goto fail;
        if (mk) mk->base = b->len;
        if (PUT_LIT(b, "{\"traceId\":") < 0) goto fail;
        MARKED(mk, M_TRACE, js_hex(b, trace, 16));
        if (PUT_LIT(b, ",\"spanId\":") < 0) goto fail;
        MARKED(mk, M_SPAN, js_hex(b, span, 8));
        if (state_text != NULL) {
            Py_ssize_t n;
            const char *s = PyUnicode_AsUTF8AndSize(state_text, &n);
            if (s == NULL) goto fail;
            if (n && (PUT_LIT(b, ",\"traceState\":") < 0 || js_str(b, s, n) < 0)) goto fail;
        }
        if (has_parent && PUT_LIT(b, ",\"parentSpanId\":") < 0) goto fail;
        MARKED(mk, M_PARENT, has_parent ? js_hex(b, parent_span, 8) : 0);
        if (PUT_LIT(b, ",\"flags\":") < 0 || js_u64(b, flags, 0) < 0) goto fail;
        if (name_len && (PUT_LIT(b, ",\"name\":") < 0 || js_str(b, name_s, name_len) < 0))
            goto fail;
        if (PUT_LIT(b, ",\"kind\":1,\"startTimeUnixNano\":") < 0) goto fail;
        MARKED(mk, M_START, js_u64(b, start_ns, 1));
        if (PUT_LIT(b, ",\"endTimeUnixNano\":") < 0) goto fail;
        MARKED(mk, M_END, js_u64(b, end_ns, 1));
    }

    /* attributes: base (or the owned dict), instance id, GPU time, arguments, extra */
    Py_ssize_t written = 0, dropped = 0;
    int first = 1;
    size_t attrs_at = b->len;
    if (js && PUT_LIT(b, ",\"attributes\":[") < 0) goto fail;
    int shared = slot(e, record, R_SHARED) == Py_True;
    if (shared) {
        PyObject *bytes;
        Py_ssize_t count;
        if (base_block(e, attributes, &bytes, &count) < 0) goto fail;
        if (block_within(e, b, bytes, count, attributes, &written, &dropped, &first) < 0)
            goto fail;
        PyObject *instance = slot(e, record, R_INSTANCE);
        if (instance != NULL && PyLong_Check(instance)) {
            unsigned long long id = PyLong_AsUnsignedLongLongMask(instance);
            if (id != 0) {
                PyObject *value = instance_text(e, id);
                if (value == NULL) goto fail;
                int rc = written < e->max_attributes
                             ? attr(e, b, 9, e->k_instance, value, &first) : (dropped++, 0);
                if (rc < 0) goto fail;
                written += rc;
            }
        }
    } else {
        Py_ssize_t n = attrs_of(e, b, 9, attributes, e->max_attributes, &dropped, &first);
        if (n < 0) goto fail;
        written += n;
    }
    if (replay_index >= 0) { /* a replay's child: which replay (ReplayRecord.expand) */
        if (mk) mk->index_first = first, mk->written = written;
        MARK_AT(mk, M_INDEX);
        int rc = 0;
        if (written < e->max_attributes) {
            rc = kv_c(e, b, 9, "flashinfer.cuda_graph.replay", 'i', NULL, 0, replay_index, 0,
                      &first) < 0 ? -1 : 1;
        } else {
            dropped++;
        }
        if (rc < 0) goto fail;
        written += rc;
        rc = 0;
        if (written < e->max_attributes) {
            rc = time_source(e, b, placed, &first) < 0 ? -1 : 1;
        } else {
            dropped++;
        }
        if (rc < 0) goto fail;
        written += rc;
        rc = 0;
        if (drop_why != NULL && written < e->max_attributes) {
            rc = kv_c(e, b, 9, "flashinfer.stats.dropped", 's', drop_why,
                      (Py_ssize_t)strlen(drop_why), 0, 0, &first) < 0 ? -1 : 1;
        } else if (drop_why != NULL) {
            dropped++;
        }
        if (rc < 0) goto fail;
        written += rc;
    }
    if (gpu_ns >= 0) {
        PyObject *value = PyLong_FromLongLong(gpu_ns);
        if (value == NULL) goto fail;
        int rc = written < e->max_attributes ? attr(e, b, 9, e->k_gpu_time, value, &first)
                                             : (dropped++, 0);
        Py_DECREF(value);
        if (rc < 0) goto fail;
        written += rc;
    }
    /* a child's GPU time (its statistics launches' stamps) is per replay: the index's
     * region takes it too */
    if (replay_index >= 0) MARK_TO(mk, M_INDEX);
    PyObject *describer = slot(e, record, R_DESCRIBE);
    if (describer != NULL && describer != Py_None) {
        PyObject *bytes, *dict;
        Py_ssize_t count;
        if (describe_block(e, record, &bytes, &count, &dict) < 0) {
            /* as on the SDK path: the span goes out without its argument attributes */
            if (PyErr_ExceptionMatches(PyExc_MemoryError)) goto fail;
            PyErr_Clear();
            e->describe_errors++;
        } else if (block_within(e, b, bytes, count, dict, &written, &dropped, &first) < 0) {
            goto fail;
        }
    }
    if (e->extra_block != NULL &&
        block_within(e, b, e->extra_block, e->extra_count, e->extra, &written, &dropped,
                     &first) < 0)
        goto fail;
    /* statistics rows decoded here: a call that saw NaN/Inf says so on the span */
    PyObject *events = slot(e, record, R_EVENTS);
    Py_ssize_t n_events = events != NULL && (PyList_Check(events) || PyTuple_Check(events))
                              ? PySequence_Fast_GET_SIZE(events) : 0;
    int nonfinite = 0;
    Py_ssize_t total_events = views_rows(extra, n_extra, &nonfinite);
    for (Py_ssize_t i = 0; i < n_events; ++i) {
        PyObject *ev = PySequence_Fast_GET_ITEM(events, i);
        if (e->raw_stats != NULL && Py_TYPE(ev) == e->raw_stats) {
            RawView v;
            if (raw_view(ev, &v) < 0) goto fail;
            total_events += v.nrows;
            nonfinite = nonfinite || raw_nonfinite(&v);
        } else {
            total_events += 1;
        }
    }
    if (mk) mk->written = written, mk->dropped = dropped; /* all before nonfinite */
    MARK_AT(mk, M_NONFINITE);
    if (nonfinite && !(!shared && PyDict_GetItemWithError(attributes, e->k_nonfinite) != NULL)) {
        if (PyErr_Occurred()) goto fail;
        int rc = written < e->max_attributes ? attr(e, b, 9, e->k_nonfinite, Py_True, &first)
                                             : (dropped++, 0);
        if (rc < 0) goto fail;
        written += rc;
    }
    MARK_TO(mk, M_NONFINITE);
    if (js) {
        if (written == 0) b->len = attrs_at;
        else if (put_c(b, ']') < 0) goto fail;
        if (dropped && (PUT_LIT(b, ",\"droppedAttributesCount\":") < 0 ||
                        js_u64(b, (uint64_t)dropped, 0) < 0))
            goto fail;
    } else if (dropped && (pb_tag(b, 10, 0) < 0 || pb_varint(b, (uint64_t)dropped) < 0)) {
        goto fail;
    }

    /* events: the record's, up to the limit, then the exception */
    PyObject *error = slot(e, record, R_ERROR);
    int has_error = error != NULL && error != Py_None;
    Py_ssize_t dropped_events = total_events > e->max_events ? total_events - e->max_events : 0;
    MARK_AT(mk, M_EVENTS);
    if (n_events || has_error || n_extra) {
        int first_event = 1;
        size_t events_at = b->len;
        Py_ssize_t emitted = 0, limit = total_events - dropped_events;
        if (js && PUT_LIT(b, ",\"events\":[") < 0) goto fail;
        /* Held, each event too, and the size read again: an attribute value's Python
         * (a key's __str__) may change the list or free what it held. */
        if (n_events) Py_INCREF(events);
        int ev_rc = 0;
        for (Py_ssize_t i = 0; n_events && i < PySequence_Fast_GET_SIZE(events) &&
                               emitted < limit; ++i) {
            PyObject *ev = PySequence_Fast_GET_ITEM(events, i);
            uint64_t ts;
            if (e->raw_stats != NULL && Py_TYPE(ev) == e->raw_stats) {
                RawView v;
                Py_INCREF(ev);
                ev_rc = raw_view(ev, &v) < 0 || raw_events(e, b, &v, limit, &first_event,
                                                           &emitted) < 0 ? -1 : 0;
                Py_DECREF(ev);
                if (ev_rc < 0) break;
                continue;
            }
            ++emitted;
            if (!PyTuple_Check(ev) || PyTuple_GET_SIZE(ev) != 3 ||
                as_u64(PyTuple_GET_ITEM(ev, 2), &ts) < 0) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_TypeError, "an event is not (name, attributes, ts)");
                ev_rc = -1;
                break;
            }
            Py_INCREF(ev);
            ev_rc = event_one(e, b, PyTuple_GET_ITEM(ev, 0), PyTuple_GET_ITEM(ev, 1), ts,
                              &first_event);
            Py_DECREF(ev);
            if (ev_rc < 0) break;
        }
        if (n_events) Py_DECREF(events);
        if (ev_rc < 0) goto fail;
        for (int i = 0; i < n_extra && emitted < limit; ++i)
            if (raw_events(e, b, &extra[i], limit, &first_event, &emitted) < 0) goto fail;
        if (has_error && error_event(e, b, error, end_ns, &first_event) < 0) goto fail;
        if (js) {
            if (first_event) b->len = events_at;
            else if (put_c(b, ']') < 0) goto fail;
        }
    }
    if (dropped_events) {
        if (js ? (PUT_LIT(b, ",\"droppedEventsCount\":") < 0 ||
                  js_u64(b, (uint64_t)dropped_events, 0) < 0)
               : (pb_tag(b, 12, 0) < 0 || pb_varint(b, (uint64_t)dropped_events) < 0))
            goto fail;
    }
    MARK_TO(mk, M_EVENTS);

    /* links: the plan this run used first (as CallRecord.own puts it), then the rest */
    PyObject *plan_link = slot(e, record, R_PLAN_LINK);
    PyObject *links = slot(e, record, R_LINKS);
    Py_ssize_t n_links = links != NULL && (PyList_Check(links) || PyTuple_Check(links))
                             ? PySequence_Fast_GET_SIZE(links) : 0;
    int has_plan = plan_link != NULL && plan_link != Py_None;
    Py_ssize_t total_links = n_links + has_plan;
    Py_ssize_t dropped_links = total_links > e->max_links ? total_links - e->max_links : 0;
    if (total_links - dropped_links > 0) {
        int first_link = 1;
        Py_ssize_t left = total_links - dropped_links;
        if (js && PUT_LIT(b, ",\"links\":[") < 0) goto fail;
        if (has_plan && left > 0) {
            if (link_one(e, b, plan_link, NULL, &first_link) < 0) goto fail;
            --left;
        }
        /* held, as the events: a link's properties are Python */
        if (n_links) Py_INCREF(links);
        int link_rc = 0;
        for (Py_ssize_t i = 0; n_links && i < PySequence_Fast_GET_SIZE(links) && left > 0;
             ++i, --left) {
            PyObject *link = PySequence_Fast_GET_ITEM(links, i);
            Py_INCREF(link);
            PyObject *context = PyObject_GetAttr(link, e->s_context);
            PyObject *lattrs = context ? PyObject_GetAttr(link, e->s_attrs) : NULL;
            link_rc = lattrs ? link_one(e, b, context, lattrs, &first_link) : -1;
            Py_XDECREF(context);
            Py_XDECREF(lattrs);
            Py_DECREF(link);
            if (link_rc < 0) break;
        }
        if (n_links) Py_DECREF(links);
        if (link_rc < 0) goto fail;
        if (js && put_c(b, ']') < 0) goto fail;
    }
    if (dropped_links) {
        if (js ? (PUT_LIT(b, ",\"droppedLinksCount\":") < 0 ||
                  js_u64(b, (uint64_t)dropped_links, 0) < 0)
               : (pb_tag(b, 14, 0) < 0 || pb_varint(b, (uint64_t)dropped_links) < 0))
            goto fail;
    }

    /* status: the user's exception, else a CUDA error pinned to this call */
    PyObject *message = NULL;
    int code = 0;
    if (has_error) {
        message = PyUnicode_FromFormat("%S: %S", PyTuple_GET_ITEM(error, 0),
                                       PyTuple_GET_ITEM(error, 1));
        if (message == NULL) goto fail;
        code = 2;
    } else if (!shared) {
        PyObject *cuda = PyDict_GetItemWithError(attributes, e->k_cuda_error);
        if (cuda == NULL && PyErr_Occurred()) goto fail;
        int truth = cuda != NULL ? PyObject_IsTrue(cuda) : 0;
        if (truth < 0) goto fail;
        if (truth) {
            message = PyObject_Str(cuda);
            if (message == NULL) goto fail;
            code = 2;
        }
    }
    {
        Py_ssize_t mlen = 0;
        const char *ms = message ? PyUnicode_AsUTF8AndSize(message, &mlen) : NULL;
        int rc;
        if (message != NULL && ms == NULL) {
            Py_DECREF(message);
            goto fail;
        }
        if (!js) {
            size_t mark;
            rc = pb_open(b, 15, &mark);
            if (rc == 0 && mlen) rc = pb_bytes(b, 2, ms, (size_t)mlen);
            if (rc == 0 && code) rc = (pb_tag(b, 3, 0) < 0 || pb_varint(b, (uint64_t)code) < 0) ? -1 : 0;
            if (rc == 0) rc = pb_close(b, mark);
            if (rc == 0) rc = pb_fixed32(b, 16, flags);
        } else {
            rc = PUT_LIT(b, ",\"status\":{");
            if (rc == 0 && mlen) rc = (PUT_LIT(b, "\"message\":") < 0 || js_str(b, ms, mlen) < 0) ? -1 : 0;
            if (rc == 0 && code)
                rc = mlen ? PUT_LIT(b, ",\"code\":2") : PUT_LIT(b, "\"code\":2");
            if (rc == 0) rc = PUT_LIT(b, "}}");
        }
        Py_XDECREF(message);
        if (rc < 0) goto fail;
    }
    if (mk) mk->end = b->len; /* pb: the body, before its length is fixed */
    if (!js && pb_close(b, span_mark) < 0) goto fail;
    Py_XDECREF(state_text);
    e->count++;
    e->encoded++;
    return 0;
fail:
    Py_XDECREF(state_text);
    b->len = start; /* the batch keeps only whole spans */
    e->failed++;
    return -1;
}

/* ---- Python methods ---------------------------------------------------------------- */

/* Methods refuse an encoder that was never initialised, or one re-entered from a Python
 * callback of its own (a describer, a link's properties) in the middle of a span. */
static int usable(Encoder *e) {
    if (e->record_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Encoder is not initialised");
        return 0;
    }
    if (e->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Encoder re-entered while encoding a span");
        return 0;
    }
    return 1;
}

static PyObject *enc_add(Encoder *e, PyObject *record) {
    if (!usable(e)) return NULL;
    if (!PyObject_TypeCheck(record, (PyTypeObject *)e->record_type)) {
        PyErr_SetString(PyExc_TypeError, "add() takes a CallRecord");
        return NULL;
    }
    if (e->replay_type != NULL && Py_TYPE(record) == e->replay_type &&
        *(PyObject **)((char *)record + e->replay_offsets[0]) != Py_None) {
        PyErr_SetString(PyExc_TypeError, "add() takes a replay only once its children "
                        "are expanded (ReplayRecord.expand)");
        return NULL;
    }
    e->busy = 1;
    e->busy_thread = PyThread_get_thread_ident();
    int rc = encode_record(e, record, -1, NULL, 0, -1, 0, NULL, NULL);
    e->busy = 0;
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

/* GPU time of a record's packed event pair (``start << 16 | end``) through the event
 * pool's API: >= 0 ns, NOT_READY while the end event is pending, or -1: leave it to
 * Python (an error to pin, or no API).  The events are given back (gpu_release) only
 * once the span is encoded. */
static long long gpu_time(PyObject *handle, long long *packed) {
    if (gpu_api == NULL || gpu_api->version < 2 || !PyLong_CheckExact(handle)) return -1;
    long long h = PyLong_AsLongLong(handle);
    if (h == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    int64_t r = gpu_api->resolve(h >> 16, h & 0xFFFF);
    if (r == NOT_READY) return NOT_READY;
    if (r < 0) return -1; /* a CUDA error: Python pins it on the span */
    *packed = h;
    return r;
}

static void gpu_release(long long packed) {
    gpu_api->release(packed >> 16);
    gpu_api->release(packed & 0xFFFF);
}

/* ---- level-5 statistics resolved without Python ------------------------------------
 *
 * A level-5 call reaches the worker with one StatsPending (stats/pending.py): its rows
 * land in a pinned slot of a SlotRing (stats/ring.py) and the slot's CUDA event says
 * when.  Polling that event, reading the rows and handing the slot back took about
 * 20 us of Python per call on the worker (while holding the GIL the engine needs), and
 * in a burst of graph replays that resolver fell behind and the ring filled.  Here the
 * common case is done in C: one StatsPending, a native event, no note to add, no other
 * GPU work; anything else (a CUDA error, a torch event, several devices) goes to the
 * Python path, which stays the reference (tests/test_native_stats.py compares them). */

static const otel_flashinfer_stats_api *stats_api = NULL;
static PyObject *stats_api_capsule = NULL;
static PyTypeObject *stats_pending_type = NULL;
enum { P_STATUS, P_GPU_TIME, P_METAS, P_NOTE, P_OUT_METAS, P_OUT_NOTE, P_OUT_TS, P_RING,
       P_SLOT, P_TS_NS, P_COUNT };
static const char *const pending_slot_names[P_COUNT] = {
    "_status", "gpu_time", "metas", "note", "out_metas", "out_note", "out_ts", "ring", "slot",
    "ts_ns"};
static Py_ssize_t pending_offsets[P_COUNT];
static PyObject *s_kind, *s_native, *s_base, *s_slot_bytes, *s_rows, *s_release, *s_append,
    *s_anchor;

/* The byte offset of each named __slots__ member of ``type``; -1 with TypeError if one
 * is missing (a renamed field must fail loudly, not read the wrong memory). */
static int slot_offsets(PyTypeObject *type, const char *const *names, int n,
                        Py_ssize_t *offsets) {
    for (int i = 0; i < n; ++i) {
        PyObject *descr = PyDict_GetItemString(type->tp_dict, names[i]);
        if (descr == NULL || Py_TYPE(descr) != &PyMemberDescr_Type ||
            ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
            PyErr_Format(PyExc_TypeError, "%s.%s is not a __slots__ member", type->tp_name,
                         names[i]);
            return -1;
        }
        offsets[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
    }
    return 0;
}

static inline PyObject *pslot(PyObject *pending, int which) {
    return *(PyObject **)((char *)pending + pending_offsets[which]);
}

/* A plain int attribute of the ring (its instance dict: no descriptor, no call). */
static int ring_int(PyObject *ring, PyObject *name, long long *out) {
    PyObject *v = PyObject_GetAttr(ring, name);
    if (v == NULL) return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int empty_text(PyObject *v) {
    return v != NULL && PyUnicode_Check(v) && PyUnicode_GET_LENGTH(v) == 0;
}

typedef struct {
    RawView views[2];
    int nviews;
    long long gpu_ns;
    long long offset_ns; /* a graph child's start after its graph's first launch, or -1 */
    PyObject *pending; /* borrowed */
    PyObject *ring;    /* borrowed */
    PyObject *slot;    /* borrowed */
    const char *dropped; /* why a replay's child has no statistics (has 3): the group's */
} Resolved;

enum { RESOLVED = 0, NOT_YET = 1, TO_PYTHON = -1 };

/* Whether ``record``'s statistics can be resolved here, and if so whether they are in:
 * RESOLVED (``r`` filled: rows still in the slot, which the caller hands back after
 * encoding), NOT_YET, or TO_PYTHON (no exception set). */
/* The status of ``slot``'s event in ``ring`` when ``*status_ref`` still says 1 (not
 * yet): 0 done, 1 not yet, else a CUDA error; kept in *status_ref as the Python path
 * (``ready``) keeps it.  TO_PYTHON (no exception set): not a native event. */
static long slot_status(PyObject *ring, long slot, PyObject **status_ref) {
    long status = PyLong_AsLong(*status_ref);
    if (status == -1 && PyErr_Occurred()) goto python;
    if (status != 1) return status;
    PyObject *kinds = PyObject_GetAttr(ring, s_kind);
    PyObject *events = kinds ? PyObject_GetAttr(ring, s_native) : NULL;
    int ok = events != NULL && PyList_CheckExact(kinds) && PyList_CheckExact(events) &&
             slot < PyList_GET_SIZE(kinds) && slot < PyList_GET_SIZE(events) &&
             PyUnicode_Check(PyList_GET_ITEM(kinds, slot)) &&
             PyUnicode_CompareWithASCIIString(PyList_GET_ITEM(kinds, slot), "native") == 0;
    long long event = ok ? PyLong_AsLongLong(PyList_GET_ITEM(events, slot)) : 0;
    Py_XDECREF(kinds);
    Py_XDECREF(events);
    if (!ok || event == 0 || PyErr_Occurred()) goto python; /* a torch event: Python */
    status = (long)stats_api->event_query(event);
    PyObject *v = PyLong_FromLong(status);
    if (v == NULL) goto python;
    Py_SETREF(*status_ref, v);
    return status;
python:
    PyErr_Clear();
    return TO_PYTHON;
}

/* ``r`` over the rows at ``at`` of ``slot``: ``metas`` (taken at ``ts``) then
 * ``out_metas`` (None: none, at ``out_ts``); ``timed``: the call's GPU time from the
 * spare words of row 0 (inputs' launch ended) and row n (outputs' launch began), see
 * StatsPending.gpu_time, and for a graph's child its offset from the graph's first
 * launch (the ring's ``_anchor``: slot 0's word, like its rows at ``_base``; None on
 * an eager ring).  RESOLVED or TO_PYTHON (no exception set). */
static int rows_resolved(Resolved *r, long long anchor, const unsigned char *at, long slot,
                         long long slot_bytes, PyObject *metas, PyObject *out_metas,
                         PyObject *ts, PyObject *out_ts, int timed) {
    Py_ssize_t n = PySequence_Fast_GET_SIZE(metas);
    Py_ssize_t nout = out_metas == Py_None ? 0 : PySequence_Fast_GET_SIZE(out_metas);
    r->nviews = 0;
    r->gpu_ns = -1;
    r->offset_ns = -1;
    if (timed) {
        long long t0 = (long long)row_word(at, 7), t1 = (long long)row_word(at + n * ROW_BYTES, 7);
        if (!(0 < t0 && t0 <= t1)) return TO_PYTHON; /* no stamp: Python says so */
        r->gpu_ns = t1 - t0;
        if (anchor > 0) {
            long long first_ns;
            memcpy(&first_ns, (const unsigned char *)(intptr_t)(anchor + slot * slot_bytes), 8);
            if (0 < first_ns && first_ns <= t0) r->offset_ns = t0 - first_ns;
        }
    }
    if (n || !nout) {
        RawView *v = &r->views[r->nviews++];
        v->rows = at;
        v->nrows = n;
        v->metas = metas;
        v->mc = NULL;
        if (as_u64(ts, &v->ts) < 0) goto python;
    }
    if (nout) {
        RawView *v = &r->views[r->nviews++];
        v->rows = at + n * ROW_BYTES;
        v->nrows = nout;
        v->metas = out_metas;
        v->mc = NULL;
        if (as_u64(out_ts, &v->ts) < 0) goto python;
    }
    return RESOLVED;
python:
    PyErr_Clear();
    return TO_PYTHON;
}

static int is_seq(PyObject *v) { return PyTuple_Check(v) || PyList_Check(v); }

/* The ring's ``_anchor`` (slot 0's anchor word, stats.graph_rows) in *out: 0 when None
 * (an eager ring); -1 (no exception set) when it is not an int. */
static int ring_anchor(PyObject *ring, long long *out) {
    PyObject *anchor = PyObject_GetAttr(ring, s_anchor);
    *out = 0;
    if (anchor != NULL && anchor != Py_None) *out = PyLong_AsLongLong(anchor);
    Py_XDECREF(anchor);
    if (PyErr_Occurred() || *out < 0) {
        PyErr_Clear();
        return -1;
    }
    return 0;
}

/* Whether ``record``'s statistics can be resolved here, and if so whether they are in:
 * RESOLVED (``r`` filled: rows still in the slot, which the caller hands back after
 * encoding), NOT_YET, or TO_PYTHON (no exception set). */
static int resolve_one(PyObject *p, Resolved *r) {
    if (stats_api == NULL || Py_TYPE(p) != stats_pending_type) return TO_PYTHON;
    PyObject *slot_obj = pslot(p, P_SLOT), *status_obj = pslot(p, P_STATUS);
    PyObject *ring = pslot(p, P_RING), *metas = pslot(p, P_METAS);
    PyObject *out_metas = pslot(p, P_OUT_METAS);
    if (slot_obj == NULL || status_obj == NULL || ring == NULL || metas == NULL ||
        out_metas == NULL || !PyLong_CheckExact(slot_obj) || !PyLong_CheckExact(status_obj) ||
        !empty_text(pslot(p, P_NOTE)) || !empty_text(pslot(p, P_OUT_NOTE)))
        return TO_PYTHON; /* a note to add (too many tensors): Python writes it */
    if (!is_seq(metas) || (out_metas != Py_None && !is_seq(out_metas))) return TO_PYTHON;
    long slot = PyLong_AsLong(slot_obj);
    if (slot < 0 || PyErr_Occurred()) goto python;
    long status = slot_status(ring, slot,
                              (PyObject **)((char *)p + pending_offsets[P_STATUS]));
    if (status == 1) return NOT_YET;
    if (status != 0) return TO_PYTHON; /* a CUDA error: Python marks the span with it */
    long long base, slot_bytes, rows;
    if (ring_int(ring, s_base, &base) < 0 || ring_int(ring, s_slot_bytes, &slot_bytes) < 0 ||
        ring_int(ring, s_rows, &rows) < 0)
        goto python;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(metas);
    Py_ssize_t nout = out_metas == Py_None ? 0 : PySequence_Fast_GET_SIZE(out_metas);
    int timed = pslot(p, P_GPU_TIME) == Py_True;
    Py_ssize_t need = n + (nout > timed ? nout : timed);
    if (base == 0 || rows < need || slot_bytes < rows * ROW_BYTES) return TO_PYTHON;
    const unsigned char *at = (const unsigned char *)(intptr_t)(base + slot * slot_bytes);
    long long anchor = 0;
    if ((timed && ring_anchor(ring, &anchor) < 0) ||
        rows_resolved(r, anchor, at, slot, slot_bytes, metas, out_metas, pslot(p, P_TS_NS),
                      pslot(p, P_OUT_TS), timed) != RESOLVED)
        return TO_PYTHON;
    r->pending = p;
    r->ring = ring;
    r->slot = slot_obj;
    return RESOLVED;
python:
    PyErr_Clear();
    return TO_PYTHON;
}

/* ---- a graph's statistics for a whole replay (stats.graph_rows.GraphStatsPending) ----
 *
 * One slot holds every captured call's rows of one traced replay; ``layout`` says per
 * child (index, byte offset in the slot, metas, out metas or None, timed, note).  Each
 * child's rows are viewed in place, and the slot goes back once, after the replay is
 * written: no Python object per child on either thread. */

static PyTypeObject *group_pending_type = NULL;
enum { G_STATUS, G_DROPPED, G_LAYOUT, G_RING, G_SLOT, G_STAMPED, G_TS_NS, G_COUNT };
static const char *const group_slot_names[G_COUNT] = {"_status", "dropped", "layout", "ring",
                                                      "slot", "stamped", "ts_ns"};
/* A stamped group's slot holds the replay's own GPU time: the graph head's stamp in word
 * HEAD_WORD of its first row (the anchor row) and the snapshot's start in the next
 * (stats.graph_rows.HEAD_WORD). */
#define HEAD_WORD 5
static Py_ssize_t group_offsets[G_COUNT];

static inline PyObject *gslot(PyObject *g, int which) {
    return *(PyObject **)((char *)g + group_offsets[which]);
}

/* A replay whose group got no slot (``dropped``: the ring full, a failed copy): each of
 * its children says why (has[i] = 3, no rows), and a stamped one says why the replay
 * has no GPU time (*replay_dropped).  RESOLVED or TO_PYTHON (no exception set). */
static int resolve_dropped(PyObject *g, PyObject *dropped, Py_ssize_t n, Resolved *res,
                           char *has, int *replay_dropped) {
    PyObject *layout = gslot(g, G_LAYOUT), *stamped = gslot(g, G_STAMPED);
    if (layout == NULL || stamped == NULL || !PyTuple_Check(layout)) return TO_PYTHON;
    const char *why = PyUnicode_AsUTF8(dropped); /* lives with the group's str */
    if (why == NULL) goto python;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(layout); ++k) {
        PyObject *entry = PyTuple_GET_ITEM(layout, k);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) < 1) return TO_PYTHON;
        Py_ssize_t i = PyLong_AsSsize_t(PyTuple_GET_ITEM(entry, 0));
        if (PyErr_Occurred()) goto python;
        if (i < 0 || i >= n || has[i]) return TO_PYTHON;
        res[i].nviews = 0;
        res[i].gpu_ns = res[i].offset_ns = -1;
        res[i].dropped = why;
        has[i] = 3;
    }
    if (stamped == Py_True) *replay_dropped = 1;
    return RESOLVED;
python:
    PyErr_Clear();
    return TO_PYTHON;
}

/* Fills res[i] (has[i] = 2) for each child of ``g``: RESOLVED, NOT_YET or TO_PYTHON
 * (a child that already has statistics, a note, a stamp missing...); a stamped group
 * also puts the replay's GPU time in *replay_ns, or says it has none (dropped). */
static int resolve_group(PyObject *g, Py_ssize_t n, Resolved *res, char *has,
                         long long *replay_ns, int *replay_dropped) {
    if (stats_api == NULL || group_pending_type == NULL || Py_TYPE(g) != group_pending_type)
        return TO_PYTHON;
    PyObject *dropped = gslot(g, G_DROPPED);
    if (dropped == NULL || !PyUnicode_Check(dropped)) return TO_PYTHON;
    if (PyUnicode_GET_LENGTH(dropped) > 0)
        return resolve_dropped(g, dropped, n, res, has, replay_dropped);
    PyObject *slot_obj = gslot(g, G_SLOT), *ring = gslot(g, G_RING);
    PyObject *layout = gslot(g, G_LAYOUT), *ts = gslot(g, G_TS_NS);
    PyObject *stamped = gslot(g, G_STAMPED);
    if (slot_obj == NULL || ring == NULL || layout == NULL || ts == NULL || stamped == NULL ||
        gslot(g, G_STATUS) == NULL || !PyLong_CheckExact(slot_obj) || !PyTuple_Check(layout))
        return TO_PYTHON;
    long slot = PyLong_AsLong(slot_obj);
    if (slot < 0 || PyErr_Occurred()) goto python;
    long status = slot_status(ring, slot, (PyObject **)((char *)g + group_offsets[G_STATUS]));
    if (status == 1) return NOT_YET;
    if (status != 0) return TO_PYTHON;
    long long base, slot_bytes, rows;
    if (ring_int(ring, s_base, &base) < 0 || ring_int(ring, s_slot_bytes, &slot_bytes) < 0 ||
        ring_int(ring, s_rows, &rows) < 0)
        goto python;
    long long anchor;
    if (base == 0 || slot_bytes < rows * ROW_BYTES || ring_anchor(ring, &anchor) < 0)
        return TO_PYTHON;
    const unsigned char *slot_at = (const unsigned char *)(intptr_t)(base + slot * slot_bytes);
    if (stamped == Py_True) {
        if (rows < 1) return TO_PYTHON;
        long long head = (long long)row_word(slot_at, HEAD_WORD);
        long long end = (long long)row_word(slot_at, HEAD_WORD + 1);
        if (!(0 < head && head <= end)) return TO_PYTHON; /* Python says why */
        *replay_ns = end - head;
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(layout); ++k) {
        PyObject *entry = PyTuple_GET_ITEM(layout, k);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) < 6) return TO_PYTHON;
        Py_ssize_t i = PyLong_AsSsize_t(PyTuple_GET_ITEM(entry, 0));
        long long off = PyLong_AsLongLong(PyTuple_GET_ITEM(entry, 1));
        PyObject *metas = PyTuple_GET_ITEM(entry, 2), *out_metas = PyTuple_GET_ITEM(entry, 3);
        int timed = PyTuple_GET_ITEM(entry, 4) == Py_True;
        if (PyErr_Occurred()) goto python;
        if (i < 0 || i >= n || has[i] || !empty_text(PyTuple_GET_ITEM(entry, 5)) ||
            !is_seq(metas) || (out_metas != Py_None && !is_seq(out_metas)))
            return TO_PYTHON;
        Py_ssize_t nin = PySequence_Fast_GET_SIZE(metas);
        Py_ssize_t nout = out_metas == Py_None ? 0 : PySequence_Fast_GET_SIZE(out_metas);
        Py_ssize_t need = nin + (nout > timed ? nout : timed);
        if (off < 0 || off % ROW_BYTES != 0 || off / ROW_BYTES + need > rows) return TO_PYTHON;
        if (rows_resolved(&res[i], anchor, slot_at + off, slot, slot_bytes, metas, out_metas, ts,
                          ts, timed) != RESOLVED)
            return TO_PYTHON;
        has[i] = 2;
    }
    return RESOLVED;
python:
    PyErr_Clear();
    return TO_PYTHON;
}

/* The slot held at byte ``slot_at`` of ``owner`` (a pending) back to ``ring``
 * (``release``), the owner's slot set to -1: spent. */
static void hand_back(PyObject *owner, Py_ssize_t slot_at, PyObject *ring) {
    PyObject **field = (PyObject **)((char *)owner + slot_at);
    PyObject *slot = *field;
    Py_INCREF(slot); /* the owner's reference goes just below */
    Py_INCREF(ring);
    PyObject *spent = PyLong_FromLong(-1);
    if (spent != NULL) Py_SETREF(*field, spent);
    PyObject *ok = PyObject_CallMethodOneArg(ring, s_release, slot);
    if (ok == NULL) PyErr_Clear(); /* the ring then has one slot fewer, nothing else */
    Py_XDECREF(ok);
    Py_DECREF(slot);
    Py_DECREF(ring);
}

/* After the replay is written: the group's slot back to its ring, the pending spent (a
 * dropped replay's group holds none). */
static void group_back(PyObject *g) {
    PyObject *slot = gslot(g, G_SLOT);
    if (PyLong_CheckExact(slot) && PyLong_AsLong(slot) < 0) {
        PyErr_Clear();
        return;
    }
    hand_back(g, group_offsets[G_SLOT], gslot(g, G_RING));
}

/* A record's pending list: one StatsPending and no other GPU work is what C resolves. */
static int resolve_stats(PyObject *record, PyObject *pendings, PyObject *gpu, Resolved *r) {
    if (!PyList_CheckExact(pendings) || PyList_GET_SIZE(pendings) != 1 ||
        (gpu != NULL && gpu != Py_None))
        return TO_PYTHON;
    return resolve_one(PyList_GET_ITEM(pendings, 0), r);
}

/* After the span is encoded: the slot goes back to its ring (SlotRing.release) and the
 * pending says it is spent. */
static void slot_back(Resolved *r) {
    hand_back(r->pending, pending_offsets[P_SLOT], r->ring);
}

/* ... and the record lets go of its pending. */
static void resolved_done(Encoder *e, PyObject *record, Resolved *r) {
    slot_back(r);
    slot_set(e, record, R_PENDING, e->empty);
    e->stats_resolved++;
}

/* ---- graph replays written whole from their prototypes --------------------------------
 *
 * A traced replay of a captured graph arrives as one ReplayRecord (pipeline.py): its
 * own span, plus per captured call a read-only prototype record (name, attributes
 * without the replay index, the link to the capture-time span, the capture-time
 * argument snapshots) and, at level 5, that child's statistics pending.  The children
 * are written here from the prototypes with fresh span ids, the replay's trace, times
 * and index, so the replaying thread makes no record per child and the worker runs no
 * Python per child.  All or nothing: a child that is not ready holds the whole replay
 * back, and one that C cannot resolve sends the whole replay to Python, which expands
 * it into plain records (ReplayRecord.expand). */

enum { X_TEMPLATE, X_CHILD_PENDING, X_CONTEXT, X_INDEX, X_GROUP, X_COUNT };
static const char *const replay_slot_names[X_COUNT] = {"template", "child_pending", "context",
                                                       "index", "group"};

static inline PyObject *xslot(Encoder *e, PyObject *record, int which) {
    return *(PyObject **)((char *)record + e->replay_offsets[which]);
}

/* Seeds the span-id generator once per process (a forked child reseeds: called once
 * per replay, as getpid is a system call); a failed getrandom leaves a weaker seed. */
static void seed_span_ids(Encoder *e) {
    long pid = (long)getpid();
    if (e->rng_pid == pid) return;
    if (otel_fi_xoshiro_seed(e->rng) != 0) {
        e->rng[0] = (uint64_t)pid << 32 ^ (uint64_t)(uintptr_t)e ^ (uint64_t)time(NULL);
        e->rng[1] = ~e->rng[0];
        e->rng[2] = e->rng[3] = 0x9E3779B97F4A7C15ULL;
    }
    e->rng_pid = pid;
}

/* A prototype's memo, [proto, template bytes, marks] (keep_template fills the last
 * two on its first child); it holds the prototype, so the address it is found by
 * cannot be reused while it is kept. */
static PyObject *proto_memo(Encoder *e, PyObject *proto) {
    PyObject *key = PyLong_FromVoidPtr(proto);
    if (key == NULL) return NULL;
    PyObject *memo = PyDict_GetItemWithError(e->memos, key);
    if (memo == NULL && !PyErr_Occurred()) {
        memo = Py_BuildValue("[OOO]", proto, Py_None, Py_None);
        if (PyDict_GET_SIZE(e->memos) > 8192) PyDict_Clear(e->memos); /* many captures */
        if (memo != NULL && PyDict_SetItem(e->memos, key, memo) < 0) Py_CLEAR(memo);
        Py_XDECREF(memo); /* the dict holds it */
    }
    Py_DECREF(key);
    return memo;
}

/* What every child of one replay repeats, encoded once per replay (in e->rconst): the
 * trace and parent ids, the replay's start and end, and the index region of a child
 * the GPU did not place (index and time source, after another attribute). */
typedef struct {
    const unsigned char *p;
    size_t at[5], len[5];
} RConst;
enum { RC_TRACE, RC_PARENT, RC_START, RC_END, RC_INDEX };

static int time_source(Encoder *e, Buf *b, int placed, int *first);

/* A span time where a template marks it: JSON's quoted decimal, protobuf's fixed64. */
static int put_time(Buf *b, int js, uint64_t v) {
    if (js) return js_u64(b, v, 1);
    unsigned char x[8];
    for (int i = 0; i < 8; ++i) x[i] = (unsigned char)(v >> (8 * i));
    return put(b, x, 8);
}

static int rconst_build(Encoder *e, RConst *rc, const unsigned char *trace,
                        const unsigned char *parent, uint64_t start, uint64_t end,
                        long long index) {
    Buf *c = &e->rconst;
    int js = e->fmt == FMT_JSON, first = 0;
    c->len = 0;
    for (int k = 0; k < 5; ++k) {
        rc->at[k] = c->len;
        int r = 0;
        switch (k) {
        case RC_TRACE: r = js ? js_hex(c, trace, 16) : put(c, trace, 16); break;
        case RC_PARENT: r = js ? js_hex(c, parent, 8) : put(c, parent, 8); break;
        case RC_START: r = put_time(c, js, start); break;
        case RC_END: r = put_time(c, js, end); break;
        case RC_INDEX:
            r = kv_c(e, c, 9, "flashinfer.cuda_graph.replay", 'i', NULL, 0, index, 0, &first);
            if (r >= 0) r = time_source(e, c, 0, &first);
            break;
        }
        if (r < 0) return -1;
        rc->len[k] = c->len - rc->at[k];
    }
    rc->p = c->p;
    return 0;
}

#define PUT_RC(b, rc, k) put((b), (rc)->p + (rc)->at[k], (rc)->len[k])

/* A child from its prototype's byte template (``tpl``, regions in ``mk`` relative to
 * its start): the bytes between the regions are copied, the regions rewritten with
 * this child's ids, times, replay index and statistics (``consts``: what the replay's
 * children share).  A few copies and no Python object per child. */
static int emit_child(Encoder *e, const unsigned char *tpl, const Marks *mk,
                      const RConst *consts, const unsigned char *span, uint64_t start,
                      uint64_t end, long long index, long long gpu_ns, int placed,
                      const RawView *views, int nviews, const char *dropped) {
    Buf *b = &e->spans;
    int js = e->fmt == FMT_JSON;
    size_t mark = 0, at = 0;
    if (js ? (e->count && put_c(b, ',') < 0) : pb_open(b, 2, &mark) < 0) return -1;
    int nonfinite = 0;
    Py_ssize_t total = views_rows(views, nviews, &nonfinite);
    for (int k = 0; k < M_COUNT; ++k) {
        if (put(b, tpl + at, mk->at[k] - at) < 0) return -1;
        at = mk->to[k];
        int rc = 0, first;
        switch (k) {
        case M_TRACE: rc = PUT_RC(b, consts, RC_TRACE); break;
        case M_SPAN: rc = js ? js_hex(b, span, 8) : put(b, span, 8); break;
        case M_PARENT: rc = PUT_RC(b, consts, RC_PARENT); break;
        case M_START:
        case M_END: {
            rc = placed ? put_time(b, js, k == M_START ? start : end)
                        : PUT_RC(b, consts, k == M_START ? RC_START : RC_END);
            break;
        }
        case M_INDEX:
            first = mk->index_first;
            if (!placed && gpu_ns < 0 && !first) {
                rc = PUT_RC(b, consts, RC_INDEX);
                first = 0;
            } else {
                rc = kv_c(e, b, 9, "flashinfer.cuda_graph.replay", 'i', NULL, 0, index, 0,
                          &first);
                if (rc >= 0) rc = time_source(e, b, placed, &first);
            }
            if (rc >= 0 && dropped) /* DROPPED_ATTR, where Python's dict has it */
                rc = kv_c(e, b, 9, "flashinfer.stats.dropped", 's', dropped,
                          (Py_ssize_t)strlen(dropped), 0, 0, &first);
            if (rc >= 0 && gpu_ns >= 0) /* the key of e->k_gpu_time, as C: no Python here */
                rc = kv_c(e, b, 9, "flashinfer.gpu.time_ns", 'i', NULL, 0, gpu_ns, 0, &first);
            break;
        case M_NONFINITE:
            first = 0; /* the index comes before it */
            rc = nonfinite ? kv_c(e, b, 9, "flashinfer.nonfinite", 'b', NULL, 0, 1, 0, &first)
                           : 0;
            break;
        case M_EVENTS: {
            if (total == 0) break;
            Py_ssize_t dropped = total > e->max_events ? total - e->max_events : 0;
            Py_ssize_t emitted = 0, limit = total - dropped;
            int first_event = 1;
            if (js && PUT_LIT(b, ",\"events\":[") < 0) return -1;
            for (int i = 0; i < nviews && emitted < limit; ++i)
                if (raw_events(e, b, &views[i], limit, &first_event, &emitted) < 0) return -1;
            if (js && put_c(b, ']') < 0) return -1;
            if (dropped && (js ? (PUT_LIT(b, ",\"droppedEventsCount\":") < 0 ||
                                  js_u64(b, (uint64_t)dropped, 0) < 0)
                               : (pb_tag(b, 12, 0) < 0 || pb_varint(b, (uint64_t)dropped) < 0)))
                return -1;
            break;
        }
        }
        if (rc < 0) return -1;
    }
    if (put(b, tpl + at, mk->end - at) < 0) return -1;
    if (!js && pb_close(b, mark) < 0) return -1;
    e->count++;
    e->encoded++;
    return 0;
}

/* After a prototype's first child was written with ``mk`` (absolute positions): keep
 * its bytes and regions as the prototype's template, where they can serve every later
 * child (no attribute dropped, room for the per-child ones, regions in order). */
static void keep_template(Encoder *e, PyObject *memo, Marks *mk) {
    /* room for the per-child attributes: nonfinite, and a GPU time the first had not */
    if (mk->dropped || mk->written + 2 > e->max_attributes) return;
    size_t last = mk->base;
    for (int k = 0; k < M_COUNT; ++k) {
        if (mk->at[k] < last || mk->to[k] < mk->at[k]) return;
        last = mk->to[k];
    }
    /* protobuf: closing the span moved its body past a longer length varint */
    size_t shift = e->fmt == FMT_PROTOBUF ? (size_t)varint_size(mk->end - mk->base) - 1 : 0;
    if (mk->end < last || mk->end + shift > e->spans.len) return;
    PyObject *tpl = PyBytes_FromStringAndSize((const char *)e->spans.p + mk->base + shift,
                                              (Py_ssize_t)(mk->end - mk->base));
    Marks rel = *mk;
    for (int k = 0; k < M_COUNT; ++k) rel.at[k] -= mk->base, rel.to[k] -= mk->base;
    rel.end -= mk->base;
    rel.base = 0;
    PyObject *marks = tpl ? PyBytes_FromStringAndSize((const char *)&rel, sizeof rel) : NULL;
    if (marks == NULL) {
        Py_XDECREF(tpl);
        PyErr_Clear(); /* no template: later children take the general path */
        return;
    }
    PyList_SetItem(memo, 1, tpl);
    PyList_SetItem(memo, 2, marks);
}

/* Where child ``i`` of a replay goes: its statistics (if resolved), its GPU time, and
 * its times, placed on the GPU timeline from the replay's host start (its first launch)
 * when its launches stamped it, else the replay's own. */
typedef struct {
    const RawView *views;
    int nviews, placed;
    long long gpu_ns;
    uint64_t start, end;
    const char *dropped; /* why it has no statistics: its group's replay was dropped */
} ChildAt;

static ChildAt child_at(const Resolved *res, const char *has, Py_ssize_t i, uint64_t start_ns,
                        uint64_t end_ns) {
    ChildAt c = {NULL, 0, 0, -1, start_ns, end_ns, NULL};
    if (has == NULL || !has[i]) return c;
    if (has[i] == 3) {
        c.dropped = res[i].dropped;
        return c;
    }
    c.views = res[i].views;
    c.nviews = res[i].nviews;
    c.gpu_ns = res[i].gpu_ns;
    long long offset = res[i].offset_ns;
    c.placed = offset >= 0 && c.gpu_ns >= 0;
    if (c.placed) {
        c.start = start_ns + (uint64_t)offset;
        c.end = c.start + (uint64_t)c.gpu_ns;
    }
    return c;
}

static inline void span_id_bytes(uint64_t id, unsigned char out[8]) {
    for (int k = 0; k < 8; ++k) out[k] = (unsigned char)(id >> (56 - 8 * k));
}

/* Every child of a replay from its prototype's template, written with the GIL released
 * (the replaying thread and the sender go on meanwhile): ids, times and statistics
 * events are C values by then, each row's meta read first and the batch grown to a
 * bound of what the children can take.  ``*done`` 0 when a prototype has no template
 * yet (the caller writes them one by one, with the GIL).  -1 on failure. */
static int emit_templated(Encoder *e, PyObject *template, Py_ssize_t n, Resolved *res,
                          const char *has, const RConst *consts, uint64_t start_ns,
                          uint64_t end_ns, long long index, int *done) {
    *done = 0;
    PyObject **memos = PyMem_Calloc((size_t)n, sizeof *memos);
    if (memos == NULL) return 0; /* the slow way then */
    int rc = 0, all = 1;
    Py_ssize_t rows = 0;
    size_t bound = 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject *memo = proto_memo(e, PyTuple_GET_ITEM(template, i));
        if (memo == NULL) {
            rc = -1;
            break;
        }
        Py_INCREF(memo); /* a later proto_memo may clear the dict of many captures */
        memos[i] = memo;
        PyObject *tpl = PyList_GET_ITEM(memo, 1);
        if (tpl == Py_None) {
            all = 0;
            break;
        }
        bound += (size_t)PyBytes_GET_SIZE(tpl) + 512;
        for (int j = 0; has && has[i] && j < res[i].nviews; ++j) rows += res[i].views[j].nrows;
    }
    MetaC *mc = NULL;
    Py_ssize_t read = 0;
    if (rc == 0 && all && rows) {
        mc = PyMem_Calloc((size_t)rows, sizeof *mc);
        if (mc == NULL) all = 0;
        for (Py_ssize_t i = 0; mc && rc == 0 && i < n; ++i)
            for (int j = 0; has && has[i] && rc == 0 && j < res[i].nviews; ++j) {
                RawView *v = &res[i].views[j];
                if (metas_read(v, v->nrows, mc + read) < 0) {
                    rc = -1;
                    break;
                }
                v->mc = mc + read;
                for (Py_ssize_t k = 0; k < v->nrows; ++k)
                    bound += 1024 + 6 * (size_t)(mc[read + k].nlen + mc[read + k].slen);
                read += v->nrows;
            }
    }
    if (rc == 0 && all && buf_grow(&e->spans, bound) < 0) rc = -1;
    if (rc == 0 && all) {
        const unsigned char **tpls = PyMem_Malloc((size_t)n * sizeof *tpls);
        const Marks **marks = PyMem_Malloc((size_t)n * sizeof *marks);
        uint64_t *ids = PyMem_Malloc((size_t)n * sizeof *ids);
        if (tpls == NULL || marks == NULL || ids == NULL) {
            all = 0; /* nothing written yet: the slow way */
        } else {
            for (Py_ssize_t i = 0; i < n; ++i) {
                tpls[i] = (const unsigned char *)PyBytes_AS_STRING(PyList_GET_ITEM(memos[i], 1));
                marks[i] = (const Marks *)PyBytes_AS_STRING(PyList_GET_ITEM(memos[i], 2));
                ids[i] = otel_fi_xoshiro_next(e->rng);
            }
            buf_nogil = 1;
            buf_oom = 0;
            Py_BEGIN_ALLOW_THREADS
            for (Py_ssize_t i = 0; rc == 0 && i < n; ++i) {
                ChildAt c = child_at(res, has, i, start_ns, end_ns);
                unsigned char span_b[8];
                span_id_bytes(ids[i], span_b);
                rc = emit_child(e, tpls[i], marks[i], consts, span_b, c.start, c.end, index,
                                c.gpu_ns, c.placed, c.views, c.nviews, c.dropped);
                e->templated += rc == 0;
            }
            Py_END_ALLOW_THREADS
            buf_nogil = 0;
            if (rc < 0) {
                if (buf_oom)
                    PyErr_NoMemory();
                else
                    PyErr_SetString(PyExc_RuntimeError, "a templated child could not be written");
            }
            *done = 1;
        }
        PyMem_Free(tpls);
        PyMem_Free(marks);
        PyMem_Free(ids);
    }
    if (mc != NULL) {
        metas_free(mc, read);
        PyMem_Free(mc);
    }
    for (Py_ssize_t i = 0; i < n; ++i) /* freed above: no view keeps them */
        for (int j = 0; has && has[i] && j < res[i].nviews; ++j) res[i].views[j].mc = NULL;
    for (Py_ssize_t i = 0; i < n; ++i) Py_XDECREF(memos[i]);
    PyMem_Free(memos);
    return rc;
}

/* RESOLVED: the replay and every child written; NOT_YET: a child's statistics are not
 * in; TO_PYTHON: Python expands it (no exception set).  -2: an encoding failure, the
 * batch left as it was (the exception cleared; Python encodes it again and reports). */
/* A replay's GPU time, written into its (encoded) record's attributes as Python's path
 * writes it there before encoding: ``REPLAY_EVERY=auto`` reads it back (graphs.py) to
 * learn how long a replay keeps the GPU busy.  Best effort: a failure only leaves the
 * sampler without this sample. */
static void note_replay_time(Encoder *e, PyObject *record, long long gpu_ns) {
    PyObject *attributes = slot(e, record, R_ATTRIBUTES);
    if (attributes == NULL || !PyDict_CheckExact(attributes)) return;
    PyObject *value = PyLong_FromLongLong(gpu_ns);
    if (value == NULL || PyDict_SetItem(attributes, e->k_gpu_time, value) < 0) PyErr_Clear();
    Py_XDECREF(value);
}

/* Why a replay whose statistics were dropped has no GPU time (when nothing else timed
 * it), into its attributes as Python's path writes it there (graph_rows.DroppedTime).
 * -1 with an exception set. */
static int note_replay_dropped(Encoder *e, PyObject *record) {
    static PyObject *key, *why;
    if (key == NULL && (key = PyUnicode_InternFromString("flashinfer.gpu.time_unavailable")) == NULL)
        return -1;
    if (why == NULL && (why = PyUnicode_InternFromString("stats_dropped")) == NULL) return -1;
    PyObject *attributes = slot(e, record, R_ATTRIBUTES);
    if (attributes == NULL || !PyDict_CheckExact(attributes)) {
        PyErr_SetString(PyExc_TypeError, "a replay's attributes are not a dict");
        return -1;
    }
    return PyDict_SetItem(attributes, key, why);
}

static int encode_replay(Encoder *e, PyObject *record, long long gpu_ns) {
    PyObject *template = xslot(e, record, X_TEMPLATE);
    PyObject *pend = xslot(e, record, X_CHILD_PENDING);
    PyObject *context = xslot(e, record, X_CONTEXT);
    PyObject *index_obj = xslot(e, record, X_INDEX);
    PyObject *groups = xslot(e, record, X_GROUP);
    if (template == NULL || !PyTuple_CheckExact(template) || context == NULL ||
        !PyTuple_Check(context) || PyTuple_GET_SIZE(context) < 5 || index_obj == NULL ||
        !PyLong_CheckExact(index_obj))
        return TO_PYTHON;
    Py_ssize_t n = PyTuple_GET_SIZE(template);
    if (pend == NULL || (pend != Py_None && (!PyList_CheckExact(pend) ||
                                            PyList_GET_SIZE(pend) != n)))
        return TO_PYTHON;
    if (groups == NULL || (groups != Py_None && !PyList_CheckExact(groups))) return TO_PYTHON;
    long long index = PyLong_AsLongLong(index_obj);
    if (index < 0) {
        PyErr_Clear();
        return TO_PYTHON;
    }
    for (Py_ssize_t i = 0; i < n; ++i)
        if (!PyObject_TypeCheck(PyTuple_GET_ITEM(template, i), (PyTypeObject *)e->record_type) ||
            Py_TYPE(PyTuple_GET_ITEM(template, i)) == e->replay_type)
            return TO_PYTHON;
    Resolved *res = NULL;
    char *has = NULL; /* per child: 1 its own StatsPending, 2 a group's rows, 3 dropped */
    long long stamped_ns = -1; /* the replay's GPU time from a stamped group */
    int replay_dropped = 0;    /* ... or a stamped group's statistics were dropped */
    if ((pend != Py_None || groups != Py_None) && n > 0) {
        res = PyMem_Calloc((size_t)n, sizeof *res);
        has = PyMem_Calloc((size_t)n, 1);
        if (res == NULL || has == NULL) {
            PyMem_Free(res);
            PyMem_Free(has);
            return TO_PYTHON;
        }
        for (Py_ssize_t i = 0; pend != Py_None && i < n; ++i) {
            PyObject *list = PyList_GET_ITEM(pend, i);
            if (list == Py_None) continue;
            int rc = PyList_CheckExact(list) && PyList_GET_SIZE(list) == 1
                         ? resolve_one(PyList_GET_ITEM(list, 0), &res[i]) : TO_PYTHON;
            if (rc != RESOLVED) {
                PyMem_Free(res);
                PyMem_Free(has);
                return rc;
            }
            has[i] = 1;
        }
        for (Py_ssize_t k = 0; groups != Py_None && k < PyList_GET_SIZE(groups); ++k) {
            int rc = resolve_group(PyList_GET_ITEM(groups, k), n, res, has, &stamped_ns,
                                   &replay_dropped);
            if (rc != RESOLVED) {
                PyMem_Free(res);
                PyMem_Free(has);
                return rc;
            }
        }
    }
    if (gpu_ns < 0 && stamped_ns < 0 && replay_dropped && note_replay_dropped(e, record) < 0) {
        PyErr_Clear();
        PyMem_Free(res);
        PyMem_Free(has);
        return TO_PYTHON;
    }
    if (gpu_ns < 0 && stamped_ns >= 0) gpu_ns = stamped_ns; /* no event pair: the stamps */
    else stamped_ns = -1;
    Buf *b = &e->spans;
    size_t len0 = b->len;
    Py_ssize_t count0 = e->count;
    unsigned long long encoded0 = e->encoded, templated0 = e->templated;
    seed_span_ids(e);
    int rc = encode_record(e, record, gpu_ns, NULL, 0, -1, 0, NULL, NULL);
    PyObject *trace = slot(e, record, R_TRACE_ID), *start = slot(e, record, R_START_NS);
    PyObject *end = slot(e, record, R_END_NS);
    unsigned char trace_b[16], parent_b[8];
    uint64_t start_ns = 0, end_ns = 0;
    RConst consts;
    if (rc == 0 && (as_bytes(trace, trace_b, 16) < 0 || id64(PyTuple_GET_ITEM(context, 1), parent_b) < 0 ||
                    as_u64(start, &start_ns) < 0 || as_u64(end, &end_ns) < 0 ||
                    rconst_build(e, &consts, trace_b, parent_b, start_ns, end_ns, index) < 0))
        rc = -1;
    int done = 0;
    if (rc == 0 && n > 0) {
        rc = emit_templated(e, template, n, res, has, &consts, start_ns, end_ns, index, &done);
    }
    for (Py_ssize_t i = 0; rc == 0 && !done && i < n; ++i) {
        PyObject *proto = PyTuple_GET_ITEM(template, i);
        PyObject *memo = proto_memo(e, proto);
        if (memo == NULL) {
            rc = -1;
            break;
        }
        ChildAt c = child_at(res, has, i, start_ns, end_ns);
        uint64_t id = otel_fi_xoshiro_next(e->rng);
        PyObject *tpl = PyList_GET_ITEM(memo, 1), *marks = PyList_GET_ITEM(memo, 2);
        if (tpl != Py_None) { /* every child after a prototype's first */
            unsigned char span_b[8];
            span_id_bytes(id, span_b);
            rc = emit_child(e, (const unsigned char *)PyBytes_AS_STRING(tpl),
                            (const Marks *)PyBytes_AS_STRING(marks), &consts, span_b, c.start,
                            c.end, index, c.gpu_ns, c.placed, c.views, c.nviews, c.dropped);
            e->templated += rc == 0;
            continue;
        }
        PyObject *span_id = PyLong_FromUnsignedLongLong(id);
        if (span_id == NULL) {
            rc = -1;
            break;
        }
        /* the prototype is the worker's alone (under the encoder lock): its ids and
         * times are this child's while it is written */
        slot_set(e, proto, R_TRACE_ID, trace);
        slot_set(e, proto, R_SPAN_ID, span_id);
        Py_DECREF(span_id);
        slot_set(e, proto, R_PARENT, context);
        if (c.placed) {
            PyObject *s_obj = PyLong_FromUnsignedLongLong(c.start);
            PyObject *e_obj = s_obj ? PyLong_FromUnsignedLongLong(c.end) : NULL;
            if (e_obj == NULL) {
                Py_XDECREF(s_obj);
                rc = -1;
                break;
            }
            slot_set(e, proto, R_START_NS, s_obj);
            slot_set(e, proto, R_END_NS, e_obj);
            Py_DECREF(s_obj);
            Py_DECREF(e_obj);
        } else {
            slot_set(e, proto, R_START_NS, start);
            slot_set(e, proto, R_END_NS, end);
        }
        Marks mk;
        memset(&mk, 0, sizeof mk);
        rc = encode_record(e, proto, c.gpu_ns, c.views, c.nviews, index, c.placed, c.dropped,
                           &mk);
        if (rc == 0 && slot(e, proto, R_ERROR) == Py_None) keep_template(e, memo, &mk);
    }
    if (rc < 0) {
        PyErr_Clear();
        b->len = len0; /* the batch keeps only whole replays */
        e->count = count0;
        e->encoded = encoded0;
        e->templated = templated0; /* Python writes these children again */
        PyMem_Free(res);
        PyMem_Free(has);
        return -2;
    }
    for (Py_ssize_t i = 0; has != NULL && i < n; ++i) {
        if (!has[i] || has[i] == 3) continue; /* 3: dropped, counted when it was */
        if (has[i] == 1) slot_back(&res[i]);
        e->stats_resolved++;
    }
    for (Py_ssize_t k = 0; groups != Py_None && k < PyList_GET_SIZE(groups); ++k)
        group_back(PyList_GET_ITEM(groups, k));
    PyMem_Free(res);
    PyMem_Free(has);
    slot_set(e, record, R_PENDING, e->empty);
    *(PyObject **)((char *)record + e->replay_offsets[X_TEMPLATE]) = Py_None;
    Py_INCREF(Py_None);
    Py_DECREF(template);
    Py_SETREF(*(PyObject **)((char *)record + e->replay_offsets[X_CHILD_PENDING]),
              (Py_INCREF(Py_None), Py_None));
    Py_SETREF(*(PyObject **)((char *)record + e->replay_offsets[X_GROUP]),
              (Py_INCREF(Py_None), Py_None));
    e->replays++;
    e->children += (unsigned long long)n;
    if (stamped_ns >= 0) note_replay_time(e, record, stamped_ns);
    return RESOLVED;
}

static PyObject *mod_register_stats(PyObject *self, PyObject *args) {
    PyObject *capsule, *type = NULL, *group = NULL;
    if (!PyArg_ParseTuple(args, "O|O!O!", &capsule, &PyType_Type, &type, &PyType_Type, &group))
        return NULL;
    if (capsule == Py_None) { /* register_stats(None): back to the Python resolver */
        stats_api = NULL;
        Py_CLEAR(stats_pending_type);
        Py_CLEAR(group_pending_type);
        Py_CLEAR(stats_api_capsule);
        Py_RETURN_NONE;
    }
    if (type == NULL) {
        PyErr_SetString(PyExc_TypeError, "register_stats(capsule, StatsPending)");
        return NULL;
    }
    const otel_flashinfer_stats_api *api =
        PyCapsule_GetPointer(capsule, "otel_flashinfer.stats_api");
    if (api == NULL) return NULL;
    if (api->version < 1) {
        PyErr_Format(PyExc_ValueError, "statistics API version %d is too old", api->version);
        return NULL;
    }
    Py_ssize_t offsets[P_COUNT], g_offsets[G_COUNT];
    if (slot_offsets((PyTypeObject *)type, pending_slot_names, P_COUNT, offsets) < 0) return NULL;
    if (group != NULL &&
        slot_offsets((PyTypeObject *)group, group_slot_names, G_COUNT, g_offsets) < 0)
        return NULL;
#define I(field, text) if (field == NULL && (field = PyUnicode_InternFromString(text)) == NULL) return NULL
    I(s_kind, "_kind");
    I(s_native, "_native");
    I(s_base, "_base");
    I(s_slot_bytes, "_slot_bytes");
    I(s_rows, "rows");
    I(s_anchor, "_anchor");
    I(s_release, "release");
    I(s_append, "append");
#undef I
    memcpy(pending_offsets, offsets, sizeof offsets);
    Py_INCREF(type);
    Py_XSETREF(stats_pending_type, (PyTypeObject *)type);
    if (group != NULL) {
        memcpy(group_offsets, g_offsets, sizeof g_offsets);
        Py_INCREF(group);
    }
    Py_XSETREF(group_pending_type, (PyTypeObject *)group); /* none given: none resolved */
    Py_INCREF(capsule); /* the struct lives in the extension's module: keep it */
    Py_XSETREF(stats_api_capsule, capsule);
    stats_api = api;
    Py_RETURN_NONE;
}

/* drain(queue, slow, limit, later=None, now=0.0, deadline=0.0, max_spans=0, max_bytes=0)
 * -> records
 * encoded.  Takes up to ``limit`` records off ``queue`` (a deque) and encodes those that
 * are ready,
 * resolving level-5 statistics and GPU times here where it can (resolve_stats,
 * gpu_time).  Statistics not in yet go back on the deque ``later`` (when given) with
 * their ``deadline`` (set the first time; at ``now`` past it they go to Python, which
 * gives them up).  Everything else with work pending goes to the list ``slow`` for the
 * Python worker.  A record that fails to encode goes to ``slow`` too, so the error is reported
 * there.  The limit matters: callers keep appending while we drain, and the GIL is
 * held throughout, so an unbounded drain would chase them (and hold them off) for as
 * long as they run.  ``max_spans`` (when > 0) stops it once the open batch holds that
 * many spans: a replay record carries a span per captured call, and a batch of queued
 * replays would otherwise make one request of millions of spans (hundreds of MB, over any
 * receiver's limit).  ``max_bytes`` (when > 0) stops it likewise once the open batch
 * holds that many bytes: statistics events make a span kilobytes, and a batch of a few
 * thousand such spans would pass gRPC's 4 MiB message limit.  ``taken`` then says how
 * many records it took. */
static PyObject *enc_drain(Encoder *e, PyObject *args) {
    PyObject *queue, *slow, *later = Py_None;
    Py_ssize_t limit, max_spans = 0, max_bytes = 0;
    double now = 0.0, deadline = 0.0;
    if (!usable(e)) return NULL;
    e->taken = 0;
    if (!PyArg_ParseTuple(args, "OO!n|Oddnn", &queue, &PyList_Type, &slow, &limit, &later,
                          &now, &deadline, &max_spans, &max_bytes))
        return NULL;
    PyObject *popleft = PyObject_GetAttr(queue, e->s_popleft);
    if (popleft == NULL) return NULL;
    PyObject *append_later = NULL;
    if (later != Py_None && s_append != NULL &&
        (append_later = PyObject_GetAttr(later, s_append)) == NULL) {
        Py_DECREF(popleft);
        return NULL;
    }
    e->busy = 1;
    e->busy_thread = PyThread_get_thread_ident();
    Py_ssize_t done = 0, taken = 0;
    PyObject *result = NULL;
    while (taken < limit && (max_spans <= 0 || e->count < max_spans) &&
           (max_bytes <= 0 || e->spans.len < (size_t)max_bytes)) {
        PyObject *record = PyObject_CallNoArgs(popleft);
        if (record == NULL) {
            if (PyErr_ExceptionMatches(PyExc_IndexError)) {
                PyErr_Clear();
                break;
            }
            goto out;
        }
        ++taken;
        int to_python = 0, wait = 0, stats = 0, replay = 0;
        long long gpu_ns = -1, packed = 0;
        Resolved res;
        PyTypeObject *type = Py_TYPE(record);
        if (type != (PyTypeObject *)e->record_type &&
            (type != e->replay_type || e->replay_type == NULL)) {
            to_python = 1; /* a subclass we do not know: Python knows what it carries */
        } else {
            PyObject *pending = slot(e, record, R_PENDING);
            PyObject *gpu = slot(e, record, R_GPU);
            int has_pending = pending != NULL && pending != e->empty &&
                              (!PyList_Check(pending) || PyList_GET_SIZE(pending) > 0);
            replay = type == e->replay_type && xslot(e, record, X_TEMPLATE) != Py_None;
            if (has_pending && replay) {
                to_python = 1; /* the replay's own pending (a GPU time that will not come) */
            } else if (has_pending) {
                int rc = resolve_stats(record, pending, gpu, &res);
                if (rc == RESOLVED && res.offset_ns >= 0 && res.gpu_ns >= 0) {
                    /* a graph's child made as a record (level 10, or a replay Python
                     * expanded): Python places it on the GPU timeline */
                    to_python = 1;
                } else if (rc == RESOLVED) {
                    stats = 1;
                    gpu_ns = res.gpu_ns;
                } else if (rc == NOT_YET && append_later != NULL) {
                    wait = 1;
                } else {
                    to_python = 1;
                }
            } else if (gpu != NULL && gpu != Py_None) {
                gpu_ns = gpu_time(gpu, &packed);
                if (gpu_ns == NOT_READY && append_later != NULL) wait = 1;
                else if (gpu_ns < 0) to_python = 1;
            }
        }
        if (!to_python && !wait) {
            int rc;
            if (replay) {
                rc = encode_replay(e, record, gpu_ns);
                if (rc == NOT_YET && append_later != NULL) wait = 1;
                else if (rc != RESOLVED) to_python = 1;
            } else if (encode_record(e, record, gpu_ns, stats ? res.views : NULL,
                                     stats ? res.nviews : 0, -1, 0, NULL, NULL) < 0) {
                PyErr_Clear(); /* Python's path encodes it again and reports what failed;
                                * the GPU events and statistics are still the record's */
                to_python = 1;
            }
            if (!to_python && !wait) {
                if (stats) {
                    resolved_done(e, record, &res);
                } else if (gpu_ns >= 0) {
                    gpu_release(packed);
                    slot_set(e, record, R_GPU, Py_None);
                    e->gpu_resolved++;
                    /* a replay Python expanded (its template gone) too: ``auto``
                     * learns from every replay whose time comes in */
                    if (type == e->replay_type) note_replay_time(e, record, gpu_ns);
                }
            }
        }
        if (wait) {
            /* Not in yet: back on ``later`` with its deadline (set on first sight), or to
             * Python past it, which gives the statistics up as timed out. */
            PyObject *d = slot(e, record, R_DEADLINE);
            double at = d != NULL && PyFloat_Check(d) ? PyFloat_AS_DOUBLE(d) : 0.0;
            if (at <= 0.0) {
                PyObject *v = PyFloat_FromDouble(deadline);
                if (v == NULL) {
                    Py_DECREF(record);
                    goto out;
                }
                slot_set(e, record, R_DEADLINE, v);
                Py_DECREF(v);
                at = deadline;
            }
            if (now >= at) {
                to_python = 1;
            } else {
                PyObject *ok = PyObject_CallOneArg(append_later, record);
                Py_DECREF(record);
                if (ok == NULL) goto out;
                Py_DECREF(ok);
                continue;
            }
        }
        if (to_python) {
            if (PyList_Append(slow, record) < 0) {
                Py_DECREF(record);
                goto out;
            }
        } else {
            ++done;
        }
        Py_DECREF(record);
    }
    result = PyLong_FromSsize_t(done);
out:
    e->taken = taken;
    e->busy = 0;
    Py_DECREF(popleft);
    Py_XDECREF(append_later);
    return result;
}

/* take() -> bytes or None: the spans encoded since the last take as one request
 * (protobuf ExportTraceServiceRequest, or one OTLP/JSON line with its newline). */
static PyObject *enc_take(Encoder *e, PyObject *unused) {
    if (!usable(e)) return NULL;
    if (e->count == 0) Py_RETURN_NONE;
    Buf *s = &e->spans;
    size_t total;
    const char *rs_schema = NULL, *ss_schema = NULL;
    Py_ssize_t rs_len = 0, ss_len = 0;
    if (e->resource_schema != NULL) rs_schema = PyUnicode_AsUTF8AndSize(e->resource_schema, &rs_len);
    if (e->scope_schema != NULL) ss_schema = PyUnicode_AsUTF8AndSize(e->scope_schema, &ss_len);
    if (PyErr_Occurred()) return NULL;
    PyObject *out;
    if (e->fmt == FMT_PROTOBUF) {
        /* request{1: resource_spans{1: resource, 2: scope_spans{1: scope, 2: spans,
         * 3: schema}, 3: schema}} */
        size_t scope_field = 1 + varint_size(e->scope.len) + e->scope.len;
        size_t ss_schema_field = ss_len ? 1 + varint_size((uint64_t)ss_len) + (size_t)ss_len : 0;
        size_t ss_body = scope_field + s->len + ss_schema_field;
        size_t res_field = 1 + varint_size(e->resource.len) + e->resource.len;
        size_t rs_schema_field = rs_len ? 1 + varint_size((uint64_t)rs_len) + (size_t)rs_len : 0;
        size_t rs_body = res_field + 1 + varint_size(ss_body) + ss_body + rs_schema_field;
        total = 1 + varint_size(rs_body) + rs_body;
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
        if (out == NULL) return NULL;
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
        /* the heads are small: build them in a stack buffer, then copy */
        Py_BEGIN_ALLOW_THREADS
#define VAR(x)                                          \
    do {                                                \
        uint64_t v_ = (x);                              \
        while (v_ >= 0x80) {                            \
            *p++ = (unsigned char)(v_ | 0x80);          \
            v_ >>= 7;                                   \
        }                                               \
        *p++ = (unsigned char)v_;                       \
    } while (0)
        *p++ = 0x0a;
        VAR(rs_body);
        *p++ = 0x0a;
        VAR(e->resource.len);
        memcpy(p, e->resource.p, e->resource.len);
        p += e->resource.len;
        *p++ = 0x12;
        VAR(ss_body);
        *p++ = 0x0a;
        VAR(e->scope.len);
        memcpy(p, e->scope.p, e->scope.len);
        p += e->scope.len;
        memcpy(p, s->p, s->len);
        p += s->len;
        if (ss_len) {
            *p++ = 0x1a;
            VAR((uint64_t)ss_len);
            memcpy(p, ss_schema, (size_t)ss_len);
            p += ss_len;
        }
        if (rs_len) {
            *p++ = 0x1a;
            VAR((uint64_t)rs_len);
            memcpy(p, rs_schema, (size_t)rs_len);
            p += rs_len;
        }
#undef VAR
        Py_END_ALLOW_THREADS
    } else {
        Buf tail = {0};
        if (ss_len && (PUT_LIT(&tail, ",\"schemaUrl\":") < 0 || js_str(&tail, ss_schema, ss_len) < 0))
            goto json_fail;
        if (PUT_LIT(&tail, "}]") < 0) goto json_fail;
        if (rs_len && (PUT_LIT(&tail, ",\"schemaUrl\":") < 0 || js_str(&tail, rs_schema, rs_len) < 0))
            goto json_fail;
        if (PUT_LIT(&tail, "}]}\n") < 0) goto json_fail;
        static const char a[] = "{\"resourceSpans\":[{\"resource\":";
        static const char c[] = ",\"scopeSpans\":[{\"scope\":";
        static const char d[] = ",\"spans\":[";
        static const char f[] = "]";
        total = sizeof a - 1 + e->resource.len + sizeof c - 1 + e->scope.len + sizeof d - 1 +
                s->len + sizeof f - 1 + tail.len;
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
        if (out == NULL) {
            buf_free(&tail);
            return NULL;
        }
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS
#define CP(src, n)              \
    do {                        \
        memcpy(p, (src), (n));  \
        p += (n);               \
    } while (0)
        CP(a, sizeof a - 1);
        CP(e->resource.p, e->resource.len);
        CP(c, sizeof c - 1);
        CP(e->scope.p, e->scope.len);
        CP(d, sizeof d - 1);
        CP(s->p, s->len);
        CP(f, sizeof f - 1);
        CP(tail.p, tail.len);
#undef CP
        Py_END_ALLOW_THREADS
        buf_free(&tail);
        goto done;
    json_fail:
        buf_free(&tail);
        return NULL;
    }
done:
    s->len = 0;
    e->count = 0;
    if (s->cap > (1u << 24)) buf_free(s); /* one huge batch must not pin its memory */
    return out;
}

static PyObject *enc_set_extra(Encoder *e, PyObject *extra) {
    if (!usable(e)) return NULL;
    if (extra != Py_None && !PyDict_Check(extra)) {
        PyErr_SetString(PyExc_TypeError, "set_extra() takes a dict or None");
        return NULL;
    }
    Py_CLEAR(e->extra_block);
    Py_CLEAR(e->extra);
    e->extra_count = 0;
    if (e->memos != NULL) PyDict_Clear(e->memos); /* the byte templates hold the old ones */
    if (extra != Py_None && PyDict_GET_SIZE(extra)) {
        Py_ssize_t n;
        PyObject *block = encode_block(e, extra, &n);
        if (block == NULL) return NULL;
        e->extra_block = block;
        e->extra_count = n;
        Py_INCREF(extra);
        e->extra = extra;
    }
    e->pid = (long)getpid();
    instance_forget(e);
    Py_RETURN_NONE;
}

static PyObject *enc_reset(Encoder *e, PyObject *unused) {
    /* after fork: the parent's half batch is not ours to send (a fork from another
     * thread can copy us mid-span: the child starts clean).  Never under a span still
     * being written in this process (a callback of the encoder's own): its offsets
     * would point past the emptied batch. */
    if (e->busy && (e->pid == (long)getpid() ||
                    e->busy_thread == PyThread_get_thread_ident())) {
        PyErr_SetString(PyExc_RuntimeError, "Encoder re-entered while encoding a span");
        return NULL;
    }
    e->busy = 0;
    e->spans.len = 0;
    e->count = 0;
    e->pid = (long)getpid();
    instance_forget(e);
    Py_RETURN_NONE;
}

static PyObject *enc_stats(Encoder *e, PyObject *unused) {
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsn}", "encoded", e->encoded, "failed", e->failed,
                         "attribute_errors", e->attr_errors, "gpu_resolved", e->gpu_resolved,
                         "stats_resolved", e->stats_resolved, "replays", e->replays,
                         "replay_children", e->children, "replay_templated", e->templated,
                         "describe_errors", e->describe_errors, "batched", e->count);
}

static PyMethodDef enc_methods[] = {
    {"add", (PyCFunction)enc_add, METH_O, "encode one CallRecord into the open batch"},
    {"drain", (PyCFunction)enc_drain, METH_VARARGS,
     "drain(queue, slow, limit, later=None, now=0.0, deadline=0.0, max_spans=0, max_bytes=0): "
     "encode up to limit "
     "ready records of a deque; statistics not in yet go back on later until deadline, "
     "the rest to slow"},
    {"take", (PyCFunction)enc_take, METH_NOARGS, "the open batch as one request, or None"},
    {"set_extra", (PyCFunction)enc_set_extra, METH_O, "attributes every span gets (dict|None)"},
    {"reset", (PyCFunction)enc_reset, METH_NOARGS, "forget the open batch (after fork)"},
    {"stats", (PyCFunction)enc_stats, METH_NOARGS, "counters"},
    {NULL, NULL, 0, NULL}};

static PyObject *enc_count(Encoder *e, void *closure) { return PyLong_FromSsize_t(e->count); }

static PyObject *enc_taken(Encoder *e, void *closure) { return PyLong_FromSsize_t(e->taken); }

static PyObject *enc_size(Encoder *e, void *closure) {
    return PyLong_FromSize_t(e->spans.len);
}

static PyGetSetDef enc_getset[] = {
    {"count", (getter)enc_count, NULL, "spans in the open batch", NULL},
    {"size", (getter)enc_size, NULL, "bytes of the open batch", NULL},
    {"taken", (getter)enc_taken, NULL, "records the last drain took off its queue", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static int buf_set(Buf *b, PyObject *bytes) {
    char *s;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(bytes, &s, &n) < 0) return -1;
    b->len = 0;
    return put(b, s, (size_t)n);
}

static int enc_init(Encoder *e, PyObject *args, PyObject *kwargs) {
    static char *kw[] = {"fmt", "record_type", "empty", "default_trace_state", "state_header",
                         "resource", "scope", "resource_schema", "scope_schema",
                         "max_attributes", "max_events", "max_links", "raw_stats", NULL};
    const char *fmt;
    PyObject *record_type, *empty, *default_state, *state_header, *resource, *scope, *rs, *ss;
    Py_ssize_t max_attributes = 128, max_events = 128, max_links = 128;
    PyObject *raw_stats = Py_None;
    if (e->busy) { /* from a callback of its own: the span being written uses its state */
        PyErr_SetString(PyExc_RuntimeError, "Encoder re-entered while encoding a span");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sO!OOOSSUU|nnnO", kw, &fmt, &PyType_Type,
                                     &record_type, &empty, &default_state, &state_header,
                                     &resource, &scope, &rs, &ss, &max_attributes, &max_events,
                                     &max_links, &raw_stats))
        return -1;
    if (raw_stats != Py_None && !PyType_Check(raw_stats)) {
        PyErr_SetString(PyExc_TypeError, "raw_stats must be a type or None");
        return -1;
    }
    if (strcmp(fmt, "protobuf") == 0) e->fmt = FMT_PROTOBUF;
    else if (strcmp(fmt, "json") == 0) e->fmt = FMT_JSON;
    else {
        PyErr_Format(PyExc_ValueError, "fmt must be 'protobuf' or 'json', not %R",
                     PyTuple_GET_ITEM(args, 0));
        return -1;
    }
    if (slot_offsets((PyTypeObject *)record_type, record_slot_names, R_COUNT, e->offsets) < 0)
        return -1;
    /* pipeline.ReplayRecord, named on the record type: its extra slots' offsets */
    PyObject *replay = PyObject_GetAttrString(record_type, "replay_type");
    if (replay == NULL) {
        PyErr_Clear();
    } else if (!PyType_Check(replay) ||
               !PyType_IsSubtype((PyTypeObject *)replay, (PyTypeObject *)record_type) ||
               slot_offsets((PyTypeObject *)replay, replay_slot_names, X_COUNT,
                            e->replay_offsets) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "record_type.replay_type is not a subtype of it");
        Py_DECREF(replay);
        return -1;
    } else {
        Py_XSETREF(e->replay_type, (PyTypeObject *)replay);
    }
    if (buf_set(&e->resource, resource) < 0 || buf_set(&e->scope, scope) < 0) return -1;
    Py_INCREF(record_type);
    Py_XSETREF(e->record_type, record_type);
    Py_INCREF(empty);
    Py_XSETREF(e->empty, empty);
    Py_INCREF(default_state);
    Py_XSETREF(e->default_state, default_state);
    Py_INCREF(state_header);
    Py_XSETREF(e->state_header, state_header);
    Py_INCREF(rs);
    Py_XSETREF(e->resource_schema, rs);
    Py_INCREF(ss);
    Py_XSETREF(e->scope_schema, ss);
    Py_XINCREF(raw_stats == Py_None ? NULL : raw_stats);
    Py_XSETREF(e->raw_stats, raw_stats == Py_None ? NULL : (PyTypeObject *)raw_stats);
    Py_XSETREF(e->blocks, PyDict_New());
    Py_XSETREF(e->described, PyDict_New());
    Py_XSETREF(e->memos, PyDict_New());
#define I(field, text) Py_XSETREF(e->field, PyUnicode_InternFromString(text))
    I(s_attributes, "attributes");
    I(s_popleft, "popleft");
    I(s_context, "context");
    I(s_attrs, "attributes");
    I(k_instance, "flashinfer.instance.id");
    I(k_gpu_time, "flashinfer.gpu.time_ns");
    I(k_cuda_error, "flashinfer.cuda_error");
    I(k_nonfinite, "flashinfer.nonfinite");
    I(k_replay_index, "flashinfer.cuda_graph.replay");
#undef I
    if (PyErr_Occurred()) return -1;
    e->max_attributes = max_attributes < 0 ? PY_SSIZE_T_MAX : max_attributes;
    e->max_events = max_events < 0 ? PY_SSIZE_T_MAX : max_events;
    e->max_links = max_links < 0 ? PY_SSIZE_T_MAX : max_links;
    e->pid = (long)getpid();
    return 0;
}

static int enc_traverse(Encoder *e, visitproc visit, void *arg) {
    Py_VISIT(e->record_type);
    Py_VISIT(e->empty);
    Py_VISIT(e->default_state);
    Py_VISIT(e->state_header);
    Py_VISIT(e->blocks);
    Py_VISIT(e->described);
    Py_VISIT(e->memos);
    Py_VISIT(e->extra);
    Py_VISIT(e->raw_stats);
    Py_VISIT(e->replay_type);
    return 0;
}

static int enc_clear(Encoder *e) {
    Py_CLEAR(e->record_type);
    Py_CLEAR(e->empty);
    Py_CLEAR(e->default_state);
    Py_CLEAR(e->state_header);
    Py_CLEAR(e->blocks);
    Py_CLEAR(e->described);
    Py_CLEAR(e->memos);
    Py_CLEAR(e->extra);
    Py_CLEAR(e->extra_block);
    Py_CLEAR(e->resource_schema);
    Py_CLEAR(e->scope_schema);
    Py_CLEAR(e->s_attributes);
    Py_CLEAR(e->s_popleft);
    Py_CLEAR(e->s_context);
    Py_CLEAR(e->s_attrs);
    Py_CLEAR(e->k_instance);
    Py_CLEAR(e->k_gpu_time);
    Py_CLEAR(e->k_cuda_error);
    Py_CLEAR(e->k_nonfinite);
    Py_CLEAR(e->k_replay_index);
    Py_CLEAR(e->replay_type);
    Py_CLEAR(e->raw_stats);
    instance_forget(e);
    return 0;
}

static void enc_dealloc(Encoder *e) {
    PyObject_GC_UnTrack(e);
    enc_clear(e);
    buf_free(&e->resource);
    buf_free(&e->scope);
    buf_free(&e->spans);
    buf_free(&e->tmp);
    buf_free(&e->rconst);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "otel_flashinfer._otlp.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "CallRecords -> OTLP request bytes (protobuf or OTLP/JSON lines)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)enc_init,
    .tp_traverse = (traverseproc)enc_traverse,
    .tp_clear = (inquiry)enc_clear,
    .tp_dealloc = (destructor)enc_dealloc,
    .tp_methods = enc_methods,
    .tp_getset = enc_getset,
};

static PyObject *mod_register_api(PyObject *self, PyObject *capsule) {
    if (capsule == Py_None) { /* register_api(None): GPU times back to Python */
        gpu_api = NULL;
        Py_CLEAR(gpu_api_capsule);
        Py_RETURN_NONE;
    }
    const otel_flashinfer_hotpath_api *api =
        PyCapsule_GetPointer(capsule, "otel_flashinfer.hotpath_api");
    if (api == NULL) return NULL;
    Py_INCREF(capsule); /* the struct lives in the pool's module: keep it */
    Py_XSETREF(gpu_api_capsule, capsule);
    gpu_api = api;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"register_api", mod_register_api, METH_O,
     "resolve GPU times through the CUDA event pool's API (a capsule); None: stop"},
    {"register_stats", mod_register_stats, METH_VARARGS,
     "register_stats(capsule, StatsPending[, GraphStatsPending]): resolve level-5 "
     "statistics in C; "
     "register_stats(None): stop"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_otlp",
                                        "Native OTLP span encoding.", -1, module_methods};

PyMODINIT_FUNC PyInit__otlp(void) {
    if (PyType_Ready(&EncoderType) < 0) return NULL;
    k_exc_type = PyUnicode_InternFromString("exception.type");
    k_exc_message = PyUnicode_InternFromString("exception.message");
    k_exc_stack = PyUnicode_InternFromString("exception.stacktrace");
    k_exc_escaped = PyUnicode_InternFromString("exception.escaped");
    s_true_text = PyUnicode_InternFromString("True");
    s_exception = PyUnicode_InternFromString("exception");
    /* drain's ``later``: needed for GPU times as much as for statistics, so not left to
     * register_stats (without statistics, a GPU time not in yet went to Python) */
    s_append = PyUnicode_InternFromString("append");
    if (PyErr_Occurred()) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) return NULL;
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(&EncoderType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "API_VERSION", OTEL_FLASHINFER_HOTPATH_API_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
