// C++ CPU twin of csrc/cuda/group_advantages.cu: group-relative advantages in double precision.
#include <cmath>
#include <limits>
#include <unordered_map>
#include <vector>

#include "r4b/cpu_kernels.h"

namespace r4b::cpu {

void group_advantages(const float* rewards, const int64_t* group_ids, int64_t n, int scale, float eps, float* out) {
  std::unordered_map<int64_t, int64_t> dense;
  dense.reserve(static_cast<size_t>(n));
  std::vector<int64_t> g(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    auto it = dense.try_emplace(group_ids[i], static_cast<int64_t>(dense.size())).first;
    g[i] = it->second;
  }
  const size_t G = dense.size();
  std::vector<double> sum(G, 0.0), ss(G, 0.0), mn(G, std::numeric_limits<double>::infinity()),
      mx(G, -std::numeric_limits<double>::infinity());
  std::vector<int64_t> cnt(G, 0);
  double bsum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double r = rewards[i];
    sum[g[i]] += r;
    cnt[g[i]] += 1;
    mn[g[i]] = std::min(mn[g[i]], r);
    mx[g[i]] = std::max(mx[g[i]], r);
    bsum += r;
  }
  std::vector<double> mean(G);
  for (size_t k = 0; k < G; ++k) mean[k] = sum[k] / static_cast<double>(cnt[k]);
  const double bmean = n > 0 ? bsum / static_cast<double>(n) : 0.0;
  double bss = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = rewards[i] - mean[g[i]];
    ss[g[i]] += d * d;
    const double db = rewards[i] - bmean;
    bss += db * db;
  }
  const double bstd = n > 1 ? std::sqrt(bss / static_cast<double>(n - 1)) : 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = g[i];
    if (cnt[k] < 2 || mn[k] == mx[k]) {
      out[i] = 0.0f;
      continue;
    }
    const double d = rewards[i] - mean[k];
    double denom = 1.0;
    if (scale == kScaleGroup) denom = std::sqrt(ss[k] / static_cast<double>(cnt[k] - 1)) + eps;
    if (scale == kScaleBatch) denom = bstd + eps;
    out[i] = static_cast<float>(d / denom);
  }
}

}  // namespace r4b::cpu
