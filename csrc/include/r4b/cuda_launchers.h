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

// Element types of the paged-KV ops (the same codes as r4b::cpu::FloatType in r4b/cpu_kernels.h).
enum FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The largest head dim paged_decode_attention takes, and the most blocks a 1-D grid may have.
constexpr int64_t kMaxDecodeHeadDim = 256;
constexpr int64_t kMaxGridX = 2147483647;

// The splits paged_decode_attention runs for num_splits over `capacity` tokens: more splits than tokens give the
// same ranges as `capacity` splits (one token each, the rest empty), so they are capped there. The partial
// buffers hold B * Hq * decode_splits(...) rows.
inline int64_t decode_splits(int64_t num_splits, int64_t capacity) {
  return num_splits < capacity ? num_splits : capacity;
}

// Scatter k, v (T, Hkv, D), strides in elements with a unit last stride, into the contiguous caches
// (num_slots, Hkv, D): token t goes to slot slot_mapping[t] (device int64); a slot outside [0, num_slots) is
// skipped. A bitwise copy in words of word_bytes (16, 8, 4, 2 or 1), which must divide D * elem_bytes, every
// stride * elem_bytes and the address of k, v and both caches. Hkv * D * elem_bytes < 2^31.
cudaError_t store_kv(const void* k, const void* v, int64_t stride_kt, int64_t stride_kh, int64_t stride_vt,
                     int64_t stride_vh, int64_t T, int64_t Hkv, int64_t D, int elem_bytes, int word_bytes,
                     const int64_t* slot_mapping, int64_t num_slots, void* k_cache, void* v_cache,
                     cudaStream_t stream);

// Split-K decode attention over the paged KV cache (the algorithm of r4b::cpu::paged_decode_attention, which
// documents the semantics). q (B, Hq, D) with unit last stride (strides in elements), the caches (num_blocks,
// block_size, Hkv, D) contiguous, block_tables (B, max_blocks) int32 with row stride stride_bt, context_lens (B,)
// int32 (read on the device only), out (B, Hq, D) contiguous; q, caches and out of float_type. 1 <= D <=
// kMaxDecodeHeadDim, Hq % Hkv == 0, max_blocks * block_size >= 1. partial_out (B * Hq * S * D floats) and
// partial_lse (B * Hq * S floats), S = decode_splits(num_splits, max_blocks * block_size), are the workspace
// (unused when S == 1). B * Hq * S must not exceed kMaxGridX.
cudaError_t paged_decode_attention(const void* q, int64_t stride_qb, int64_t stride_qh, const void* k_cache,
                                   const void* v_cache, const int32_t* block_tables, int64_t stride_bt,
                                   const int32_t* context_lens, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                                   int64_t num_blocks, int64_t block_size, int64_t max_blocks, float softmax_scale,
                                   int64_t num_splits, int float_type, float* partial_out, float* partial_lse,
                                   void* out, cudaStream_t stream);

}  // namespace r4b::cuda
