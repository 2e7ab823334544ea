/* Clearing Python errors on a traced call's thread without losing the program's own.
 *
 * Our C code calls back into Python (a tensor subclass's properties, describe.snapshot,
 * health.report) and, where such a call fails, clears the error and goes on: our
 * failures must not break the call.  A KeyboardInterrupt (or a SystemExit from a
 * signal handler) can surface in any such call, because a signal's Python handler runs
 * at the next bytecode boundary, wherever that is.  Clearing it lost the user's Ctrl-C.
 * ofi_clear_error clears errors that are Exceptions, as PyErr_Clear did, and keeps any
 * other: it is raised again in the main thread at the interpreter's next check
 * (Py_AddPendingCall): in the program's own code right after ours returns, where the
 * signal would have landed without us, or in Python that our code calls next (a
 * fallback hook), which then fails with it: code that holds a resource across such a
 * call gives it back on any failure (stats_hooks.cpp's after_in_python).  On other
 * threads (which run no signal handlers) it is cleared as before. */
#pragma once
#include <Python.h>

static PyObject *ofi_deferred_exc = NULL;
static unsigned long ofi_main_ident = 0;

/* Once, at module init: which thread is the main thread (threading.main_thread()). */
static void ofi_defer_init(void) {
    PyObject *threading = PyImport_ImportModule("threading");
    PyObject *main = threading ? PyObject_CallMethod(threading, "main_thread", NULL) : NULL;
    PyObject *ident = main ? PyObject_GetAttrString(main, "ident") : NULL;
    if (ident != NULL && PyLong_Check(ident)) ofi_main_ident = PyLong_AsUnsignedLong(ident);
    if (PyErr_Occurred()) PyErr_Clear();
    Py_XDECREF(ident);
    Py_XDECREF(main);
    Py_XDECREF(threading);
}

static int ofi_raise_deferred(void *unused) {
    (void)unused;
    PyObject *exc = ofi_deferred_exc;
    ofi_deferred_exc = NULL;
    if (exc == NULL) return 0;
    PyObject *type = (PyObject *)Py_TYPE(exc);
    Py_INCREF(type);
    PyErr_Restore(type, exc, PyException_GetTraceback(exc));
    return -1;
}

/* PyErr_Clear for Exceptions; anything else is kept for the main thread (above). */
static void ofi_clear_error(void) {
    if (PyErr_Occurred() == NULL) return;
    if (PyErr_ExceptionMatches(PyExc_Exception) || ofi_main_ident == 0 ||
        PyThread_get_thread_ident() != ofi_main_ident || ofi_deferred_exc != NULL) {
        PyErr_Clear();
        return;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    if (value == NULL) return;
    ofi_deferred_exc = value;
    if (Py_AddPendingCall(ofi_raise_deferred, NULL) < 0) Py_CLEAR(ofi_deferred_exc);
}
