// Shared input checks of the torch glue (the Python public functions validate first; these guard direct
// torch.ops.r4b.* calls). TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface as ValueError / TypeError in Python.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace r4b::ops {

inline int scale_code(const std::string& scale) {
  if (scale == "group") return 0;
  if (scale == "batch") return 1;
  if (scale == "none") return 2;
  TORCH_CHECK_VALUE(false, "scale must be one of ('group', 'batch', 'none'), got '", scale, "'");
  return -1;
}

inline void check_group_advantages(const at::Tensor& rewards, const at::Tensor& group_ids) {
  TORCH_CHECK_TYPE(rewards.scalar_type() == at::kFloat, "rewards must be float32, got ", rewards.scalar_type());
  TORCH_CHECK_TYPE(group_ids.scalar_type() == at::kLong, "group_ids must be int64, got ", group_ids.scalar_type());
  TORCH_CHECK_VALUE(rewards.dim() == 1, "rewards must be 1-D, got shape ", rewards.sizes());
  TORCH_CHECK_VALUE(group_ids.dim() == 1 && group_ids.size(0) == rewards.size(0),
                    "group_ids must be 1-D with as many entries as rewards (", rewards.size(0), "), got shape ",
                    group_ids.sizes());
  TORCH_CHECK_VALUE(rewards.device() == group_ids.device(), "rewards is on ", rewards.device(),
                    " but group_ids is on ", group_ids.device());
}

// The values of cu_seqlens (n+1 int32 on the host): 0, non-decreasing, ending at total (the rows of flat).
inline void check_cu_values(const int32_t* c, int64_t n, int64_t total) {
  TORCH_CHECK_VALUE(c[0] == 0, "cu_seqlens must start at 0, got ", c[0]);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(c[i + 1] >= c[i], "cu_seqlens must be non-decreasing, got cu_seqlens[", i, "]=", c[i],
                      " > cu_seqlens[", i + 1, "]=", c[i + 1]);
  }
  TORCH_CHECK_VALUE(c[n] == total, "cu_seqlens must end at flat's length ", total, ", got ", c[n]);
}

// Bytes of one row (everything after dim 0) of t.
inline int64_t row_bytes_of(const at::Tensor& t) {
  int64_t row = t.element_size();
  for (int64_t d = 1; d < t.dim(); ++d) row *= t.size(d);
  return row;
}

inline std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

// Checks the sequences of pack() and returns the row offsets (n+1) and the bytes of one row.
inline std::vector<int64_t> check_pack(const std::vector<at::Tensor>& seqs, int64_t* row_bytes) {
  TORCH_CHECK_VALUE(!seqs.empty(), "seqs must hold at least one sequence, got an empty list");
  const auto& t0 = seqs[0];
  TORCH_CHECK_VALUE(t0.dim() >= 1, "seqs[0] must have at least one dimension, got a scalar");
  std::vector<int64_t> offsets(seqs.size() + 1, 0);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const auto& t = seqs[i];
    TORCH_CHECK_TYPE(t.scalar_type() == t0.scalar_type(), "seqs[", i, "] has dtype ", t.scalar_type(),
                     " but seqs[0] has ", t0.scalar_type());
    TORCH_CHECK_VALUE(t.device() == t0.device(), "seqs[", i, "] is on ", t.device(), " but seqs[0] is on ",
                      t0.device());
    TORCH_CHECK_VALUE(t.dim() == t0.dim() && t.sizes().slice(1) == t0.sizes().slice(1), "seqs[", i,
                      "] has shape ", t.sizes(), ", whose trailing dimensions differ from seqs[0]'s ", t0.sizes());
    TORCH_CHECK_VALUE(t.size(0) > 0, "seqs[", i, "] is empty (length 0); every sequence needs at least one token");
    offsets[i + 1] = offsets[i] + t.size(0);
  }
  TORCH_CHECK_VALUE(offsets.back() < (int64_t{1} << 31), "the packed length ", offsets.back(),
                    " does not fit cu_seqlens' int32");
  *row_bytes = row_bytes_of(t0);
  return offsets;
}

// The outputs of pack() other than cu_seqlens, allocated like the sequences (t0 is seqs[0]).
struct PackBuffers {
  at::Tensor flat, position_ids, seq_ids;
};
inline PackBuffers alloc_pack(const at::Tensor& t0, int64_t total) {
  std::vector<int64_t> shape(t0.sizes().begin(), t0.sizes().end());
  shape[0] = total;
  return {at::empty(shape, t0.options()), at::empty({total}, t0.options().dtype(at::kLong)),
          at::empty({total}, t0.options().dtype(at::kInt))};
}

// The [n, max_seqlen, ...] output of unpack_padded(), filled with pad_value.
inline at::Tensor alloc_padded(const at::Tensor& flat, int64_t n, int64_t max_seqlen, const at::Scalar& pad_value) {
  std::vector<int64_t> shape(flat.sizes().begin(), flat.sizes().end());
  shape[0] = max_seqlen;
  shape.insert(shape.begin(), n);
  return at::full(shape, pad_value, flat.options());
}

inline void check_unpack_padded(const at::Tensor& flat, const at::Tensor& cu_seqlens, int64_t max_seqlen) {
  TORCH_CHECK_VALUE(flat.dim() >= 1, "flat must have at least one dimension, got a scalar");
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must be int32, got ", cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, "cu_seqlens must be 1-D with n+1 >= 1 entries, got shape ",
                    cu_seqlens.sizes());
  TORCH_CHECK_VALUE(cu_seqlens.device() == flat.device(), "cu_seqlens is on ", cu_seqlens.device(),
                    " but flat is on ", flat.device());
  TORCH_CHECK_VALUE(max_seqlen >= 0, "max_seqlen must be >= 0, got ", max_seqlen);
}

// ---- paged KV cache (store_kv, paged_decode_attention) ----

// The element type code of the paged-KV kernels (r4b::cpu::FloatType, r4b::cuda::FloatType); t's dtype is
// checked to be one of the three.
inline int float_type_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return 1;
    case at::kBFloat16:
      return 2;
    default:
      return 0;
  }
}

// A (num_blocks, block_size, Hkv, D) contiguous float cache (written in place, so never copied).
inline void check_kv_cache(const at::Tensor& cache, const char* name) {
  const auto t = cache.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK_VALUE(cache.dim() == 4, name, " must be 4-D (num_blocks, block_size, Hkv, D), got shape ",
                    cache.sizes());
  TORCH_CHECK_VALUE(cache.size(0) >= 1 && cache.size(1) >= 1 && cache.size(2) >= 1 && cache.size(3) >= 1, name,
                    " must be (num_blocks, block_size, Hkv, D) with every size >= 1, got shape ", cache.sizes());
  TORCH_CHECK_VALUE(cache.is_contiguous(), name, " must be contiguous (it is used in place), got strides ",
                    cache.strides(), " for shape ", cache.sizes());
}

inline void check_kv_caches(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_kv_cache(k_cache, "k_cache");
  check_kv_cache(v_cache, "v_cache");
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ", k_cache.sizes(),
                    ", got ", v_cache.sizes());
  TORCH_CHECK_TYPE(v_cache.scalar_type() == k_cache.scalar_type(), "v_cache must have k_cache's dtype ",
                   k_cache.scalar_type(), ", got ", v_cache.scalar_type());
  TORCH_CHECK_VALUE(v_cache.device() == k_cache.device(), "v_cache is on ", v_cache.device(), " but k_cache is on ",
                    k_cache.device());
}

// t itself when its last stride is 1 (the kernels take the other strides), else a contiguous copy.
inline at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

inline void check_store_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_kv_caches(k_cache, v_cache);
  const auto check_step = [&k_cache](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == k_cache.scalar_type(), name, " must have the caches' dtype ",
                     k_cache.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 3 && t.size(1) == k_cache.size(2) && t.size(2) == k_cache.size(3), name,
                      " must be (T, Hkv, D) with the caches' Hkv=", k_cache.size(2), " and D=", k_cache.size(3),
                      ", got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == k_cache.device(), name, " is on ", t.device(), " but k_cache is on ",
                      k_cache.device());
  };
  check_step(k, "k");
  check_step(v, "v");
  TORCH_CHECK_VALUE(v.size(0) == k.size(0), "v must have k's ", k.size(0), " tokens, got shape ", v.sizes());
  TORCH_CHECK_TYPE(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64, got ",
                   slot_mapping.scalar_type());
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0),
                    "slot_mapping must be 1-D with one slot per token of k (", k.size(0), "), got shape ",
                    slot_mapping.sizes());
  TORCH_CHECK_VALUE(slot_mapping.device() == k_cache.device(), "slot_mapping is on ", slot_mapping.device(),
                    " but k_cache is on ", k_cache.device());
}

inline void check_paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables, const at::Tensor& context_lens, double softmax_scale,
                               int64_t num_splits) {
  check_kv_caches(k_cache, v_cache);
  TORCH_CHECK_TYPE(q.scalar_type() == k_cache.scalar_type(), "q must have the caches' dtype ",
                   k_cache.scalar_type(), ", got ", q.scalar_type());
  const int64_t Hkv = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK_VALUE(q.dim() == 3 && q.size(2) == D && q.size(1) >= 1 && q.size(1) % Hkv == 0,
                    "q must be (B, Hq, D) with the caches' D=", D, " and Hq a multiple of their Hkv=", Hkv,
                    ", got shape ", q.sizes());
  TORCH_CHECK_VALUE(q.device() == k_cache.device(), "q is on ", q.device(), " but k_cache is on ", k_cache.device());
  TORCH_CHECK_TYPE(block_tables.scalar_type() == at::kInt, "block_tables must be int32, got ",
                   block_tables.scalar_type());
  TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.size(0) == q.size(0),
                    "block_tables must be 2-D (B, max_blocks) with q's B=", q.size(0), " rows, got shape ",
                    block_tables.sizes());
  TORCH_CHECK_VALUE(block_tables.device() == q.device(), "block_tables is on ", block_tables.device(),
                    " but q is on ", q.device());
  TORCH_CHECK_TYPE(context_lens.scalar_type() == at::kInt, "context_lens must be int32, got ",
                   context_lens.scalar_type());
  TORCH_CHECK_VALUE(context_lens.dim() == 1 && context_lens.size(0) == q.size(0),
                    "context_lens must be 1-D with q's B=", q.size(0), " entries, got shape ", context_lens.sizes());
  TORCH_CHECK_VALUE(context_lens.device() == q.device(), "context_lens is on ", context_lens.device(),
                    " but q is on ", q.device());
  TORCH_CHECK_VALUE(softmax_scale > 0, "softmax_scale must be > 0, got ", softmax_scale);
  TORCH_CHECK_VALUE(num_splits >= 1, "num_splits must be >= 1, got ", num_splits);
}

}  // namespace r4b::ops
