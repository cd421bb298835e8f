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

}  // namespace r4b::cpu
