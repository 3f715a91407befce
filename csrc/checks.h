// Argument checks whose messages name the argument, what was expected and what came.
#pragma once

#include <torch/library.h>
#include <torch/types.h>

#define KC_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must have ", (d), " dims, got shape ", (x).sizes())

#define KC_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must be ", (dt), ", got ", (x).scalar_type())

#define KC_CHECK_SAME_DTYPE(x, y)                                                           \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " and " #y " must have the same " \
              "dtype, got ", (x).scalar_type(), " and ", (y).scalar_type())

#define KC_CHECK_FLOATING(x)                                                                    \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||             \
                  (x).scalar_type() == at::kBFloat16,                                           \
              #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())

#define KC_CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())

#define KC_CHECK_LAST_CONTIGUOUS(x)                                                       \
  TORCH_CHECK((x).size(-1) <= 1 || (x).stride(-1) == 1, #x " must be contiguous in its " \
              "last dim, got strides ", (x).strides())

#define KC_CHECK_HEAD_DIM(x, d)                                                           \
  TORCH_CHECK((d) == 64 || (d) == 128, #x ": head dim must be 64 or 128, got ", (d))

#define KC_CHECK_GQA(hq, hkv, qname, kname)                                                 \
  TORCH_CHECK((hkv) > 0 && (hq) % (hkv) == 0, qname " heads (", (hq), ") must be a multiple " \
              "of " kname " heads (", (hkv), ")")
