// CUDA kernels of the r4b ops (built only when R4B_WITH_CUDA): input checks, workspace and device-side
// bookkeeping with ATen, then the C-style launchers of csrc/cuda/*.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.h"
#include "r4b/cuda_launchers.h"

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

}  // namespace

std::vector<std::string> cuda_op_names() { return {"group_advantages", "pack", "unpack_padded"}; }

}  // namespace r4b::ops

TORCH_LIBRARY_IMPL(r4b, CUDA, m) {
  m.impl("group_advantages", &r4b::ops::group_advantages_cuda);
  m.impl("pack", &r4b::ops::pack_cuda);
  m.impl("unpack_padded", &r4b::ops::unpack_padded_cuda);
}
