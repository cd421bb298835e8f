// Group-relative advantages on the GPU, deterministic (fixed reduction order, no atomics).
// One block per group reduces its rewards (via the group-sorted permutation prepared by the glue) in double
// precision; one block reduces the batch statistics; an elementwise kernel writes the advantages.
#include <cub/block/block_reduce.cuh>

#include "r4b/cuda_launchers.h"

namespace r4b::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kScaleGroup = 0, kScaleBatch = 1;

struct MinMax {
  double lo, hi;
};
struct MinMaxOp {
  __device__ MinMax operator()(const MinMax& a, const MinMax& b) const {
    return {a.lo < b.lo ? a.lo : b.lo, a.hi > b.hi ? a.hi : b.hi};
  }
};

// workspace layout: mean[G] | denom[G] | degenerate[G] | batch_std | unused
__global__ void group_stats_kernel(const float* __restrict__ rewards, const int64_t* __restrict__ perm,
                                   const int64_t* __restrict__ offsets, int64_t G, int scale, float eps,
                                   double* __restrict__ ws) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  using ReduceMM = cub::BlockReduce<MinMax, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ typename ReduceMM::TempStorage tmp_mm;
  __shared__ double s_mean;
  const int64_t g = blockIdx.x;
  const int64_t start = offsets[g], end = offsets[g + 1], cnt = end - start;
  double sum = 0.0;
  MinMax mm{INFINITY, -INFINITY};
  for (int64_t j = start + threadIdx.x; j < end; j += kThreads) {
    const double r = rewards[perm[j]];
    sum += r;
    mm.lo = fmin(mm.lo, r);
    mm.hi = fmax(mm.hi, r);
  }
  const double total = Reduce(tmp).Sum(sum);
  __syncthreads();
  const MinMax all = ReduceMM(tmp_mm).Reduce(mm, MinMaxOp());
  if (threadIdx.x == 0) s_mean = total / static_cast<double>(cnt);
  __syncthreads();
  const double mean = s_mean;
  double ss = 0.0;
  for (int64_t j = start + threadIdx.x; j < end; j += kThreads) {
    const double d = rewards[perm[j]] - mean;
    ss += d * d;
  }
  const double ss_total = Reduce(tmp).Sum(ss);
  if (threadIdx.x == 0) {
    ws[g] = mean;
    ws[G + g] = scale == kScaleGroup ? sqrt(ss_total / static_cast<double>(cnt > 1 ? cnt - 1 : 1)) + eps : 1.0;
    ws[2 * G + g] = (cnt < 2 || all.lo == all.hi) ? 1.0 : 0.0;
  }
}

__global__ void batch_std_kernel(const float* __restrict__ rewards, int64_t n, float eps, double* __restrict__ out) {
  using Reduce = cub::BlockReduce<double, 1024>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ double s_mean;
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += 1024) sum += rewards[i];
  const double total = Reduce(tmp).Sum(sum);
  if (threadIdx.x == 0) s_mean = total / static_cast<double>(n);
  __syncthreads();
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += 1024) {
    const double d = rewards[i] - s_mean;
    ss += d * d;
  }
  const double ss_total = Reduce(tmp).Sum(ss);
  if (threadIdx.x == 0) *out = (n > 1 ? sqrt(ss_total / static_cast<double>(n - 1)) : 0.0) + eps;
}

__global__ void advantages_kernel(const float* __restrict__ rewards, const int64_t* __restrict__ inverse, int64_t n,
                                  int64_t G, int scale, const double* __restrict__ ws, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t g = inverse[i];
  if (ws[2 * G + g] != 0.0) {
    out[i] = 0.0f;
    return;
  }
  const double denom = scale == kScaleBatch ? ws[3 * G] : ws[G + g];
  out[i] = static_cast<float>((rewards[i] - ws[g]) / denom);
}

}  // namespace

cudaError_t group_advantages(const float* rewards, const int64_t* inverse, const int64_t* perm,
                             const int64_t* offsets, int64_t n, int64_t G, int scale, float eps, double* workspace,
                             float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  group_stats_kernel<<<static_cast<unsigned>(G), kThreads, 0, stream>>>(rewards, perm, offsets, G, scale, eps,
                                                                        workspace);
  if (scale == kScaleBatch) batch_std_kernel<<<1, 1024, 0, stream>>>(rewards, n, eps, workspace + 3 * G);
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  advantages_kernel<<<blocks, kThreads, 0, stream>>>(rewards, inverse, n, G, scale, workspace, out);
  return cudaGetLastError();
}

}  // namespace r4b::cuda
