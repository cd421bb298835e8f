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

}  // namespace r4b::ops
