// C++ CPU twin of csrc/cuda/paged_kv.cu: store_kv (scatter a step's keys and values into the paged KV cache)
// and paged_decode_attention (split-K decode attention, fp32 math, base-2 online softmax, then a merge of the
// splits by their log2-sum-exp, as the CUDA kernels do).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "r4b/cpu_kernels.h"

namespace r4b::cpu {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// IEEE binary16 <-> float. Decoding is exact (subnormals included); encoding rounds to nearest even, overflows
// to infinity, flushes below half the smallest subnormal to a signed zero and turns NaN into a quiet NaN.
float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float mag = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return bits_float(float_bits(mag) | sign);
  }
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e + 112) << 23) | (m << 13));
}

uint16_t float_to_half(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 (and inf): infinity
  if (a < 0x33000000u) return sign;             // <= 2^-25 (a tie with 0 rounds to even): zero
  const uint32_t e = a >> 23;
  if (e < 113) {  // a half subnormal: round (mantissa with its implicit bit) * 2^(e - 126) to an integer
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;  // may carry into the smallest normal: still right
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t r = ((e - 112) << 10) | ((a & 0x7fffffu) >> 13);
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry into the exponent is the right rounding
  return sign | static_cast<uint16_t>(r);
}

float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

uint16_t float_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>(((x >> 16) & 0x8000u) | 0x7fc0u);  // NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);  // round to nearest even
}

// Storage types: Elem::Raw is what the tensors hold, load/store convert to and from float.
struct F32 {
  using Raw = float;
  static float load(Raw x) { return x; }
  static Raw store(float x) { return x; }
};
struct F16 {
  using Raw = uint16_t;
  static float load(Raw x) { return half_to_float(x); }
  static Raw store(float x) { return float_to_half(x); }
};
struct BF16 {
  using Raw = uint16_t;
  static float load(Raw x) { return bf16_to_float(x); }
  static Raw store(float x) { return float_to_bf16(x); }
};

struct DecodeArgs {
  const void* q;
  int64_t stride_qb, stride_qh;
  const void *k_cache, *v_cache;
  const int32_t* block_tables;
  int64_t stride_bt;
  const int32_t* context_lens;
  int64_t B, Hq, Hkv, D, num_blocks, block_size, max_blocks;
  float softmax_scale;
  int64_t num_splits;
  void* out;
};

// One split of one (sequence, KV head): the online softmax over tokens [lo, hi) for the group's query heads
// (qf: group * D floats), writing each head's normalised partial output (po + g * po_stride) and log2-sum-exp.
template <typename E>
void decode_split(const DecodeArgs& a, int64_t b, int64_t h, int64_t lo, int64_t hi, const float* qf,
                  int64_t group, float qk_scale, float* po, int64_t po_stride, float* lse, int64_t lse_stride) {
  using Raw = typename E::Raw;
  const auto* kc = static_cast<const Raw*>(a.k_cache);
  const auto* vc = static_cast<const Raw*>(a.v_cache);
  const int64_t D = a.D;
  std::vector<float> m(group, kNegInf), l(group, 0.0f), acc(group * D, 0.0f), kf(D), vf(D);
  for (int64_t j = lo; j < hi; ++j) {
    const int32_t blk = a.block_tables[b * a.stride_bt + j / a.block_size];
    if (blk < 0 || blk >= a.num_blocks) continue;  // an invalid block id: the token is skipped
    const int64_t row = ((static_cast<int64_t>(blk) * a.block_size + j % a.block_size) * a.Hkv + h) * D;
    for (int64_t d = 0; d < D; ++d) {
      kf[d] = E::load(kc[row + d]);
      vf[d] = E::load(vc[row + d]);
    }
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf + g * D;
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += qg[d] * kf[d];
      const float s = dot * qk_scale;  // log2 units
      const float m_new = std::max(m[g], s);
      const float alpha = m[g] == kNegInf ? 0.0f : std::exp2(m[g] - m_new);
      const float p = std::exp2(s - m_new);
      l[g] = l[g] * alpha + p;
      float* ag = acc.data() + g * D;
      for (int64_t d = 0; d < D; ++d) ag[d] = ag[d] * alpha + p * vf[d];
      m[g] = m_new;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const bool nonempty = l[g] > 0.0f;  // an empty range (past the context, or skipped tokens only): 0, -inf
    const float inv = nonempty ? 1.0f / l[g] : 0.0f;
    for (int64_t d = 0; d < D; ++d) po[g * po_stride + d] = acc[g * D + d] * inv;
    lse[g * lse_stride] = nonempty ? m[g] + std::log2(l[g]) : kNegInf;
  }
}

template <typename E>
void decode(const DecodeArgs& a) {
  using Raw = typename E::Raw;
  const auto* q = static_cast<const Raw*>(a.q);
  auto* out = static_cast<Raw*>(a.out);
  const int64_t D = a.D, group = a.Hq / a.Hkv;
  const int64_t capacity = a.max_blocks * a.block_size;
  // each sequence's context in S ranges sized by its own length, as the CUDA kernel cuts it (there in whole tiles:
  // the same sums in another grouping); more splits than tokens of capacity only add empty ones, so S is capped
  // there (which bounds the partials' memory)
  const int64_t S = std::min(a.num_splits, capacity);
  const float qk_scale = a.softmax_scale * kLog2e;
  // per (sequence, KV head): the group's queries, then per split its partial outputs [S, group, D] and
  // log2-sum-exps [S, group], then the merge of the splits per query head
  std::vector<float> qf(group * D), po(S * group * D), lse(S * group);
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t ctx = std::min<int64_t>(std::max<int64_t>(a.context_lens[b], 0), capacity);
    for (int64_t h = 0; h < a.Hkv; ++h) {
      for (int64_t g = 0; g < group; ++g) {
        const Raw* qrow = q + b * a.stride_qb + (h * group + g) * a.stride_qh;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = E::load(qrow[d]);
      }
      for (int64_t s = 0; s < S; ++s) {
        const int64_t part = (ctx + S - 1) / S;
        const int64_t lo = std::min(s * part, ctx), hi = std::min(lo + part, ctx);
        decode_split<E>(a, b, h, lo, hi, qf.data(), group, qk_scale, po.data() + s * group * D, D,
                        lse.data() + s * group, 1);
      }
      for (int64_t g = 0; g < group; ++g) {
        float mx = kNegInf;
        for (int64_t s = 0; s < S; ++s) mx = std::max(mx, lse[s * group + g]);
        Raw* o = out + (b * a.Hq + h * group + g) * D;
        if (mx == kNegInf) {  // an empty context
          for (int64_t d = 0; d < D; ++d) o[d] = E::store(0.0f);
          continue;
        }
        float total = 0.0f;
        std::vector<float> acc(D, 0.0f);
        for (int64_t s = 0; s < S; ++s) {
          const float ls = lse[s * group + g];
          if (ls == kNegInf) continue;
          const float w = std::exp2(ls - mx);
          total += w;
          const float* p = po.data() + (s * group + g) * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += w * p[d];
        }
        for (int64_t d = 0; d < D; ++d) o[d] = E::store(acc[d] / total);
      }
    }
  }
}

}  // namespace

void store_kv(const void* k, const void* v, int64_t stride_kt, int64_t stride_kh, int64_t stride_vt,
              int64_t stride_vh, int64_t T, int64_t Hkv, int64_t D, int64_t elem_bytes, const int64_t* slot_mapping,
              int64_t num_slots, void* k_cache, void* v_cache) {
  const auto* ks = static_cast<const char*>(k);
  const auto* vs = static_cast<const char*>(v);
  auto* kc = static_cast<char*>(k_cache);
  auto* vc = static_cast<char*>(v_cache);
  const auto row = static_cast<size_t>(D * elem_bytes);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0 || slot >= num_slots) continue;  // -1 skips; anything else out of range is never written
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t dst = (slot * Hkv + h) * D * elem_bytes;
      std::memcpy(kc + dst, ks + (t * stride_kt + h * stride_kh) * elem_bytes, row);
      std::memcpy(vc + dst, vs + (t * stride_vt + h * stride_vh) * elem_bytes, row);
    }
  }
}

void paged_decode_attention(const void* q, int64_t stride_qb, int64_t stride_qh, const void* k_cache,
                            const void* v_cache, const int32_t* block_tables, int64_t stride_bt,
                            const int32_t* context_lens, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                            int64_t num_blocks, int64_t block_size, int64_t max_blocks, float softmax_scale,
                            int64_t num_splits, int float_type, void* out) {
  const DecodeArgs a{q,       stride_qb, stride_qh,  k_cache,    v_cache,       block_tables, stride_bt,
                     context_lens, B,    Hq,         Hkv,        D,             num_blocks,   block_size,
                     max_blocks,   softmax_scale,    num_splits < 1 ? 1 : num_splits, out};
  if (B == 0 || Hq == 0 || D == 0) return;
  if (max_blocks * block_size == 0) {
    std::memset(out, 0, static_cast<size_t>(B * Hq * D * (float_type == kFloat32 ? 4 : 2)));
    return;
  }
  switch (float_type) {
    case kFloat16:
      decode<F16>(a);
      break;
    case kBFloat16:
      decode<BF16>(a);
      break;
    default:
      decode<F32>(a);
  }
}

}  // namespace r4b::cpu
