// CUDA kernels of the r4b ops (built only when R4B_WITH_CUDA): input checks, workspace and device-side
// bookkeeping with ATen, then the C-style launchers of csrc/cuda/*.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.h"
#include "r4b/cpu_kernels.h"
#include "r4b/cuda_launchers.h"

static_assert(r4b::cuda::kFloat32 == r4b::cpu::kFloat32 && r4b::cuda::kFloat16 == r4b::cpu::kFloat16 &&
                  r4b::cuda::kBFloat16 == r4b::cpu::kBFloat16,
              "the paged-KV element type codes of the CPU and CUDA kernels (and float_type_code) agree");

namespace r4b::ops {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

at::Tensor group_advantages_cuda(const at::Tensor& rewards, const at::Tensor& group_ids, c10::string_view scale,
                                 double eps) {
  check_group_advantages(rewards, group_ids);
  const int code = scale_code(std::string(scale));
  const c10::cuda::CUDAGuard guard(rewards.device());
  auto r = rewards.contiguous();
  auto out = at::empty_like(r);
  const int64_t n = r.size(0);
  if (n == 0) return out;
  auto [uniq, inverse, counts] = at::_unique2(group_ids.contiguous(), /*sorted=*/true, /*return_inverse=*/true,
                                              /*return_counts=*/true);
  const int64_t G = uniq.size(0);
  auto perm = at::argsort(inverse, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto offsets = at::zeros({G + 1}, inverse.options());
  offsets.slice(0, 1).copy_(counts.cumsum(0));
  auto workspace = at::empty({3 * G + 2}, r.options().dtype(at::kDouble));
  check_launch(r4b::cuda::group_advantages(r.data_ptr<float>(), inverse.data_ptr<int64_t>(),
                                           perm.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), n, G, code,
                                           static_cast<float>(eps), workspace.data_ptr<double>(),
                                           out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "r4b group_advantages kernel");
  return out;
}

int copy_word(int64_t row_bytes, const std::vector<uintptr_t>& ptrs) {
  for (int w : {8, 4, 2}) {
    bool ok = row_bytes % w == 0;
    for (auto p : ptrs) ok = ok && (p % w == 0);
    if (ok) return w;
  }
  return 1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack_cuda(at::TensorList seqs_in) {
  const auto seqs = contiguous_all(seqs_in);
  int64_t row_bytes = 0;
  const auto offsets = check_pack(seqs, &row_bytes);
  const c10::cuda::CUDAGuard guard(seqs[0].device());
  const int64_t n = static_cast<int64_t>(seqs.size()), total = offsets.back();
  auto [flat, position_ids, seq_ids] = alloc_pack(seqs[0], total);
  // the sequences' addresses and row offsets go to the device in one non-blocking copy from pinned memory (a
  // pageable host tensor's .to(device) would synchronise the stream); cu_seqlens is derived on the device
  auto buf_h = at::empty({2 * n + 1}, at::TensorOptions().dtype(at::kLong).device(at::kCPU).pinned_memory(true));
  auto* b = buf_h.data_ptr<int64_t>();
  std::vector<uintptr_t> addrs{reinterpret_cast<uintptr_t>(flat.data_ptr())};
  for (int64_t i = 0; i < n; ++i) {
    b[i] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(seqs[i].data_ptr()));
    addrs.push_back(reinterpret_cast<uintptr_t>(seqs[i].data_ptr()));
  }
  for (int64_t i = 0; i <= n; ++i) b[n + i] = offsets[i];
  auto buf_d = at::empty({2 * n + 1}, at::TensorOptions().dtype(at::kLong).device(seqs[0].device()));
  buf_d.copy_(buf_h, /*non_blocking=*/true);  // the caching host allocator keeps buf_h until the copy is done
  auto ptrs_d = buf_d.slice(0, 0, n);
  auto offs_d = buf_d.slice(0, n, 2 * n + 1);
  auto cu_d = offs_d.to(at::kInt);
  check_launch(r4b::cuda::pack(reinterpret_cast<const void* const*>(ptrs_d.data_ptr<int64_t>()),
                               offs_d.data_ptr<int64_t>(), n, row_bytes, copy_word(row_bytes, addrs), flat.data_ptr(),
                               position_ids.data_ptr<int64_t>(), seq_ids.data_ptr<int32_t>(),
                               c10::cuda::getCurrentCUDAStream()),
               "r4b pack kernel");
  return {flat, cu_d, position_ids, seq_ids};
}

at::Tensor unpack_padded_cuda(const at::Tensor& flat_in, const at::Tensor& cu_in, int64_t max_seqlen,
                              const at::Scalar& pad_value) {
  check_unpack_padded(flat_in, cu_in, max_seqlen);
  const c10::cuda::CUDAGuard guard(flat_in.device());
  auto flat = flat_in.contiguous();
  auto cu = cu_in.contiguous();
  const int64_t n = cu.size(0) - 1;
  // the kernel trusts these values (they index flat): check them on the host as the CPU op does (one small
  // device-to-host copy; the Python wrapper reads cu_seqlens on the host too)
  const auto cu_host = cu.to(at::kCPU);
  check_cu_values(cu_host.data_ptr<int32_t>(), n, flat.size(0));
  auto out = alloc_padded(flat, n, max_seqlen, pad_value);
  const int64_t row_bytes = row_bytes_of(flat);
  const std::vector<uintptr_t> addrs{reinterpret_cast<uintptr_t>(flat.data_ptr()),
                                     reinterpret_cast<uintptr_t>(out.data_ptr())};
  check_launch(r4b::cuda::unpack_padded(flat.data_ptr(), cu.data_ptr<int32_t>(), n, max_seqlen, row_bytes,
                                        copy_word(row_bytes, addrs), out.data_ptr(),
                                        c10::cuda::getCurrentCUDAStream()),
               "r4b unpack_padded kernel");
  return out;
}

void store_kv_cuda(const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& k_cache,
                   const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_store_kv(k_in, v_in, k_cache, v_cache, slot_mapping);
  const int64_t T = k_in.size(0);
  if (T == 0) return;
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const auto k = unit_last_stride(k_in);
  const auto v = unit_last_stride(v_in);
  const auto slots = slot_mapping.contiguous();
  const int64_t Hkv = k.size(1), D = k.size(2), e = k.element_size();
  TORCH_CHECK_VALUE(Hkv * D * e <= int64_t{2147483647}, "store_kv: a cache slot of Hkv=", Hkv, " x D=", D,
                    " elements is too large (2^31 bytes at most)");
  // the copy word divides every row, stride and address (a view of a fused projection may be only 2-aligned)
  int word = 16;
  const std::vector<uintptr_t> addrs{
      reinterpret_cast<uintptr_t>(k.data_ptr()), reinterpret_cast<uintptr_t>(v.data_ptr()),
      reinterpret_cast<uintptr_t>(k_cache.data_ptr()), reinterpret_cast<uintptr_t>(v_cache.data_ptr())};
  const int64_t sizes[] = {D * e, k.stride(0) * e, k.stride(1) * e, v.stride(0) * e, v.stride(1) * e};
  const auto fits = [&](int w) {
    for (auto a : addrs) {
      if (a % w != 0) return false;
    }
    for (auto n : sizes) {
      if (n % w != 0) return false;
    }
    return true;
  };
  while (word > 1 && !fits(word)) word /= 2;
  check_launch(r4b::cuda::store_kv(k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), v.stride(0), v.stride(1), T,
                                   Hkv, D, static_cast<int>(e), word, slots.data_ptr<int64_t>(),
                                   k_cache.size(0) * k_cache.size(1), k_cache.data_ptr(), v_cache.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream()),
               "r4b store_kv kernel");
}

at::Tensor paged_decode_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& block_tables_in, const at::Tensor& context_lens_in,
                                       double softmax_scale, int64_t num_splits) {
  check_paged_decode(q_in, k_cache, v_cache, block_tables_in, context_lens_in, softmax_scale, num_splits);
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2), max_blocks = block_tables_in.size(1);
  TORCH_CHECK_VALUE(D <= r4b::cuda::kMaxDecodeHeadDim, "paged_decode_attention's CUDA kernel takes head dims up to ",
                    r4b::cuda::kMaxDecodeHeadDim, ", got D=", D);
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto out = at::empty({B, Hq, D}, q_in.options());
  if (B == 0) return out;
  if (max_blocks == 0) return out.zero_();
  const int64_t block_size = k_cache.size(1);
  const int64_t splits = r4b::cuda::decode_splits(num_splits, max_blocks * block_size);
  TORCH_CHECK_VALUE(B * Hq * splits <= r4b::cuda::kMaxGridX, "paged_decode_attention: B=", B, " x Hq=", Hq,
                    " x num_splits=", splits, " exceeds the kernel's grid (2^31 - 1 blocks)");
  const auto q = unit_last_stride(q_in);
  const auto bt = unit_last_stride(block_tables_in);
  const auto cl = context_lens_in.contiguous();
  at::Tensor partial_out, partial_lse;  // fp32 workspace of the split-K partials (no sync: sized from the shapes)
  if (splits > 1) {
    partial_out = at::empty({B * Hq * splits * D}, q.options().dtype(at::kFloat));
    partial_lse = at::empty({B * Hq * splits}, q.options().dtype(at::kFloat));
  }
  check_launch(r4b::cuda::paged_decode_attention(
                   q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
                   bt.data_ptr<int32_t>(), bt.stride(0), cl.data_ptr<int32_t>(), B, Hq, k_cache.size(2), D,
                   k_cache.size(0), block_size, max_blocks, static_cast<float>(softmax_scale), num_splits,
                   float_type_code(q), splits > 1 ? partial_out.data_ptr<float>() : nullptr,
                   splits > 1 ? partial_lse.data_ptr<float>() : nullptr, out.data_ptr(),
                   c10::cuda::getCurrentCUDAStream()),
               "r4b paged_decode_attention kernel");
  return out;
}

}  // namespace

std::vector<std::string> cuda_op_names() {
  return {"group_advantages", "pack", "unpack_padded", "store_kv", "paged_decode_attention"};
}

}  // namespace r4b::ops

TORCH_LIBRARY_IMPL(r4b, CUDA, m) {
  m.impl("group_advantages", &r4b::ops::group_advantages_cuda);
  m.impl("pack", &r4b::ops::pack_cuda);
  m.impl("unpack_padded", &r4b::ops::unpack_padded_cuda);
  m.impl("store_kv", &r4b::ops::store_kv_cuda);
  m.impl("paged_decode_attention", &r4b::ops::paged_decode_attention_cuda);
}
