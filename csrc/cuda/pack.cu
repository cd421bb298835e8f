// Packing on the GPU: gather many sequences into one buffer (one block per sequence) and write their
// position_ids / seq_ids; scatter a packed buffer back into padded rows.
#include "r4b/cuda_launchers.h"

namespace r4b::cuda {
namespace {

constexpr int kThreads = 256;

template <typename Word>
__global__ void pack_kernel(const void* const* __restrict__ srcs, const int64_t* __restrict__ row_offsets,
                            int64_t row_words, Word* __restrict__ dst, int64_t* __restrict__ position_ids,
                            int32_t* __restrict__ seq_ids) {
  const int64_t s = blockIdx.x;
  const int64_t start = row_offsets[s], rows = row_offsets[s + 1] - start;
  const Word* src = static_cast<const Word*>(srcs[s]);
  Word* out = dst + start * row_words;
  for (int64_t w = threadIdx.x; w < rows * row_words; w += kThreads) out[w] = src[w];
  for (int64_t j = threadIdx.x; j < rows; j += kThreads) {
    position_ids[start + j] = j;
    seq_ids[start + j] = static_cast<int32_t>(s);
  }
}

template <typename Word>
__global__ void unpack_padded_kernel(const Word* __restrict__ flat, const int32_t* __restrict__ cu_seqlens,
                                     int64_t max_seqlen, int64_t row_words, Word* __restrict__ out) {
  const int64_t s = blockIdx.x;
  const int64_t start = cu_seqlens[s];
  int64_t rows = static_cast<int64_t>(cu_seqlens[s + 1]) - start;
  rows = rows < max_seqlen ? rows : max_seqlen;
  const Word* src = flat + start * row_words;
  Word* dst = out + s * max_seqlen * row_words;
  for (int64_t w = threadIdx.x; w < rows * row_words; w += kThreads) dst[w] = src[w];
}

}  // namespace

cudaError_t pack(const void* const* srcs, const int64_t* row_offsets, int64_t n, int64_t row_bytes, int word_bytes,
                 void* dst, int64_t* position_ids, int32_t* seq_ids, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(n);
  switch (word_bytes) {
    case 8:
      pack_kernel<uint64_t><<<grid, kThreads, 0, stream>>>(srcs, row_offsets, row_bytes / 8,
                                                            static_cast<uint64_t*>(dst), position_ids, seq_ids);
      break;
    case 4:
      pack_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(srcs, row_offsets, row_bytes / 4,
                                                            static_cast<uint32_t*>(dst), position_ids, seq_ids);
      break;
    case 2:
      pack_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(srcs, row_offsets, row_bytes / 2,
                                                            static_cast<uint16_t*>(dst), position_ids, seq_ids);
      break;
    default:
      pack_kernel<uint8_t><<<grid, kThreads, 0, stream>>>(srcs, row_offsets, row_bytes, static_cast<uint8_t*>(dst),
                                                           position_ids, seq_ids);
  }
  return cudaGetLastError();
}

cudaError_t unpack_padded(const void* flat, const int32_t* cu_seqlens, int64_t n, int64_t max_seqlen,
                          int64_t row_bytes, int word_bytes, void* out, cudaStream_t stream) {
  if (n == 0 || max_seqlen == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(n);
  switch (word_bytes) {
    case 8:
      unpack_padded_kernel<uint64_t><<<grid, kThreads, 0, stream>>>(
          static_cast<const uint64_t*>(flat), cu_seqlens, max_seqlen, row_bytes / 8, static_cast<uint64_t*>(out));
      break;
    case 4:
      unpack_padded_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(
          static_cast<const uint32_t*>(flat), cu_seqlens, max_seqlen, row_bytes / 4, static_cast<uint32_t*>(out));
      break;
    case 2:
      unpack_padded_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(
          static_cast<const uint16_t*>(flat), cu_seqlens, max_seqlen, row_bytes / 2, static_cast<uint16_t*>(out));
      break;
    default:
      unpack_padded_kernel<uint8_t><<<grid, kThreads, 0, stream>>>(
          static_cast<const uint8_t*>(flat), cu_seqlens, max_seqlen, row_bytes, static_cast<uint8_t*>(out));
  }
  return cudaGetLastError();
}

}  // namespace r4b::cuda
