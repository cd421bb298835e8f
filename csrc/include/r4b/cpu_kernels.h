// C++ CPU twins of the CUDA kernels: plain pointers and sizes, no torch types, so each can be tested and
// reused on its own. The torch glue in csrc/ops/ calls these for CPU tensors.
#pragma once
#include <cstdint>

namespace r4b::cpu {

// Advantage scale modes, shared with the CUDA launchers and the torch glue.
enum Scale : int { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };

// out[i] = (r[i] - mean of i's group) / (group std + eps)   (kScaleGroup, unbiased std)
//          (r[i] - mean of i's group) / (batch std + eps)   (kScaleBatch)
//          r[i] - mean of i's group                         (kScaleNone)
// A group of one, or one whose rewards are all equal, gets exactly 0. group_ids need not be sorted.
void group_advantages(const float* rewards, const int64_t* group_ids, int64_t n, int scale, float eps, float* out);

// Concatenate n sequences of rows (row_bytes each) into dst; row_offsets[n+1] are the row starts in dst.
// Writes position_ids (0.. per sequence) and seq_ids for every row.
void pack(const void* const* srcs, const int64_t* row_offsets, int64_t n, int64_t row_bytes, void* dst,
          int64_t* position_ids, int32_t* seq_ids);

// Scatter a packed [T, row] buffer into a padded [n, max_seqlen, row] buffer that the caller pre-filled with
// the pad value. Rows past max_seqlen in a sequence are not written.
void unpack_padded(const void* flat, const int32_t* cu_seqlens, int64_t n, int64_t max_seqlen, int64_t row_bytes,
                   void* out);

// Element types of the paged-KV ops (the same codes in csrc/include/r4b/cuda_launchers.h and the torch glue).
enum FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Write a step's keys and values into the paged KV cache: for every t with slot = slot_mapping[t] in
// [0, num_slots), copy k[t, h, :] to k_cache[slot, h, :] and v[t, h, :] to v_cache[slot, h, :] for h < Hkv.
// A slot outside [0, num_slots) (-1: skip) is not written. k, v: (T, Hkv, D) with unit last stride and the
// given row (t) and head (h) strides, in elements; the caches (num_slots, Hkv, D) contiguous; all of one
// element type of elem_bytes bytes (a bitwise copy).
void store_kv(const void* k, const void* v, int64_t stride_kt, int64_t stride_kh, int64_t stride_vt,
              int64_t stride_vh, int64_t T, int64_t Hkv, int64_t D, int64_t elem_bytes, const int64_t* slot_mapping,
              int64_t num_slots, void* k_cache, void* v_cache);

// Decode attention over the paged KV cache, the algorithm of csrc/cuda/paged_kv.cu: for every sequence b and
// query head hq (KV head hq / (Hq / Hkv)), out[b, hq] = softmax(q[b, hq] . k_j * softmax_scale) v_j over the
// tokens j < context_lens[b] (token j at cache row block_tables[b, j / block_size] * block_size + j % block_size),
// in fp32. Split-K: the capacity (max_blocks * block_size tokens) is cut into num_splits ranges of
// ceil(capacity / num_splits) tokens; each range gets an online softmax (base 2) giving a normalised fp32
// partial output and log2-sum-exp (-inf for an empty range), then the ranges are merged. An empty context gives
// zeros. Defensive like the CUDA kernel: context_lens are clamped to [0, capacity], and a token whose block id
// is outside [0, num_blocks) is skipped (left out of the softmax). q: (B, Hq, D) with unit last stride and the
// given strides (elements); the caches (num_blocks, block_size, Hkv, D) contiguous; block_tables (B, max_blocks)
// int32 with row stride stride_bt; out (B, Hq, D) contiguous; q, caches and out of float_type (FloatType).
void paged_decode_attention(const void* q, int64_t stride_qb, int64_t stride_qh, const void* k_cache,
                            const void* v_cache, const int32_t* block_tables, int64_t stride_bt,
                            const int32_t* context_lens, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                            int64_t num_blocks, int64_t block_size, int64_t max_blocks, float softmax_scale,
                            int64_t num_splits, int float_type, void* out);

}  // namespace r4b::cpu
