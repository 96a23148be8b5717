// The floating dtypes the extension's kernels are built for, and one dispatch from a runtime dtype to the C++ type.
// Only included by translation units that link against torch (not by the pure-math headers).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <array>

namespace fastvl {

// float32, bfloat16, float16, in dispatch order.
inline constexpr std::array<c10::ScalarType, 3> kFloatTypes = {c10::ScalarType::Float, c10::ScalarType::BFloat16,
                                                               c10::ScalarType::Half};

inline bool is_float_type(c10::ScalarType t) {
  for (c10::ScalarType f : kFloatTypes)
    if (t == f) return true;
  return false;
}

}  // namespace fastvl

#define FASTVL_DISPATCH_FLOAT_CASE(enum_type, type, ...) \
  case enum_type: {                                      \
    using scalar_t = type;                               \
    __VA_ARGS__();                                       \
    break;                                               \
  }

// FASTVL_DISPATCH_FLOAT_TYPES(dtype, "op", [&] { ... scalar_t ... }): runs the lambda with scalar_t = float,
// c10::BFloat16 or c10::Half after `dtype` (one of kFloatTypes); any other dtype errors
// "fastvl <op>: unsupported dtype <dtype>".
#define FASTVL_DISPATCH_FLOAT_TYPES(dtype, name, ...)                                      \
  [&] {                                                                                    \
    const c10::ScalarType fastvl_dispatch_type = (dtype);                                  \
    switch (fastvl_dispatch_type) {                                                        \
      FASTVL_DISPATCH_FLOAT_CASE(c10::ScalarType::Float, float, __VA_ARGS__)               \
      FASTVL_DISPATCH_FLOAT_CASE(c10::ScalarType::BFloat16, c10::BFloat16, __VA_ARGS__)    \
      FASTVL_DISPATCH_FLOAT_CASE(c10::ScalarType::Half, c10::Half, __VA_ARGS__)            \
      default:                                                                             \
        TORCH_CHECK(false, "fastvl ", name, ": unsupported dtype ", fastvl_dispatch_type); \
    }                                                                                      \
  }()
