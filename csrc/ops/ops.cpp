// The r4b._C module: op schemas (TORCH_LIBRARY(r4b)), their CPU kernels (calling the C++ twins in csrc/cpu/)
// and a small pybind11 surface telling Python which ops this build has. CUDA kernels: ops_cuda.cpp.
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include "common.h"
#include "r4b/cpu_kernels.h"

namespace r4b::ops {
namespace {

at::Tensor group_advantages_cpu(const at::Tensor& rewards, const at::Tensor& group_ids, c10::string_view scale,
                                double eps) {
  check_group_advantages(rewards, group_ids);
  const int code = scale_code(std::string(scale));
  auto r = rewards.contiguous();
  auto g = group_ids.contiguous();
  auto out = at::empty_like(r);
  r4b::cpu::group_advantages(r.data_ptr<float>(), g.data_ptr<int64_t>(), r.size(0), code, static_cast<float>(eps),
                             out.data_ptr<float>());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack_cpu(at::TensorList seqs_in) {
  const auto seqs = contiguous_all(seqs_in);
  int64_t row_bytes = 0;
  const auto offsets = check_pack(seqs, &row_bytes);
  const int64_t n = static_cast<int64_t>(seqs.size()), total = offsets.back();
  auto [flat, position_ids, seq_ids] = alloc_pack(seqs[0], total);
  auto cu = at::empty({n + 1}, seqs[0].options().dtype(at::kInt));
  std::vector<const void*> srcs(seqs.size());
  for (size_t i = 0; i < seqs.size(); ++i) srcs[i] = seqs[i].data_ptr();
  auto* cu_ptr = cu.data_ptr<int32_t>();
  for (int64_t i = 0; i <= n; ++i) cu_ptr[i] = static_cast<int32_t>(offsets[i]);
  r4b::cpu::pack(srcs.data(), offsets.data(), n, row_bytes, flat.data_ptr(), position_ids.data_ptr<int64_t>(),
                 seq_ids.data_ptr<int32_t>());
  return {flat, cu, position_ids, seq_ids};
}

at::Tensor unpack_padded_cpu(const at::Tensor& flat_in, const at::Tensor& cu_in, int64_t max_seqlen,
                             const at::Scalar& pad_value) {
  check_unpack_padded(flat_in, cu_in, max_seqlen);
  auto flat = flat_in.contiguous();
  auto cu = cu_in.contiguous();
  const int64_t n = cu.size(0) - 1;
  const auto* c = cu.data_ptr<int32_t>();
  check_cu_values(c, n, flat.size(0));
  auto out = alloc_padded(flat, n, max_seqlen, pad_value);
  r4b::cpu::unpack_padded(flat.data_ptr(), c, n, max_seqlen, row_bytes_of(flat), out.data_ptr());
  return out;
}

void store_kv_cpu(const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_store_kv(k_in, v_in, k_cache, v_cache, slot_mapping);
  const int64_t T = k_in.size(0);
  if (T == 0) return;
  const auto k = unit_last_stride(k_in);
  const auto v = unit_last_stride(v_in);
  const auto slots = slot_mapping.contiguous();
  r4b::cpu::store_kv(k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), v.stride(0), v.stride(1), T, k.size(1),
                     k.size(2), k.element_size(), slots.data_ptr<int64_t>(), k_cache.size(0) * k_cache.size(1),
                     k_cache.data_ptr(), v_cache.data_ptr());
}

at::Tensor paged_decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& block_tables_in, const at::Tensor& context_lens_in,
                                      double softmax_scale, int64_t num_splits) {
  check_paged_decode(q_in, k_cache, v_cache, block_tables_in, context_lens_in, softmax_scale, num_splits);
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2), max_blocks = block_tables_in.size(1);
  auto out = at::empty({B, Hq, D}, q_in.options());
  if (B == 0) return out;
  if (max_blocks == 0) return out.zero_();
  const auto q = unit_last_stride(q_in);
  const auto bt = unit_last_stride(block_tables_in);
  const auto cl = context_lens_in.contiguous();
  r4b::cpu::paged_decode_attention(q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
                                   bt.data_ptr<int32_t>(), bt.stride(0), cl.data_ptr<int32_t>(), B, Hq,
                                   k_cache.size(2), D, k_cache.size(0), k_cache.size(1), max_blocks,
                                   static_cast<float>(softmax_scale), num_splits, float_type_code(q), out.data_ptr());
  return out;
}

}  // namespace
}  // namespace r4b::ops

TORCH_LIBRARY(r4b, m) {
  m.def("group_advantages(Tensor rewards, Tensor group_ids, str scale='group', float eps=1e-6) -> Tensor");
  m.def("pack(Tensor[] seqs) -> (Tensor flat, Tensor cu_seqlens, Tensor position_ids, Tensor seq_ids)");
  m.def("unpack_padded(Tensor flat, Tensor cu_seqlens, int max_seqlen, Scalar pad_value=0) -> Tensor");
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
      "float softmax_scale, int num_splits) -> Tensor");
}

TORCH_LIBRARY_IMPL(r4b, CPU, m) {
  m.impl("group_advantages", &r4b::ops::group_advantages_cpu);
  m.impl("pack", &r4b::ops::pack_cpu);
  m.impl("unpack_padded", &r4b::ops::unpack_padded_cpu);
  m.impl("store_kv", &r4b::ops::store_kv_cpu);
  m.impl("paged_decode_attention", &r4b::ops::paged_decode_attention_cpu);
}

namespace r4b::ops {
std::vector<std::string> cuda_op_names();  // defined in ops_cuda.cpp (CUDA builds) or below
}

#ifndef R4B_WITH_CUDA
std::vector<std::string> r4b::ops::cuda_op_names() { return {}; }
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "r4b compiled ops; importing registers torch.ops.r4b.*";
  m.def(
      "cpu_ops",
      []() {
        return std::vector<std::string>{"group_advantages", "pack", "unpack_padded", "store_kv",
                                        "paged_decode_attention"};
      },
      "ops with a C++ CPU kernel in this build");
  m.def("cuda_ops", &r4b::ops::cuda_op_names, "ops with a CUDA kernel in this build (empty without CUDA)");
#ifdef R4B_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
