// Paged KV cache on the GPU (the C++ CPU twin is csrc/cpu/paged_kv.cpp):
//  * store_kv: one block per token (grid-stride over tokens) copies the token's Hkv * D keys and values to its
//    cache slot in words of up to 16 bytes; a slot outside [0, num_slots) (-1: skip) is never written.
//  * paged_decode_attention, flash-decoding: a split kernel, one block of kThreads per (sequence, KV head, chunk
//    of up to GT of the KV head's query heads, split), runs a base-2 online softmax in fp32 over its split's
//    tokens, TN at a time: the block copies the TN K and V rows to shared memory (16-byte loads when the rows
//    allow), scores them against its GT queries (thread = (token, head lane)), updates the running max and sum
//    with warp shuffles, then accumulates P V (thread = (D column(s), head lane)). K and V are thus read once per
//    group of query heads. It writes the normalised partial output and log2-sum-exp per split (or, with one
//    split, the output itself); a merge kernel, one block per (sequence, query head), combines the splits.
//    Context lengths are read on the device only (no host sync); they are clamped to [0, capacity], and a token
//    whose block id is outside [0, num_blocks) is skipped (left out of the softmax), so nothing outside the
//    cache is read.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "r4b/cuda_launchers.h"

namespace r4b::cuda {
namespace {

constexpr int kThreads = 128;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------------------------
// store_kv

// Strides and row_words in Words (the glue picks a Word that divides every address, stride and row); a slot
// holds Hkv * row_words < 2^31 words.
template <typename Word>
__global__ void __launch_bounds__(kThreads)
    store_kv_kernel(const Word* __restrict__ k, const Word* __restrict__ v, int64_t skt, int64_t skh, int64_t svt,
                    int64_t svh, const int64_t* __restrict__ slot_mapping, int64_t T, int64_t num_slots, int Hkv,
                    int row_words, Word* k_cache, Word* v_cache) {
  const int n = Hkv * row_words;  // words of one slot
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0 || slot >= num_slots) continue;  // uniform over the block
    Word* kd = k_cache + slot * n;
    Word* vd = v_cache + slot * n;
    const Word* ks = k + t * skt;
    const Word* vs = v + t * svt;
    for (int i = static_cast<int>(threadIdx.x); i < n; i += kThreads) {
      const int h = i / row_words, w = i % row_words;
      kd[i] = ks[h * skh + w];
      vd[i] = vs[h * svh + w];
    }
  }
}

template <typename Word>
void launch_store_kv(const void* k, const void* v, int64_t skt, int64_t skh, int64_t svt, int64_t svh,
                     const int64_t* slot_mapping, int64_t T, int64_t num_slots, int64_t Hkv, int64_t row_bytes,
                     void* k_cache, void* v_cache, unsigned grid, cudaStream_t stream) {
  constexpr int64_t w = sizeof(Word);
  store_kv_kernel<Word><<<grid, kThreads, 0, stream>>>(
      static_cast<const Word*>(k), static_cast<const Word*>(v), skt / w, skh / w, svt / w, svh / w, slot_mapping, T,
      num_slots, static_cast<int>(Hkv), static_cast<int>(row_bytes / w), static_cast<Word*>(k_cache),
      static_cast<Word*>(v_cache));
}

// ---------------------------------------------------------------------------------------------------------------
// paged_decode_attention

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  __device__ static float to(float x) { return x; }
  __device__ static float from(float x) { return x; }
};
template <>
struct Cvt<__half> {
  __device__ static float to(__half x) { return __half2float(x); }
  __device__ static __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Cvt<__nv_bfloat16> {
  __device__ static float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

// The 16 / sizeof(T) elements of a 16-byte vector as floats (without taking the vector's address, which would
// put it in local memory).
__device__ inline void unpack16(const int4& r, float (&f)[4], const float*) {
  f[0] = __int_as_float(r.x);
  f[1] = __int_as_float(r.y);
  f[2] = __int_as_float(r.z);
  f[3] = __int_as_float(r.w);
}
__device__ inline void unpack16(const int4& r, float (&f)[8], const __half*) {
  const int w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const auto u = static_cast<unsigned>(w[i]);
    f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu)));
    f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16)));
  }
}
__device__ inline void unpack16(const int4& r, float (&f)[8], const __nv_bfloat16*) {
  const int w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const auto u = static_cast<unsigned>(w[i]);
    f[2 * i] = __uint_as_float(u << 16);
    f[2 * i + 1] = __uint_as_float(u & 0xffff0000u);
  }
}

// Tile geometry of the split kernel for element type T and head dims up to DMAX (64, 128 or 256).
template <typename T, int DMAX>
struct Cfg {
  static constexpr int kVE = 16 / static_cast<int>(sizeof(T));  // elements of a 16-byte vector
  // bytes of a K/V row in shared memory: DMAX elements + 16 bytes, so that the 16-byte reads of the score step
  // (thread n reads row n) fall in distinct banks
  static constexpr int kRowBytes = DMAX * static_cast<int>(sizeof(T)) + 16;
  static constexpr int kTN = DMAX * sizeof(T) <= 512 ? 32 : 16;  // tokens per tile (K + V tiles <= 34 KB)
  static constexpr int kHL = kThreads / kTN;                     // head lanes of the score step
  static constexpr int kDT = DMAX < kThreads ? DMAX : kThreads;  // threads along D in the P V step
  static constexpr int kGP = kThreads / kDT;                     // head lanes of the P V step
  static constexpr int kDPT = DMAX / kDT;                        // D columns per thread in the P V step
};

struct DecodeParams {
  const void* q;
  int64_t stride_qb, stride_qh;  // elements
  const void* k_cache;
  const void* v_cache;
  const int32_t* block_tables;
  int64_t stride_bt;
  const int32_t* context_lens;
  int64_t Hq, Hkv, D, num_blocks, block_size, capacity;
  int64_t group;        // Hq / Hkv
  int64_t head_chunks;  // ceil(group / GT)
  int64_t num_splits;
  float qk_scale;  // softmax_scale * log2(e)
  int vec;         // 1: K/V rows are 16-byte aligned (D * sizeof(T) % 16 == 0 and aligned caches)
  float* partial_out;
  float* partial_lse;
  void* out;  // written directly when num_splits == 1
};

template <typename T, int DMAX, int GT>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeParams p) {
  using C = Cfg<T, DMAX>;
  constexpr int VE = C::kVE, RB = C::kRowBytes, TN = C::kTN, HL = C::kHL, DT = C::kDT, GP = C::kGP,
                DPT = C::kDPT;
  constexpr int KH = (GT + HL - 1) / HL;  // heads per thread in the score step
  constexpr int HPT = (GT + GP - 1) / GP;  // heads per thread in the P V step
  __shared__ __align__(16) char ks[TN * RB];
  __shared__ __align__(16) char vs[TN * RB];
  __shared__ __align__(16) float qs[GT * DMAX];
  __shared__ __align__(16) float ps[TN * GT];  // probabilities of the tile, [token][head]
  __shared__ int64_t rows[TN];   // cache element offset of each token's K/V row, -1: masked
  __shared__ float alpha_s[GT], m_s[GT], l_s[GT];

  const int tid = static_cast<int>(threadIdx.x);
  int64_t idx = blockIdx.x;
  const int64_t s = idx % p.num_splits;
  idx /= p.num_splits;
  const int64_t hc = idx % p.head_chunks;
  idx /= p.head_chunks;
  const int64_t h = idx % p.Hkv;
  const int64_t b = idx / p.Hkv;
  const int64_t hq0 = h * p.group + hc * GT;  // query head of local head 0
  const int64_t left = p.group - hc * GT;
  const int nheads = left < GT ? static_cast<int>(left) : GT;  // valid local heads
  const int64_t D = p.D;

  // zero the tiles once: their columns [D, DMAX) stay 0 (the loads write [0, D) of a row only)
  for (int i = tid; i < TN * RB / 16; i += kThreads) {
    reinterpret_cast<int4*>(ks)[i] = make_int4(0, 0, 0, 0);
    reinterpret_cast<int4*>(vs)[i] = make_int4(0, 0, 0, 0);
  }
  const T* q = static_cast<const T*>(p.q) + b * p.stride_qb + hq0 * p.stride_qh;
  for (int i = tid; i < GT * DMAX; i += kThreads) {
    const int g = i / DMAX, d = i % DMAX;
    qs[i] = (g < nheads && d < D) ? Cvt<T>::to(q[g * p.stride_qh + d]) : 0.0f;
  }

  int64_t ctx = p.context_lens[b];
  ctx = ctx < 0 ? 0 : (ctx > p.capacity ? p.capacity : ctx);
  // this sequence's context in num_splits ranges of whole tiles, sized by its own length (a short context in a
  // wide table, as in a CUDA graph's, still spreads over the splits; the splits past its end are empty)
  const int64_t part = ((ctx + p.num_splits - 1) / p.num_splits + TN - 1) / TN * TN;
  const int64_t lo = s * part;
  const int64_t hi = lo + part < ctx ? lo + part : ctx;  // lo >= hi: an empty split

  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const int64_t slot_elems = p.Hkv * D;
  const int nvec = static_cast<int>((D + VE - 1) / VE);  // 16-byte vectors of a shared row covering D
  const int vpr = static_cast<int>(D / VE);             // 16-byte global loads of a row (vec path)

  // score step: thread = (token sn, head lane shl), heads shl + HL * k; it keeps their running max and sum
  const int sn = tid % TN, shl = tid / TN;
  float m_r[KH], l_r[KH];
#pragma unroll
  for (int k = 0; k < KH; ++k) {
    m_r[k] = -INFINITY;
    l_r[k] = 0.0f;
  }
  // P V step: thread = (columns dt + DT * i, head lane gp), heads gp + GP * j
  const int dt = tid % DT, gp = tid / DT;
  float acc[HPT][DPT];
#pragma unroll
  for (int j = 0; j < HPT; ++j) {
#pragma unroll
    for (int i = 0; i < DPT; ++i) acc[j][i] = 0.0f;
  }

  for (int64_t j0 = lo; j0 < hi; j0 += TN) {
    const int tile_n = hi - j0 < TN ? static_cast<int>(hi - j0) : TN;
    if (tid < TN) {
      int64_t r = -1;
      if (tid < tile_n) {
        const int64_t j = j0 + tid;
        const int32_t blk = p.block_tables[b * p.stride_bt + j / p.block_size];
        if (blk >= 0 && blk < p.num_blocks) {
          r = (static_cast<int64_t>(blk) * p.block_size + j % p.block_size) * slot_elems + h * D;
        }
      }
      rows[tid] = r;
    }
    __syncthreads();  // rows ready; the previous tile's readers of ks, vs, ps are done
    if (p.vec) {
      for (int i = tid; i < tile_n * vpr; i += kThreads) {
        const int n = i / vpr, c = i % vpr;
        const int64_t r = rows[n];
        int4 kx = make_int4(0, 0, 0, 0), vx = make_int4(0, 0, 0, 0);
        if (r >= 0) {
          kx = *reinterpret_cast<const int4*>(kc + r + c * VE);
          vx = *reinterpret_cast<const int4*>(vc + r + c * VE);
        }
        *reinterpret_cast<int4*>(ks + n * RB + c * 16) = kx;
        *reinterpret_cast<int4*>(vs + n * RB + c * 16) = vx;
      }
    } else {
      const int Di = static_cast<int>(D);
      for (int i = tid; i < tile_n * Di; i += kThreads) {
        const int n = i / Di, d = i % Di;
        const int64_t r = rows[n];
        T kx = Cvt<T>::from(0.0f), vx = Cvt<T>::from(0.0f);
        if (r >= 0) {
          kx = kc[r + d];
          vx = vc[r + d];
        }
        reinterpret_cast<T*>(ks + n * RB)[d] = kx;
        reinterpret_cast<T*>(vs + n * RB)[d] = vx;
      }
    }
    __syncthreads();  // tiles ready

    {  // scores (log2 units) and the online softmax update; rows past tile_n are masked
      const bool tok = rows[sn] >= 0;
      float sc[KH];
#pragma unroll
      for (int k = 0; k < KH; ++k) sc[k] = 0.0f;
      const char* krow = ks + sn * RB;
      for (int c = 0; c < nvec; ++c) {
        float kf[VE];
        unpack16(*reinterpret_cast<const int4*>(krow + c * 16), kf, static_cast<const T*>(nullptr));
#pragma unroll
        for (int k = 0; k < KH; ++k) {
          const int g = shl + HL * k < GT ? shl + HL * k : GT - 1;
          const float* qr = qs + g * DMAX + c * VE;
#pragma unroll
          for (int i = 0; i < VE; ++i) sc[k] += qr[i] * kf[i];
        }
      }
#pragma unroll
      for (int k = 0; k < KH; ++k) {
        const int g = shl + HL * k;
        const float x = (tok && g < nheads) ? sc[k] * p.qk_scale : -INFINITY;
        float mx = x;
#pragma unroll
        for (int off = TN / 2; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, off));
        const float m_new = fmaxf(m_r[k], mx);
        float pr = 0.0f, alpha = 1.0f;
        if (m_new != -INFINITY) {
          pr = exp2f(x - m_new);
          alpha = exp2f(m_r[k] - m_new);
        }
        float sum = pr;
#pragma unroll
        for (int off = TN / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(kFullMask, sum, off);
        l_r[k] = l_r[k] * alpha + sum;
        m_r[k] = m_new;
        if (g < GT) {
          ps[sn * GT + g] = pr;
          if (sn == 0) alpha_s[g] = alpha;
        }
      }
    }
    __syncthreads();  // probabilities ready

#pragma unroll
    for (int j = 0; j < HPT; ++j) {
      const int g = gp + GP * j < GT ? gp + GP * j : GT - 1;
      const float a = alpha_s[g];
#pragma unroll
      for (int i = 0; i < DPT; ++i) acc[j][i] *= a;
    }
    for (int n = 0; n < tile_n; ++n) {
      const T* vrow = reinterpret_cast<const T*>(vs + n * RB);
      float vf[DPT];
#pragma unroll
      for (int i = 0; i < DPT; ++i) vf[i] = Cvt<T>::to(vrow[dt + DT * i]);
#pragma unroll
      for (int j = 0; j < HPT; ++j) {
        const int g = gp + GP * j < GT ? gp + GP * j : GT - 1;
        const float pr = ps[n * GT + g];
#pragma unroll
        for (int i = 0; i < DPT; ++i) acc[j][i] += pr * vf[i];
      }
    }
  }

  if (sn == 0) {
#pragma unroll
    for (int k = 0; k < KH; ++k) {
      const int g = shl + HL * k;
      if (g < GT) {
        m_s[g] = m_r[k];
        l_s[g] = l_r[k];
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < HPT; ++j) {
    const int g = gp + GP * j;
    if (g >= nheads) continue;
    const float l = l_s[g];
    const bool nonempty = l > 0.0f;  // an empty range (past the context, or skipped tokens only): 0, -inf
    const float inv = nonempty ? 1.0f / l : 0.0f;
    const int64_t hq = hq0 + g;
    if (p.num_splits == 1) {
      T* o = static_cast<T*>(p.out) + (b * p.Hq + hq) * D;
#pragma unroll
      for (int i = 0; i < DPT; ++i) {
        const int d = dt + DT * i;
        if (d < D) o[d] = Cvt<T>::from(acc[j][i] * inv);
      }
    } else {
      const int64_t prow = (b * p.Hq + hq) * p.num_splits + s;
      float* po = p.partial_out + prow * D;
#pragma unroll
      for (int i = 0; i < DPT; ++i) {
        const int d = dt + DT * i;
        if (d < D) po[d] = acc[j][i] * inv;
      }
      if (dt == 0) p.partial_lse[prow] = nonempty ? m_s[g] + log2f(l) : -INFINITY;
    }
  }
}

// One block per (sequence, query head): out = sum_s 2^(lse_s - max) po_s / sum_s 2^(lse_s - max); zeros when every
// split is empty.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    decode_merge_kernel(const float* __restrict__ partial_out, const float* __restrict__ partial_lse,
                        int64_t num_splits, int64_t D, T* __restrict__ out) {
  __shared__ float red[kThreads / 32];
  const int64_t row = blockIdx.x;  // b * Hq + hq
  const float* lse = partial_lse + row * num_splits;
  float mx = -INFINITY;
  for (int64_t s = threadIdx.x; s < num_splits; s += kThreads) mx = fmaxf(mx, lse[s]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, off));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = mx;
  __syncthreads();
  mx = red[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) mx = fmaxf(mx, red[w]);
  const float* po = partial_out + row * num_splits * D;
  T* o = out + row * D;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    float acc = 0.0f, total = 0.0f;
    if (mx != -INFINITY) {
      for (int64_t s = 0; s < num_splits; ++s) {
        const float ls = lse[s];
        if (ls == -INFINITY) continue;
        const float w = exp2f(ls - mx);
        total += w;
        acc += w * po[s * D + d];
      }
    }
    o[d] = Cvt<T>::from(total > 0.0f ? acc / total : 0.0f);
  }
}

template <typename T, int DMAX>
void launch_split_d(const DecodeParams& p, int gt, unsigned grid, cudaStream_t stream) {
  switch (gt) {
    case 1:
      decode_split_kernel<T, DMAX, 1><<<grid, kThreads, 0, stream>>>(p);
      break;
    case 2:
      decode_split_kernel<T, DMAX, 2><<<grid, kThreads, 0, stream>>>(p);
      break;
    case 4:
      decode_split_kernel<T, DMAX, 4><<<grid, kThreads, 0, stream>>>(p);
      break;
    default:
      decode_split_kernel<T, DMAX, 8><<<grid, kThreads, 0, stream>>>(p);
  }
}

template <typename T>
void launch_decode(const DecodeParams& p, int gt, unsigned split_grid, unsigned merge_grid, cudaStream_t stream) {
  if (p.D <= 64) {
    launch_split_d<T, 64>(p, gt, split_grid, stream);
  } else if (p.D <= 128) {
    launch_split_d<T, 128>(p, gt, split_grid, stream);
  } else {
    launch_split_d<T, 256>(p, gt, split_grid, stream);
  }
  if (p.num_splits > 1) {
    decode_merge_kernel<T><<<merge_grid, kThreads, 0, stream>>>(p.partial_out, p.partial_lse, p.num_splits, p.D,
                                                                static_cast<T*>(p.out));
  }
}

}  // namespace

cudaError_t store_kv(const void* k, const void* v, int64_t stride_kt, int64_t stride_kh, int64_t stride_vt,
                     int64_t stride_vh, int64_t T, int64_t Hkv, int64_t D, int elem_bytes, int word_bytes,
                     const int64_t* slot_mapping, int64_t num_slots, void* k_cache, void* v_cache,
                     cudaStream_t stream) {
  if (T == 0 || Hkv == 0 || D == 0) return cudaSuccess;
  if (Hkv * D * elem_bytes > int64_t{2147483647}) return cudaErrorInvalidValue;  // a slot's words fit an int
  const int64_t e = elem_bytes;
  const int64_t row_bytes = D * e;
  const unsigned grid = static_cast<unsigned>(T < (int64_t{1} << 20) ? T : (int64_t{1} << 20));
  // word_bytes: the widest copy word every address allows (the glue picks it); one launch, typed by that word
  const auto launch = [&](auto word) {
    launch_store_kv<decltype(word)>(k, v, stride_kt * e, stride_kh * e, stride_vt * e, stride_vh * e, slot_mapping,
                                    T, num_slots, Hkv, row_bytes, k_cache, v_cache, grid, stream);
  };
  switch (word_bytes) {
    case 16: launch(uint4{}); break;
    case 8: launch(uint2{}); break;
    case 4: launch(uint32_t{}); break;
    case 2: launch(uint16_t{}); break;
    default: launch(uint8_t{});
  }
  return cudaGetLastError();
}

cudaError_t paged_decode_attention(const void* q, int64_t stride_qb, int64_t stride_qh, const void* k_cache,
                                   const void* v_cache, const int32_t* block_tables, int64_t stride_bt,
                                   const int32_t* context_lens, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                                   int64_t num_blocks, int64_t block_size, int64_t max_blocks, float softmax_scale,
                                   int64_t num_splits, int float_type, float* partial_out, float* partial_lse,
                                   void* out, cudaStream_t stream) {
  if (D < 1 || D > kMaxDecodeHeadDim || Hkv < 1 || Hq % Hkv != 0 || num_splits < 1) return cudaErrorInvalidValue;
  if (B == 0 || Hq == 0) return cudaSuccess;
  DecodeParams p{};
  p.q = q;
  p.stride_qb = stride_qb;
  p.stride_qh = stride_qh;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.block_tables = block_tables;
  p.stride_bt = stride_bt;
  p.context_lens = context_lens;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.D = D;
  p.num_blocks = num_blocks;
  p.block_size = block_size;
  p.capacity = max_blocks * block_size;
  if (p.capacity == 0) return cudaErrorInvalidValue;  // the glue returns zeros without launching
  p.group = Hq / Hkv;
  int gt = 1;
  while (gt < p.group && gt < 8) gt *= 2;
  p.head_chunks = (p.group + gt - 1) / gt;
  p.num_splits = decode_splits(num_splits, p.capacity);
  p.qk_scale = softmax_scale * kLog2e;
  const int64_t elem = float_type == kFloat32 ? 4 : 2;
  p.vec = (D * elem) % 16 == 0 && reinterpret_cast<uintptr_t>(k_cache) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(v_cache) % 16 == 0;
  p.partial_out = partial_out;
  p.partial_lse = partial_lse;
  p.out = out;
  const int64_t split_blocks = B * Hkv * p.head_chunks * p.num_splits, merge_blocks = B * Hq;
  if (split_blocks > kMaxGridX || merge_blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  const auto split_grid = static_cast<unsigned>(split_blocks), merge_grid = static_cast<unsigned>(merge_blocks);
  switch (float_type) {
    case kFloat16:
      launch_decode<__half>(p, gt, split_grid, merge_grid, stream);
      break;
    case kBFloat16:
      launch_decode<__nv_bfloat16>(p, gt, split_grid, merge_grid, stream);
      break;
    default:
      launch_decode<float>(p, gt, split_grid, merge_grid, stream);
  }
  return cudaGetLastError();
}

}  // namespace r4b::cuda
