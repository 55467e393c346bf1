// python_entry.cpp: kda_fwd's arguments straight from Python, past torch's dispatcher. Its own
// translation unit: the Python-binding headers it needs take longer to compile than the rest of the
// binding, and this way they compile beside it. flash_kda/jit/build.py fetches the entry through
// flash_kda_python_entry(), and flash_kda/api.py calls it before the op.
//
// Why: called through torch.ops, the op turns its 16 Python arguments into a boxed stack and
// dispatches it: an empty op with this schema costs ~3.9 us a call on the 2-core CI machine. This
// entry reads the same arguments by hand (vectorcall) in ~0.2 us. With kda_fwd's checks, a call
// that launches nothing: 3.1 -> 1.1 us there, 4.0-8.0 -> 1.4-2.9 us on the H100 machines' hosts,
// where launching the two kernels takes ~8 us and the issue allows 20 us for a whole call
// (docs/performance.md v22).
//
// It is a shortcut, never a second meaning. It declines (returns False, having written nothing)
// wherever the dispatcher could do anything but call kda_fwd with these tensors, and the caller then
// takes its checked path, which calls the op:
//  - an argument not of the schema's exact type: a tensor subclass (FakeTensor, DTensor, ...), a
//    bool or a tensor where a float goes, anything but True or False where a bool goes;
//  - a tensor of another device type than this module's, not strided, nested, quantized, a lazy
//    zero tensor, with its negative or conjugate bit set (the dispatcher would materialise those),
//    or with Python or functorch dispatch keys;
//  - a key in the thread's included set beyond the defaults (jit.trace's Tracer, functionalize,
//    the Python dispatcher, functorch transforms), a TorchDispatchMode or a torch-function mode;
//  - autograd recording: grad mode on and a tensor argument that requires grad;
//  - the profiler (any RecordFunction callback): the op's event then shows in its trace.
// Argument errors are raised as the op raises them (ValueError, kInvalid first); so are the launch's.
// Neither path bumps the destinations' version counters (the op, a plain CUDA kernel, does not).

#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <iterator>

#include "binding.h"

namespace {

using flash_kda::kda_fwd;
using flash_kda::kModuleDeviceType;

// The tensor arguments' slots in kda_fwd's order, and whether each may be None.
constexpr int kTensorSlots[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15};
constexpr bool kMayBeNone[] = {false, false, false, false, false, true, true, true, true, false, true, true};
constexpr Py_ssize_t kArgCount = 16;

// A tensor's keys that route a call through Python or a functorch transform instead of the kernel.
constexpr c10::DispatchKeySet kDetourKeys = c10::python_ks | c10::functorch_transforms_ks;

// A tensor the dispatcher would hand to this module's kernel as it is: its memory is its values.
bool plain_tensor(const at::Tensor& t, bool grad_on) {
  return t.device().type() == kModuleDeviceType && t.layout() == c10::kStrided && !t.is_nested() &&
         !t.is_quantized() && !t._is_zerotensor() && !t.is_neg() && !t.is_conj() &&
         !t.key_set().has_any(kDetourKeys) && !(grad_on && t.requires_grad());
}

// Nothing in this thread's state that the dispatcher would act on before the kernel.
bool plain_dispatch_state() {
  return (c10::impl::tls_local_dispatch_key_set().included_ - c10::default_included_set).empty() &&
         !c10::impl::TorchDispatchModeTLS::any_modes_set() && !at::impl::torch_function_mode_enabled() &&
         !at::hasCallbacks();
}

// A float argument: a Python float or int (not bool, which the op's callers never pass for one).
bool read_real(PyObject* o, double& x) {
  if (PyFloat_CheckExact(o)) {
    x = PyFloat_AS_DOUBLE(o);
    return true;
  }
  if (!PyLong_CheckExact(o)) return false;
  x = PyLong_AsDouble(o);
  if (x == -1.0 && PyErr_Occurred()) {  // too large for a double: the op's path reports it
    PyErr_Clear();
    return false;
  }
  return true;
}

// Releases the GIL for its scope (restored on the way out, exceptions included).
struct GilReleased {
  PyThreadState* state = PyEval_SaveThread();
  GilReleased() = default;
  GilReleased(const GilReleased&) = delete;
  GilReleased& operator=(const GilReleased&) = delete;
  ~GilReleased() { PyEval_RestoreThread(state); }
};

// Calls kda_fwd unless the call is one to decline (above). Py_True: it ran; Py_False: declined.
PyObject* direct_kda_fwd(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != kArgCount) {
    PyErr_Format(PyExc_TypeError, "flash_kda's direct entry takes %zd arguments, got %zd", kArgCount, nargs);
    return nullptr;
  }
  if (!plain_dispatch_state()) Py_RETURN_FALSE;
  const bool grad_on = c10::GradMode::is_enabled();
  std::optional<at::Tensor> t[std::size(kTensorSlots)];
  for (size_t i = 0; i < std::size(kTensorSlots); ++i) {
    PyObject* o = args[kTensorSlots[i]];
    if (o == Py_None && kMayBeNone[i]) continue;
    if (!THPVariable_CheckExact(o)) Py_RETURN_FALSE;  // (THPVariable_Check would admit subclasses)
    const at::Tensor& x = THPVariable_Unpack(o);
    if (!plain_tensor(x, grad_on)) Py_RETURN_FALSE;
    t[i] = x;
  }
  double scale = 0.0, lower_bound = 0.0;
  if (!read_real(args[11], scale) || !read_real(args[12], lower_bound)) Py_RETURN_FALSE;
  PyObject* const flags[2] = {args[13], args[14]};
  for (PyObject* f : flags) {
    if (f != Py_True && f != Py_False) Py_RETURN_FALSE;
  }
  {
    // (as torch.ops does for the op: other Python threads run while the kernels are launched)
    const GilReleased no_gil;
    kda_fwd(*t[0], *t[1], *t[2], *t[3], *t[4], t[5], t[6], t[7], t[8], *t[9], t[10], scale, lower_bound,
            flags[0] == Py_True, flags[1] == Py_True, t[11]);
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef direct_kda_fwd_def = {
    "direct_kda_fwd", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(direct_kda_fwd)),
    METH_FASTCALL, "kda_fwd's arguments, past torch's dispatcher: True if it ran, False if declined"};

}  // namespace

// The entry as a Python callable, made once and kept for the life of the process (the static holds
// one reference). Fetched by ctypes.PyDLL, which holds the GIL for the call and takes over the
// returned reference as a new one: so each call hands out a reference of its own. (Without it, the
// second fetch in a process, after flash_kda._ops.forget_kernels(), freed the function while the
// first fetch's holders still used it: a crash found in review, session 22.)
extern "C" __attribute__((visibility("default"))) PyObject* flash_kda_python_entry() {
  static PyObject* const fn = PyCFunction_New(&direct_kda_fwd_def, nullptr);
  Py_XINCREF(fn);
  return fn;  // (null, with the Python error set, if it could not be made: the loader then uses the op)
}
