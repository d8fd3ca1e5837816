// The DLPack C ABI, as much of it as protoserve consumes.
//
// Written from the DLPack specification (https://dmlc.github.io/dlpack/):
// a tensor is a raw data pointer plus device, dtype, shape and optional
// strides, wrapped in a managed struct whose deleter the consumer calls once
// it is done.  Only the unversioned ("dltensor" capsule) form is declared;
// the layouts below are fixed by the ABI and must not be reordered.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Device type codes (DLDeviceType).  Only the ones protoserve names.
enum {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLCUDAManaged = 13,
};

// Data type codes (DLDataTypeCode).
enum {
  kDLInt = 0,
  kDLUInt = 1,
  kDLFloat = 2,
  kDLBfloat = 4,
};

typedef struct {
  int32_t device_type;  // one of the kDL* device codes
  int32_t device_id;    // ordinal of the device of that type
} DLDevice;

typedef struct {
  uint8_t code;    // one of the kDL* type codes
  uint8_t bits;    // bits per lane: 16, 32, 64...
  uint16_t lanes;  // 1 for scalars
} DLDataType;

typedef struct {
  void* data;            // base pointer; the first element is at data + byte_offset
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;        // ndim entries
  int64_t* strides;      // ndim entries in elements, or NULL for compact row-major
  uint64_t byte_offset;
} DLTensor;

typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;                              // producer's private state
  void (*deleter)(struct DLManagedTensor* self);  // may be NULL
} DLManagedTensor;

#ifdef __cplusplus
}  // extern "C"
#endif
