/* _timed_io: the blob budget's counter-file reads and writes, timed in the kernel.
 *
 * A look at the counter file that takes over 5 ms marks the file slow, and calls then
 * stop looking at it (blobs/store.py).  Timed from Python, a look also counts the GIL
 * waits after each system call: with busy threads, one switch interval (5 ms) each,
 * so a fast local file was taken for a slow one and payloads were skipped as
 * budget_busy.  Here each call's clock runs with the GIL released, around the system
 * call alone.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

static double seconds(const struct timespec *a, const struct timespec *b) {
    return (double)(b->tv_sec - a->tv_sec) + (double)(b->tv_nsec - a->tv_nsec) * 1e-9;
}

/* pread(fd, n, offset) -> (bytes, seconds): at most n bytes (a short read is returned
 * as it is, as os.pread does). */
static PyObject *timed_pread(PyObject *self, PyObject *args) {
    int fd;
    Py_ssize_t n;
    long long offset;
    if (!PyArg_ParseTuple(args, "inL", &fd, &n, &offset))
        return NULL;
    if (n < 0 || n > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "pread: n must be 0..1 MiB");
        return NULL;
    }
    PyObject *buf = PyBytes_FromStringAndSize(NULL, n);
    if (buf == NULL)
        return NULL;
    double took = 0.0;
    ssize_t got;
    int err;
    for (;;) {
        struct timespec t0, t1;
        Py_BEGIN_ALLOW_THREADS
        clock_gettime(CLOCK_MONOTONIC, &t0);
        got = pread(fd, PyBytes_AS_STRING(buf), (size_t)n, (off_t)offset);
        err = errno;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        Py_END_ALLOW_THREADS
        took += seconds(&t0, &t1);
        if (got >= 0 || err != EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {  /* as os.pread: a handler's exception wins */
            Py_DECREF(buf);
            return NULL;
        }
    }
    if (got < 0) {
        Py_DECREF(buf);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (got < n && _PyBytes_Resize(&buf, got) < 0)
        return NULL;
    return Py_BuildValue("(Nd)", buf, took);
}

/* pwrite(fd, data, offset) -> seconds: all of data, or OSError. */
static PyObject *timed_pwrite(PyObject *self, PyObject *args) {
    int fd;
    Py_buffer data;
    long long offset;
    if (!PyArg_ParseTuple(args, "iy*L", &fd, &data, &offset))
        return NULL;
    double took = 0.0;
    Py_ssize_t done = 0;
    int err = 0;
    while (done < data.len) {
        struct timespec t0, t1;
        ssize_t put;
        Py_BEGIN_ALLOW_THREADS
        clock_gettime(CLOCK_MONOTONIC, &t0);
        put = pwrite(fd, (const char *)data.buf + done, (size_t)(data.len - done),
                     (off_t)(offset + done));
        err = errno;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        Py_END_ALLOW_THREADS
        took += seconds(&t0, &t1);
        if (put > 0) {
            done += put;
        } else if (put < 0 && err == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                PyBuffer_Release(&data);
                return NULL;
            }
        } else {
            PyBuffer_Release(&data);
            errno = put < 0 ? err : EIO;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    PyBuffer_Release(&data);
    return PyFloat_FromDouble(took);
}

/* unlock(fd) -> seconds: the whole file's POSIX record lock let go, as
 * fcntl.lockf(fd, LOCK_UN) does. */
static PyObject *timed_unlock(PyObject *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    struct flock lk = {0};
    lk.l_type = F_UNLCK;
    lk.l_whence = SEEK_SET;
    double took = 0.0;
    int rc, err;
    for (;;) {
        struct timespec t0, t1;
        Py_BEGIN_ALLOW_THREADS
        clock_gettime(CLOCK_MONOTONIC, &t0);
        rc = fcntl(fd, F_SETLK, &lk);
        err = errno;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        Py_END_ALLOW_THREADS
        took += seconds(&t0, &t1);
        if (rc == 0 || err != EINTR)
            break;
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
    if (rc != 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyFloat_FromDouble(took);
}

static PyMethodDef methods[] = {
    {"pread", timed_pread, METH_VARARGS,
     "pread(fd, n, offset) -> (bytes, seconds in the system call)"},
    {"pwrite", timed_pwrite, METH_VARARGS,
     "pwrite(fd, data, offset) -> seconds in the system calls (writes all of data)"},
    {"unlock", timed_unlock, METH_VARARGS,
     "unlock(fd) -> seconds: lets the file's lock go, as fcntl.lockf(fd, LOCK_UN)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_timed_io",
    "Counter-file I/O timed without the GIL (see csrc/timed_io.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__timed_io(void) { return PyModule_Create(&module); }
