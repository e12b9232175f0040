"""Work-arounds for bfloat16 (and fp32 dot rounding) in Triton's CPU interpreter (``TRITON_INTERPRET=1``).

The interpreter (``triton/runtime/interpreter.py``, checked against triton 3.6)
stores bfloat16 values as raw ``uint16`` bit patterns in numpy arrays. Three
places then go wrong:

* ``InterpreterBuilder.create_dot`` feeds those ``uint16`` arrays straight to
  ``np.matmul``, i.e. it multiplies the *bit patterns* as integers.
* ``InterpreterBuilder.binary_op`` / ``unary_op`` / ``create_fma`` do the same
  for element-wise arithmetic on bfloat16 tensors (``a + b``, ``a * b``, ``-a``,
  comparisons, ...).
* ``float32 -> bfloat16`` casts (``x.to(tl.bfloat16)``) truncate toward zero,
  whereas the GPU compiles them to round-to-nearest-even; int <-> bfloat16
  casts convert the bit pattern, not the value.

:func:`patch_interpreter_bf16_dot` monkeypatches those builder methods so
bfloat16 operands are decoded exactly (``bits << 16`` viewed as float32), the
arithmetic is done in float32, and bfloat16 results are rounded to nearest
even, as on the GPU.

It also makes every floating ``tl.dot`` with a float32 accumulator (fp16, bf16
or fp32 operands) compute in float64 and round once. The interpreter's own
float32 ``np.matmul`` rounds an element differently depending on the operands'
shapes and transposition (the BLAS kernel picks its summation order by shape:
q @ k.T and (k @ q.T).T differed by 2.4e-4 at |s| ~ 2000 on one CI machine,
by nothing on another). The attention backward recomputes the forward's scores
in other tile shapes, transposed, and exp(s - lse) is only as good as the two
computations of s agree: with large fp32 logits that disagreement alone broke
the gradient rule on one CI machine. On the GPU the two agree (an fp32
``ieee`` dot accumulates over k in a fixed order, so q.k and k.q give the same
bits). The float64 form gives the interpreter that agreement; it is also more
accurate than the GPU's fp32 accumulation, which the GPU suite judges at full
size.

Nothing else in the interpreter changes (reductions such as ``tl.sum`` on a
bfloat16 tensor are still wrong: kernels should reduce in float32, as they do
for accuracy anyway).
"""

import os

import numpy as np

__all__ = ["patch_interpreter_bf16_dot", "interpreting"]

_PATCHED_FLAG = "_tileattn_bf16_patched"


def interpreting():
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _bf16_bits_to_f32(bits):
    """uint16 bfloat16 bit patterns -> float32 values (exact)."""
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _f32_to_bf16_bits(x):
    """float32 values -> uint16 bfloat16 bit patterns, round to nearest even (NaN kept NaN)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    bits = x.view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = np.isnan(x)
    if np.any(nan):
        rounded = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x0040), rounded)
    return rounded.astype(np.uint16).reshape(x.shape)


def patch_interpreter_bf16_dot():
    """Make bfloat16 ``tl.dot`` (and bf16 arithmetic / casts) correct in the interpreter.

    Idempotent. Does nothing (returns False) unless ``TRITON_INTERPRET`` is set,
    so it is safe to call on a GPU machine. Returns True when the patch is in place.
    Call it after setting ``TRITON_INTERPRET=1`` (Triton may already be imported:
    the patched methods are looked up on the builder class at call time).
    """
    if not interpreting():
        return False
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder_cls = interp.InterpreterBuilder
    if getattr(builder_cls, _PATCHED_FLAG, False):
        return True
    TensorHandle = interp.TensorHandle
    bf16 = tl.bfloat16

    def is_bf16(handle):
        return handle.dtype.scalar == bf16

    def as_f32(handle):
        return _bf16_bits_to_f32(handle.data) if is_bf16(handle) else handle.data

    # --- tl.dot -------------------------------------------------------------
    orig_dot = builder_cls.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        wide = (np.float16, np.float32)
        if not (is_bf16(a) or is_bf16(b)) and not (a.data.dtype in wide and b.data.dtype in wide
                                                   and d.data.dtype == np.float32):
            return orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        # float64 products and sums, rounded once: see the module docstring (shape-independent rounding)
        a_data = as_f32(a).astype(np.float64)
        b_data = as_f32(b).astype(np.float64)
        acc = as_f32(d)
        out = (np.matmul(a_data, b_data) + acc).astype(np.float32)
        if is_bf16(d):  # bf16 accumulator: round the result back
            return TensorHandle(_f32_to_bf16_bits(out), d.dtype.scalar)
        return TensorHandle(out.astype(acc.dtype, copy=False), d.dtype.scalar)

    # --- element-wise arithmetic ---------------------------------------------
    orig_binary = builder_cls.binary_op
    orig_unary = builder_cls.unary_op
    orig_fma = builder_cls.create_fma

    def _wrap_result(out, like):
        out = np.asarray(out)
        if out.dtype == np.bool_:
            return TensorHandle(out, tl.int1)
        return TensorHandle(_f32_to_bf16_bits(out), like.dtype.scalar)

    def binary_op(self, lhs, rhs, op):
        if not (is_bf16(lhs) or is_bf16(rhs)):
            return orig_binary(self, lhs, rhs, op)
        return _wrap_result(op(as_f32(lhs), as_f32(rhs)), lhs)

    def unary_op(self, arg, op):
        if not is_bf16(arg):
            return orig_unary(self, arg, op)
        return _wrap_result(op(as_f32(arg)), arg)

    def create_fma(self, x, y, z):
        if not (is_bf16(x) or is_bf16(y) or is_bf16(z)):
            return orig_fma(self, x, y, z)
        return _wrap_result(as_f32(x) * as_f32(y) + as_f32(z), z)

    # --- casts to / from bfloat16 -------------------------------------------
    orig_cast = builder_cls.cast_impl
    orig_fp_to_fp = builder_cls.create_fp_to_fp

    def cast_impl(self, src, dst_type):
        src_bf16, dst_bf16 = is_bf16(src), dst_type.scalar == bf16
        if dst_bf16 and not src_bf16:  # fp32/fp16/int -> bf16: round to nearest even
            return TensorHandle(_f32_to_bf16_bits(np.asarray(src.data).astype(np.float32)), dst_type.scalar)
        if src_bf16 and not dst_bf16:  # bf16 -> anything: decode the value first
            data = _bf16_bits_to_f32(src.data).astype(interp._get_np_dtype(dst_type))
            return TensorHandle(data, dst_type.scalar)
        return orig_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar == bf16 and not is_bf16(src):
            data = np.ascontiguousarray(np.asarray(src.data).astype(np.float32))
            if rounding_mode == interp._ir.ROUNDING_MODE.RTZ:
                bits = (data.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
            else:
                bits = _f32_to_bf16_bits(data)
            return TensorHandle(bits, dst_type.scalar)
        return orig_fp_to_fp(self, src, dst_type, rounding_mode)

    builder_cls.create_dot = create_dot
    builder_cls.binary_op = binary_op
    builder_cls.unary_op = unary_op
    builder_cls.create_fma = create_fma
    builder_cls.cast_impl = cast_impl
    builder_cls.create_fp_to_fp = create_fp_to_fp
    # The create_* lambdas (create_fadd, create_fp_trunc, ...) call
    # self.binary_op / self.unary_op / self.cast_impl, so they pick these up.
    setattr(builder_cls, _PATCHED_FLAG, True)
    return True
