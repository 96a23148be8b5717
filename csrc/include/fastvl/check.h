// Argument checks with messages that name the argument and what was expected.
// Only included by translation units that link against torch (not by the pure-math headers).
#pragma once

#include <c10/util/Exception.h>

#define FASTVL_CHECK_ARG(cond, op, arg, ...) \
  TORCH_CHECK_VALUE(cond, "fastvl.ops.", op, ": argument '", arg, "' ", __VA_ARGS__)

#define FASTVL_CHECK_DTYPE(t, op, arg, dtype) \
  FASTVL_CHECK_ARG((t).scalar_type() == (dtype), op, arg, "must have dtype ", dtype, ", got ", (t).scalar_type())

#define FASTVL_CHECK_DIM(t, op, arg, d) \
  FASTVL_CHECK_ARG((t).dim() == (d), op, arg, "must be ", d, "-d, got shape ", (t).sizes())

#define FASTVL_CHECK_SAME_DEVICE(a, b, op, arg_a, arg_b)                                            \
  FASTVL_CHECK_ARG((a).device() == (b).device(), op, arg_b, "must be on the same device as '", arg_a, \
                   "' (", (a).device(), "), got ", (b).device())
