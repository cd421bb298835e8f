// C++ CPU twin of csrc/cuda/pack.cu: gather sequences into one packed buffer, scatter back to padded rows.
#include <algorithm>
#include <cstring>

#include "r4b/cpu_kernels.h"

namespace r4b::cpu {

void pack(const void* const* srcs, const int64_t* row_offsets, int64_t n, int64_t row_bytes, void* dst,
          int64_t* position_ids, int32_t* seq_ids) {
  auto* d = static_cast<char*>(dst);
  for (int64_t s = 0; s < n; ++s) {
    const int64_t start = row_offsets[s], len = row_offsets[s + 1] - row_offsets[s];
    std::memcpy(d + start * row_bytes, srcs[s], static_cast<size_t>(len * row_bytes));
    for (int64_t j = 0; j < len; ++j) {
      position_ids[start + j] = j;
      seq_ids[start + j] = static_cast<int32_t>(s);
    }
  }
}

void unpack_padded(const void* flat, const int32_t* cu_seqlens, int64_t n, int64_t max_seqlen, int64_t row_bytes,
                   void* out) {
  const auto* f = static_cast<const char*>(flat);
  auto* o = static_cast<char*>(out);
  for (int64_t s = 0; s < n; ++s) {
    const int64_t start = cu_seqlens[s];
    const int64_t len = std::min<int64_t>(cu_seqlens[s + 1] - start, max_seqlen);
    if (len <= 0) continue;
    std::memcpy(o + s * max_seqlen * row_bytes, f + start * row_bytes, static_cast<size_t>(len * row_bytes));
  }
}

}  // namespace r4b::cpu
