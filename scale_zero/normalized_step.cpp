// SCALE's normalized step for pieces whose RMS is complete on this rank, fused so each
// value crosses memory as few times as the math allows (docs/algorithm.md, "The update"):
//
//   m = lerp(m, g, 1 - beta)                  only for roles with momentum
//   s = m, or g without momentum
//   p = (1 - lr * wd) * p - lr * s / rms(s, dim),   rms = max(sqrt(mean(s^2, dim)), 1e-8)
//
// dim 1 (matrix, output: one RMS per row): a row is read from memory once, its sum of
// squares taken, and the update re-reads it from L1/L2. That is the whole trick: the
// gradient costs one memory pass instead of two.
// dim 0 (embedding: one RMS per column) needs every row before any update: one pass sums
// the columns, a second pass updates.
//
// Plain C ABI, no torch headers (builds in about a second), called through ctypes by
// scale_zero/native.py. Work is split into fixed chunks of rows; column sums are kept
// per chunk and added in chunk order, so results do not depend on thread timing.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

constexpr float kRmsFloor = 1e-8f;     // a floor, not an added epsilon
constexpr int64_t kChunkElems = 1 << 16;  // work unit: about 256 KiB of one tensor

}  // namespace

extern "C" {

// Keep in sync with `_Job` in scale_zero/native.py (same fields, same names).
struct Job {
  float* param;         // (rows, cols), row-major, contiguous
  const float* grad;    // same shape
  float* momentum;      // same shape, or nullptr when the role keeps no momentum
  int64_t rows, cols;
  int64_t dim;          // 1: RMS over each row; 0: RMS over each column
  double lr;            // the param group's values, as they are
  double weight_decay;
  double beta;          // momentum coefficient
};

}  // extern "C"

namespace {

// Rounded to fp32 from double, as torch rounds the Python scalars of the torch path.
inline float decay(const Job& j) { return float(1.0 - j.lr * j.weight_decay); }  // decoupled decay
inline float lerp_weight(const Job& j) { return float(1.0 - j.beta); }

// torch.lerp's formula, so the momentum matches `m.lerp_(g, w)`.
inline float lerp(float m, float g, float w) {
  return w < 0.5f ? m + w * (g - m) : g - (g - m) * (1.0f - w);
}

// Advances the momentum of one row (if kept) and returns the row's direction source.
inline const float* source_row(const Job& j, int64_t r) {
  const float* g = j.grad + r * j.cols;
  if (!j.momentum) return g;
  float* m = j.momentum + r * j.cols;
  const float w = lerp_weight(j);
#pragma omp simd
  for (int64_t c = 0; c < j.cols; ++c) m[c] = lerp(m[c], g[c], w);
  return m;
}

// dim 1, rows [r0, r1): sum, RMS and update per row while the row is in cache.
void step_rows(const Job& j, int64_t r0, int64_t r1) {
  const float d = decay(j), lr = float(j.lr);
  for (int64_t r = r0; r < r1; ++r) {
    const float* s = source_row(j, r);
    double sumsq = 0.0;
#pragma omp simd reduction(+ : sumsq)
    for (int64_t c = 0; c < j.cols; ++c) sumsq += double(s[c]) * s[c];
    const float rms = std::max(float(std::sqrt(sumsq / j.cols)), kRmsFloor);
    float* p = j.param + r * j.cols;
#pragma omp simd
    for (int64_t c = 0; c < j.cols; ++c) p[c] = d * p[c] - lr * (s[c] / rms);
  }
}

// dim 0, first pass over rows [r0, r1): momentum, and the chunk's column sums of squares.
void sum_columns(const Job& j, int64_t r0, int64_t r1, double* sumsq) {
  std::fill(sumsq, sumsq + j.cols, 0.0);
  for (int64_t r = r0; r < r1; ++r) {
    const float* s = source_row(j, r);
#pragma omp simd
    for (int64_t c = 0; c < j.cols; ++c) sumsq[c] += double(s[c]) * s[c];
  }
}

// dim 0, second pass over rows [r0, r1), with the per-column RMS.
void step_columns(const Job& j, int64_t r0, int64_t r1, const float* rms) {
  const float* source = j.momentum ? j.momentum : j.grad;
  const float d = decay(j), lr = float(j.lr);
  for (int64_t r = r0; r < r1; ++r) {
    const float* s = source + r * j.cols;
    float* p = j.param + r * j.cols;
#pragma omp simd
    for (int64_t c = 0; c < j.cols; ++c) p[c] = d * p[c] - lr * (s[c] / rms[c]);
  }
}

struct Chunk {
  int64_t job, r0, r1;
  double* sumsq;  // dim 0 only: this chunk's column sums
};

// Runs `work(chunk)` for every chunk on `threads` threads (the caller's included).
template <class Work>
void parallel_chunks(const std::vector<Chunk>& chunks, int threads, const Work& work) {
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i; (i = next.fetch_add(1)) < chunks.size();) work(chunks[i]);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < std::min<int64_t>(threads, chunks.size()); ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
}

}  // namespace

extern "C" void scale_normalized_step(const Job* jobs, int64_t n_jobs, int threads) {
  std::vector<Chunk> first, second;  // first pass: rows and column sums; second: columns
  std::vector<std::vector<double>> column_sums(n_jobs);
  for (int64_t k = 0; k < n_jobs; ++k) {
    const Job& j = jobs[k];
    const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, j.cols));
    const int64_t n_chunks = (j.rows + rows_per_chunk - 1) / rows_per_chunk;
    if (j.dim == 0) column_sums[k].resize(n_chunks * j.cols);
    for (int64_t i = 0; i < n_chunks; ++i) {
      const int64_t r0 = i * rows_per_chunk, r1 = std::min(j.rows, r0 + rows_per_chunk);
      double* sumsq = j.dim == 0 ? column_sums[k].data() + i * j.cols : nullptr;
      first.push_back({k, r0, r1, sumsq});
      if (j.dim == 0) second.push_back({k, r0, r1, nullptr});
    }
  }
  parallel_chunks(first, threads, [&](const Chunk& ch) {
    const Job& j = jobs[ch.job];
    if (j.dim == 1) step_rows(j, ch.r0, ch.r1);
    else sum_columns(j, ch.r0, ch.r1, ch.sumsq);
  });
  if (second.empty()) return;

  std::vector<std::vector<float>> rms(n_jobs);
  for (int64_t k = 0; k < n_jobs; ++k) {
    const Job& j = jobs[k];
    if (j.dim != 0) continue;
    rms[k].resize(j.cols);
    const std::vector<double>& sums = column_sums[k];
    for (int64_t c = 0; c < j.cols; ++c) {
      double total = 0.0;
      for (size_t i = c; i < sums.size(); i += j.cols) total += sums[i];  // chunk order
      rms[k][c] = std::max(float(std::sqrt(total / j.rows)), kRmsFloor);
    }
  }
  parallel_chunks(second, threads, [&](const Chunk& ch) {
    step_columns(jobs[ch.job], ch.r0, ch.r1, rms[ch.job].data());
  });
}
