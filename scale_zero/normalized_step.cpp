// SCALE's normalized step, fused so each value crosses memory as few times as the math
// allows (docs/algorithm.md, "The update"):
//
//   m = lerp(m, g, 1 - beta)                  only for roles with momentum
//   s = m, or g without momentum
//   p = (1 - lr * wd) * p - lr * s / rms(s, dim),   rms = max(sqrt(mean(s^2, dim)), 1e-8)
//
// Three entry points, each taking a batch of blocks (`struct Job`):
//
// scale_normalized_step: blocks whose RMS is complete on this rank (whole rows, or whole
//   columns), in one call. dim 1 (matrix, output: one RMS per row): a row is read from
//   memory once, its sum of squares taken, and the update re-reads it from L1/L2, so the
//   gradient costs one memory pass instead of two. dim 0 (embedding: one RMS per column)
//   needs every row before any update: one pass sums the columns, a second updates.
// scale_partial_sums / scale_apply_rms: the two phases for blocks cut by the partition
//   (ZeRO ranges: a partial first row, whole rows, a partial last row; FSDP2 columns).
//   Phase one advances the momentum and adds the block's sums of squares into its slots of
//   the batched buffer (`sumsq`); the caller all_reduces the buffer; phase two takes each
//   entry's RMS from the reduced sums and applies decay and the update.
//
// A row whose direction is all zeros, with no decay, is left untouched (its update is
// zero): the rows of an embedding's gradient for tokens a batch lacks cost one read.
//
// Sums of squares are fp64, from the exact fp64 products of fp32 values: an fp32 value
// squared is at most ~1.2e77 and at least ~2e-90, so neither a row of 1e25 nor one of
// subnormals overflows or underflows (the torch path does the same, scale_zero/shard_layout.py).
//
// Plain C ABI, no torch headers (builds in about a second), called through ctypes by
// scale_zero/native.py. Work is split into fixed chunks of rows run on `threads` threads;
// column sums are kept per chunk and added in chunk order, so results do not depend on
// thread timing.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

constexpr float kRmsFloor = 1e-8f;        // a floor, not an added epsilon
constexpr int64_t kChunkElems = 1 << 16;  // work unit: about 256 KiB of one tensor

}  // namespace

extern "C" {

// Keep in sync with `_Job` in scale_zero/native.py (same fields, same names).
struct Job {
  float* param;         // (rows, cols), row-major, contiguous
  const float* grad;    // same shape: filled in at each call, `grad_offset` values into `grads[owner]`
  float* momentum;      // same shape, or nullptr when the role keeps no momentum
  int64_t owner;        // which of a call's gradients and lrs the block takes
  int64_t grad_offset;
  int64_t rows, cols;
  int64_t dim;          // 1: RMS over each row; 0: RMS over each column
  double lr;            // filled in at each call: `lrs[owner]`
  double weight_decay;  // the param group's values, as they are
  double beta;          // momentum coefficient
  int64_t count;        // how many values each entry's mean is over: the full parameter's size along dim
  double* sumsq;        // the two phases: this block's first entry (row or column) in the batched buffer
  uint8_t* row_nonzero; // dim 0, the two phases: per row, whether its direction holds a nonzero
                        // (phase one writes it, phase two skips the zero rows without reading them)
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

inline const float* direction(const Job& j) { return j.momentum ? j.momentum : j.grad; }

inline double row_sumsq(const float* s, int64_t cols) {
  double sumsq = 0.0;
#pragma omp simd reduction(+ : sumsq)
  for (int64_t c = 0; c < cols; ++c) sumsq += double(s[c]) * s[c];
  return sumsq;
}

inline float rms_of(double sumsq, int64_t n) { return std::max(float(std::sqrt(sumsq / n)), kRmsFloor); }

// p = d * p - lr * s / rms, one RMS for the row.
inline void update_row(float* p, const float* s, int64_t cols, float d, float lr, float rms) {
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) p[c] = d * p[c] - lr * (s[c] / rms);
}

// dim 1, whole rows [r0, r1): sum, RMS and update per row while the row is in cache.
void step_rows(const Job& j, int64_t r0, int64_t r1) {
  const float d = decay(j);
  for (int64_t r = r0; r < r1; ++r) {
    const float* s = source_row(j, r);
    const double sumsq = row_sumsq(s, j.cols);
    if (sumsq == 0.0 && d == 1.0f) continue;  // a zero row, no decay: nothing changes
    update_row(j.param + r * j.cols, s, j.cols, d, float(j.lr), rms_of(sumsq, j.count));
  }
}

// dim 0, rows [r0, r1): momentum, the chunk's column sums of squares, and whether each row
// holds a nonzero (`row_nonzero[r]`), so the update need not read a zero row again.
// Rows are taken four at a time from the four quarters of the range: a read-only pass on
// one core keeps more reads in flight with several memory streams than with one.
void sum_columns(const Job& j, int64_t r0, int64_t r1, double* sumsq, uint8_t* row_nonzero) {
  std::fill(sumsq, sumsq + j.cols, 0.0);
  const int64_t quarter = (r1 - r0) / 4;
  for (int64_t r = r0; r < r0 + quarter; ++r) {
    const float* s0 = source_row(j, r);
    const float* s1 = source_row(j, r + quarter);
    const float* s2 = source_row(j, r + 2 * quarter);
    const float* s3 = source_row(j, r + 3 * quarter);
    int nz0 = 0, nz1 = 0, nz2 = 0, nz3 = 0;
#pragma omp simd reduction(| : nz0, nz1, nz2, nz3)
    for (int64_t c = 0; c < j.cols; ++c) {
      sumsq[c] += (double(s0[c]) * s0[c] + double(s1[c]) * s1[c]) + (double(s2[c]) * s2[c] + double(s3[c]) * s3[c]);
      nz0 |= s0[c] != 0.0f;
      nz1 |= s1[c] != 0.0f;
      nz2 |= s2[c] != 0.0f;
      nz3 |= s3[c] != 0.0f;
    }
    row_nonzero[r] = nz0, row_nonzero[r + quarter] = nz1, row_nonzero[r + 2 * quarter] = nz2;
    row_nonzero[r + 3 * quarter] = nz3;
  }
  for (int64_t r = r0 + 4 * quarter; r < r1; ++r) {  // the rows the quarters leave
    const float* s = source_row(j, r);
    int nz = 0;
#pragma omp simd reduction(| : nz)
    for (int64_t c = 0; c < j.cols; ++c) {
      sumsq[c] += double(s[c]) * s[c];
      nz |= s[c] != 0.0f;
    }
    row_nonzero[r] = nz;
  }
}

// Rows [r0, r1), each entry's RMS from its sum of squares: per row (dim 1) from `sumsq`,
// per column (dim 0) from `scales`, each column's lr / rms computed once per job, the rows
// `row_nonzero` (from the sums' pass) says are zero left untouched when there is no decay.
void apply_rms(const Job& j, int64_t r0, int64_t r1, const float* scales, const uint8_t* row_nonzero) {
  const float d = decay(j), lr = float(j.lr);
  for (int64_t r = r0; r < r1; ++r) {
    const float* s = direction(j) + r * j.cols;
    float* p = j.param + r * j.cols;
    if (j.dim == 1) {
      if (j.sumsq[r] != 0.0 || d != 1.0f) update_row(p, s, j.cols, d, lr, rms_of(j.sumsq[r], j.count));
      continue;
    }
    if (d == 1.0f && !row_nonzero[r]) continue;
#pragma omp simd
    for (int64_t c = 0; c < j.cols; ++c) p[c] = d * p[c] - s[c] * scales[c];
  }
}

struct Chunk {
  int64_t job, r0, r1;
  double* sumsq;  // dim 0 first passes only: this chunk's column sums
};

// Every job's rows cut into chunks of about kChunkElems; `column_sums[k]` gets room for one
// row of column sums per chunk of a dim-0 job when `with_column_sums`.
std::vector<Chunk> make_chunks(const Job* jobs, int64_t n_jobs, bool with_column_sums,
                               std::vector<std::vector<double>>& column_sums) {
  std::vector<Chunk> chunks;
  column_sums.assign(n_jobs, {});
  for (int64_t k = 0; k < n_jobs; ++k) {
    const Job& j = jobs[k];
    const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, j.cols));
    const int64_t n_chunks = (j.rows + rows_per_chunk - 1) / rows_per_chunk;
    const bool sums = with_column_sums && j.dim == 0;
    if (sums) column_sums[k].resize(n_chunks * j.cols);
    for (int64_t i = 0; i < n_chunks; ++i) {
      const int64_t r0 = i * rows_per_chunk, r1 = std::min(j.rows, r0 + rows_per_chunk);
      chunks.push_back({k, r0, r1, sums ? column_sums[k].data() + i * j.cols : nullptr});
    }
  }
  return chunks;
}

// Adds a dim-0 job's per-chunk column sums into `total`, chunk by chunk in chunk order
// (deterministic), each chunk's row of sums read sequentially.
void add_column_sums(const std::vector<double>& sums, int64_t cols, double* total) {
  for (size_t i = 0; i < sums.size(); i += cols) {
    const double* chunk = sums.data() + i;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) total[c] += chunk[c];
  }
}

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

// lr / rms of each of a dim-0 job's columns, from their sums of squares (empty for dim 1):
// the update multiplies by it, since a division per element limits a single core's update
// pass more than its memory traffic does (0.83 -> 0.73 of AdamW's time on a 32000x512
// embedding; it differs from lr * (s / rms) by rounding only).
std::vector<float> column_scales(const Job& j, const double* sumsq) {
  std::vector<float> scales(j.dim == 0 ? j.cols : 0);
  for (size_t c = 0; c < scales.size(); ++c) scales[c] = float(j.lr) / rms_of(sumsq[c], j.count);
  return scales;
}

// A call's jobs with this call's gradients and lrs filled in: a caller keeps its job array
// between steps and hands only these (one per owner, a few per call, not one per block).
std::vector<Job> with_gradients(const Job* jobs, int64_t n_jobs, const float* const* grads, const double* lrs) {
  std::vector<Job> filled(jobs, jobs + n_jobs);
  for (Job& j : filled) j.grad = grads[j.owner] + j.grad_offset, j.lr = lrs[j.owner];
  return filled;
}

}  // namespace

extern "C" void scale_normalized_step(const Job* given, int64_t n_jobs, const float* const* grads, const double* lrs,
                                      int threads) {
  const std::vector<Job> filled = with_gradients(given, n_jobs, grads, lrs);
  const Job* jobs = filled.data();
  std::vector<std::vector<double>> column_sums;
  const std::vector<Chunk> chunks = make_chunks(jobs, n_jobs, true, column_sums);
  std::vector<std::vector<uint8_t>> row_nonzero(n_jobs);  // dim 0: from the sums' pass to the update's
  for (int64_t k = 0; k < n_jobs; ++k)
    if (jobs[k].dim == 0) row_nonzero[k].resize(jobs[k].rows);
  parallel_chunks(chunks, threads, [&](const Chunk& ch) {
    const Job& j = jobs[ch.job];
    if (j.dim == 1) step_rows(j, ch.r0, ch.r1);
    else sum_columns(j, ch.r0, ch.r1, ch.sumsq, row_nonzero[ch.job].data());
  });
  std::vector<std::vector<float>> scales(n_jobs);
  std::vector<Chunk> second;  // dim 0: the update pass
  for (const Chunk& ch : chunks) {
    const Job& j = jobs[ch.job];
    if (j.dim != 0) continue;
    second.push_back(ch);
    if (!scales[ch.job].empty()) continue;
    std::vector<double> total(j.cols, 0.0);
    add_column_sums(column_sums[ch.job], j.cols, total.data());
    scales[ch.job] = column_scales(j, total.data());
  }
  parallel_chunks(second, threads, [&](const Chunk& ch) {
    apply_rms(jobs[ch.job], ch.r0, ch.r1, scales[ch.job].data(), row_nonzero[ch.job].data());
  });
}

extern "C" void scale_partial_sums(const Job* given, int64_t n_jobs, const float* const* grads, const double* lrs,
                                   int threads) {
  const std::vector<Job> filled = with_gradients(given, n_jobs, grads, lrs);
  const Job* jobs = filled.data();
  std::vector<std::vector<double>> column_sums;
  const std::vector<Chunk> chunks = make_chunks(jobs, n_jobs, true, column_sums);
  parallel_chunks(chunks, threads, [&](const Chunk& ch) {
    const Job& j = jobs[ch.job];
    if (j.dim == 0) return sum_columns(j, ch.r0, ch.r1, ch.sumsq, j.row_nonzero);
    for (int64_t r = ch.r0; r < ch.r1; ++r) j.sumsq[r] += row_sumsq(source_row(j, r), j.cols);
  });
  // Several blocks of one piece add into the same columns: job by job, in order.
  for (int64_t k = 0; k < n_jobs; ++k)
    if (jobs[k].dim == 0) add_column_sums(column_sums[k], jobs[k].cols, jobs[k].sumsq);
}

extern "C" void scale_apply_rms(const Job* given, int64_t n_jobs, const float* const* grads, const double* lrs,
                                int threads) {
  const std::vector<Job> filled = with_gradients(given, n_jobs, grads, lrs);
  const Job* jobs = filled.data();
  std::vector<std::vector<double>> unused;
  std::vector<std::vector<float>> scales(n_jobs);
  for (int64_t k = 0; k < n_jobs; ++k) scales[k] = column_scales(jobs[k], jobs[k].sumsq);
  parallel_chunks(make_chunks(jobs, n_jobs, false, unused), threads, [&](const Chunk& ch) {
    apply_rms(jobs[ch.job], ch.r0, ch.r1, scales[ch.job].data(), jobs[ch.job].row_nonzero);
  });
}
