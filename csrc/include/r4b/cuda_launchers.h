// C-style launchers of the CUDA kernels in csrc/cuda/. They take raw device pointers, sizes and a stream and
// return the launch status; they include only CUDA headers, so nvcc compiles them without torch.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace r4b::cuda {

// Group-relative advantages. Inputs prepared by the glue: `inverse[i]` is the dense group (0..G-1) of
// element i, `perm` lists the elements sorted by group and `offsets[G+1]` bounds each group inside perm.
// `workspace` holds 3*G + 2 doubles. Deterministic: no atomics, fixed reduction order.
cudaError_t group_advantages(const float* rewards, const int64_t* inverse, const int64_t* perm,
                             const int64_t* offsets, int64_t n, int64_t G, int scale, float eps, double* workspace,
                             float* out, cudaStream_t stream);

// Gather n sequences (device pointers in `srcs`, a device array) into dst; row_offsets[n+1] on the device.
// word_bytes (8, 4, 2 or 1) must divide row_bytes and the address of every source and of dst: the copy unit.
cudaError_t pack(const void* const* srcs, const int64_t* row_offsets, int64_t n, int64_t row_bytes, int word_bytes,
                 void* dst, int64_t* position_ids, int32_t* seq_ids, cudaStream_t stream);

// Scatter packed rows into a pre-filled [n, max_seqlen, row] buffer.
cudaError_t unpack_padded(const void* flat, const int32_t* cu_seqlens, int64_t n, int64_t max_seqlen,
                          int64_t row_bytes, int word_bytes, void* out, cudaStream_t stream);

}  // namespace r4b::cuda
