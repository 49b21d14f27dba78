// The fused KL pass on the CPU: one read of each logits row in the forward (online log-sum-exp
// over tiles that stay in L1), one read and one gradient write in the backward.
//
// Rows are independent and each is reduced by one thread in a fixed order, so results are
// bitwise reproducible whatever the thread count. Rows are addressed through 64-bit strides:
// views such as logits[:, :-1] are read in place.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/functional_bfloat16.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "fused_kl_checks.h"
#include "gradient_cache.h"
#include "softmax_exp2.h"

namespace kl_kernels {
namespace {

using at::Tensor;
using at::vec::Vectorized;

#define KL_CHECK_ARG(cond, arg, ...) TORCH_CHECK(cond, "kl_kernels::fused_kl: ", arg, " ", __VA_ARGS__)

constexpr int64_t kTile = 1024;  // elements per tile: 4 KiB of float, several tiles fit in L1

// Tiles are converted to the accumulation type once, then all math runs on Vectorized<acc_t>.
// Loaders are chosen per dtype at run time (one indirect call per tile), so the kernels are not
// instantiated once per (logits dtype, reference dtype) pair.
template <typename acc_t>
using LoadFn = void (*)(const void* src, int64_t n, acc_t* dst);
template <typename acc_t>
using StoreFn = void (*)(const acc_t* src, int64_t n, void* dst);

// Hardware prefetchers stop at 4 KiB pages, the size of a float tile: the loops that first touch
// a row's memory ask for the line kPrefetchBytes ahead (past the row's end it is harmless).
constexpr int64_t kPrefetchBytes = 4096;

// One source vector as acc_t: float and double in place, bf16/fp16 widened in registers (no buffer)
template <typename scalar_t, typename acc_t>
Vectorized<acc_t> load_vec(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(p);
  } else {
    static_assert(c10::is_reduced_floating_point_v<scalar_t> && std::is_same_v<acc_t, float>);
    Vectorized<float> out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

template <typename scalar_t, typename acc_t>
void load_tile(const void* src, int64_t n, acc_t* dst) {
  const scalar_t* p = static_cast<const scalar_t*>(src);
  int64_t done = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (c10::is_reduced_floating_point_v<scalar_t> && std::is_same_v<acc_t, float>) {
    // bf16/fp16 -> float a vector at a time: the element loop below cost a quarter of the forward
    constexpr int64_t lanes = Vectorized<float>::size();
    for (; done + lanes <= n; done += lanes) {
      __builtin_prefetch(reinterpret_cast<const char*>(p + done) + kPrefetchBytes);
      load_vec<scalar_t, float>(p + done).store(dst + done);
    }
  }
#endif
  constexpr int64_t line = 64 / sizeof(scalar_t);
  for (int64_t i0 = done; i0 < n; i0 += line) {
    __builtin_prefetch(reinterpret_cast<const char*>(p + i0) + kPrefetchBytes);
    const int64_t i1 = std::min(n, i0 + line);
    for (int64_t i = i0; i < i1; ++i) dst[i] = static_cast<acc_t>(p[i]);
  }
}

template <typename scalar_t, typename acc_t>
void store_tile(const acc_t* src, int64_t n, void* dst) {
  scalar_t* p = static_cast<scalar_t*>(dst);
  if constexpr (c10::is_reduced_floating_point_v<scalar_t> && std::is_same_v<acc_t, float>) {
    at::vec::convert(src, p, n);  // vectorized float -> bf16/fp16, round to nearest even
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(src[i]);
  }
}

template <typename acc_t>
LoadFn<acc_t> loader_for(at::ScalarType dtype) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kl_kernels::fused_kl load",
                                         [] { return LoadFn<acc_t>(load_tile<scalar_t, acc_t>); });
}

template <typename acc_t>
StoreFn<acc_t> storer_for(at::ScalarType dtype) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kl_kernels::fused_kl store",
                                         [] { return StoreFn<acc_t>(store_tile<scalar_t, acc_t>); });
}

// One tile of a row as acc_t values, unscaled (the temperature is applied inside exp), padded
// with -inf up to a whole number of vectors: a padded lane adds e^(-inf) = 0 to every sum and
// never wins a max, so the vector loops need no tail. A row already in acc_t is read in place
// (no copy) except for a ragged last tile; other dtypes are converted into `buffer`. The forward
// reads float/bf16/fp16 straight into registers (accumulate_tile) and uses this only for the
// reference tile of the full KL and for mixed float32/float64 pairs; the backward reads through it.
template <typename acc_t>
struct TileReader {
  LoadFn<acc_t> load;
  bool in_place;
  int64_t element_size;
  TileReader(at::ScalarType dtype, at::ScalarType acc)
      : load(loader_for<acc_t>(dtype)), in_place(dtype == acc), element_size(c10::elementSize(dtype)) {}

  const acc_t* read(const char* row, int64_t v0, int64_t n, acc_t* buffer, int64_t& padded) const {
    constexpr int64_t lanes = Vectorized<acc_t>::size();
    padded = (n + lanes - 1) / lanes * lanes;
    if (in_place && padded == n) return reinterpret_cast<const acc_t*>(row) + v0;
    load(row + v0 * element_size, n, buffer);
    std::fill(buffer + n, buffer + padded, -std::numeric_limits<acc_t>::infinity());
    return buffer;
  }
};

// the largest lane, NaN-propagating (a NaN row stays NaN through every rescale)
template <typename acc_t>
acc_t lanes_max(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t m = lanes[0];
  for (int64_t i = 1; i < Vectorized<acc_t>::size(); ++i) m = nan_max(m, lanes[i]);
  return m;
}

template <typename acc_t>
acc_t horizontal_sum(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t total = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) total += lanes[i];
  return total;
}

// Sums of one tile of a row around the reference max m (raw units), as sums of terms
// e^((x - m)/T) computed as 2^((x - m) * c), c = log2(e)/T. Also returns the tile's own max
// (NaN-propagating). xr: the reference row's tile as acc_t, read only with need_sd. A ragged end
// is padded with -inf in a vector of its own: such a lane adds 2^-inf = 0 and never wins a max.
template <typename scalar_t, typename acc_t>
RowSums<acc_t> tile_sums(const scalar_t* x, const acc_t* xr, int64_t n, acc_t m, acc_t c, bool need_sx, bool need_sd,
                         acc_t& tile_max) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t lanes = Vec::size();
  const Vec vm(m), vc(c), zero(0);
  Vec s(0), sx(0), sd(0), best(-std::numeric_limits<acc_t>::infinity());
  auto step = [&](const Vec& xv, const acc_t* xrv) {
    best = at::vec::maximum(best, xv);  // NaN-propagating
    const Vec shifted = xv - vm;
    const Vec e = softmax_exp2(shifted * vc);
    s += e;
    const Vec is_zero = e == zero;  // 2^-inf: the term is 0 even though x is -inf
    if (need_sx) sx += Vec::blendv(e * shifted, zero, is_zero);
    if (need_sd) {  // fused_kl_math.h sd_term, a vector at a time
      const Vec w = xv - Vec::loadu(xrv);
      sd += Vec::blendv(Vec::blendv(e * w, zero, is_zero), w, w == Vec(std::numeric_limits<acc_t>::infinity()));
    }
  };
  const int64_t whole = n / lanes * lanes;
  for (int64_t i = 0; i < whole; i += lanes) {
    __builtin_prefetch(reinterpret_cast<const char*>(x + i) + kPrefetchBytes);
    step(load_vec<scalar_t, acc_t>(x + i), need_sd ? xr + i : nullptr);
  }
  if (whole < n) {
    alignas(64) scalar_t rest[lanes];
    alignas(64) acc_t rest_ref[lanes];
    std::fill(rest, rest + lanes, scalar_t(-std::numeric_limits<acc_t>::infinity()));
    std::copy(x + whole, x + n, rest);
    if (need_sd) {
      std::fill(rest_ref, rest_ref + lanes, -std::numeric_limits<acc_t>::infinity());
      std::copy(xr + whole, xr + n, rest_ref);
    }
    step(load_vec<scalar_t, acc_t>(rest), rest_ref);
  }
  tile_max = lanes_max(best);
  return {m, horizontal_sum(s), need_sx ? horizontal_sum(sx) : acc_t(0), need_sd ? horizontal_sum(sd) : acc_t(0)};
}

// The max of a tile, NaN-propagating: the reference max of a row's first tile.
template <typename scalar_t, typename acc_t>
acc_t tile_max(const scalar_t* x, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec best(-std::numeric_limits<acc_t>::infinity());
  const int64_t whole = n / Vec::size() * Vec::size();
  for (int64_t i = 0; i < whole; i += Vec::size()) best = at::vec::maximum(best, load_vec<scalar_t, acc_t>(x + i));
  acc_t m = lanes_max(best);
  for (int64_t i = whole; i < n; ++i) m = nan_max(m, static_cast<acc_t>(x[i]));
  return m;
}

// Adds one tile of raw logits to a row's sums in one pass, around the row's running max r.m
// instead of the tile's own (which would take a pass of its own to find): terms of logits above
// r.m exceed 1, harmless while they stay far from overflow. The pass also finds the tile's max;
// if the tile went above r.m by more than kHeadroom (in units of z/T: e^64 * 1024 terms is still
// ~1e31), or is NaN, it is summed again around its own max; either way the row's sums end around
// the running max, so label_logprob's exact difference with the max holds. The first tile of a
// row has no running max: a max pass gives it one. Tiles in fixed order: deterministic. The full
// KL's sum sd has terms e * (z - z'), unbounded in |z - z'|, so it gets less headroom: e^16 * 1024
// * |z - z'| stays finite up to |z - z'| ~ 4e28 (with 64 it overflowed at 1e10, issue 28).
constexpr double kHeadroom = 64, kHeadroomFull = 16;

template <typename scalar_t, typename acc_t>
void accumulate_tile(RowSums<acc_t>& r, const void* raw, const acc_t* xr, int64_t n, acc_t inv_t, bool need_sx,
                     bool need_sd) {
  const scalar_t* x = static_cast<const scalar_t*>(raw);
  const acc_t c = inv_t * acc_t(kLog2e);
  acc_t m = r.m, top;  // top: the tile's max, found by the summing pass
  if (m == -std::numeric_limits<acc_t>::infinity()) {  // the row's first tile (or all -inf so far)
    m = tile_max<scalar_t, acc_t>(x, n);
    if (m == -std::numeric_limits<acc_t>::infinity()) return;  // a tile of -inf adds nothing
  }
  RowSums<acc_t> tile = tile_sums(x, xr, n, m, c, need_sx, need_sd, top);
  const acc_t headroom = acc_t(need_sd ? kHeadroomFull : kHeadroom);
  if (!((top - m) * inv_t <= headroom)) tile = tile_sums(x, xr, n, top, c, need_sx, need_sd, top);
  r = merge(r, tile, inv_t);  // the online log-sum-exp step, shared with the CUDA kernels
  if (top > r.m) raise_max(r, top, inv_t);
}

template <typename acc_t>
using AccumulateFn = void (*)(RowSums<acc_t>&, const void*, const acc_t*, int64_t, acc_t, bool, bool);

// The tile summer for a source dtype: in registers for float/bf16/fp16 with float accumulation and
// double with double; any other pairing (a float reference beside float64 logits) is first
// converted into a buffer by TileReader and summed as acc_t.
template <typename acc_t>
AccumulateFn<acc_t> accumulator_for(at::ScalarType dtype) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (dtype == at::kBFloat16) return accumulate_tile<c10::BFloat16, float>;
    if (dtype == at::kHalf) return accumulate_tile<c10::Half, float>;
  }
  if (dtype == c10::CppTypeToScalarType<acc_t>::value) return accumulate_tile<acc_t, acc_t>;
  return nullptr;
}

struct Rows {  // a [B, T, V] tensor with a contiguous vocabulary dim, addressed by row n = b*T + t
  const char* data;
  int64_t T, stride_b, stride_t, element_size;
  explicit Rows(const Tensor& t)
      : data(static_cast<const char*>(t.data_ptr())), T(t.size(1)), stride_b(t.stride(0)),
        stride_t(t.stride(1)), element_size(t.element_size()) {}
  const char* row(int64_t n) const {
    return data + ((n / T) * stride_b + (n % T) * stride_t) * element_size;  // 64-bit offsets
  }
};

void check_rows(const Tensor& t, const char* arg) {
  KL_CHECK_ARG(t.dim() == 3, arg, "must be [B, T, V], got ", t.sizes());
  KL_CHECK_ARG(t.size(2) <= 1 || t.stride(2) == 1, arg, "must have a contiguous vocabulary dim, got strides ",
               t.strides());
  KL_CHECK_ARG(t.device().is_cpu(), arg, "must be a CPU tensor");
}

void check_labels(const Tensor& labels, int64_t N) {
  KL_CHECK_ARG(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == N, "labels",
               "must be contiguous int64 with one label per row (", N, ")");
}

template <typename acc_t>
const acc_t* per_row(const std::optional<Tensor>& t, Tensor& holder, int64_t N, at::ScalarType acc, const char* arg) {
  if (!t.has_value()) return nullptr;
  KL_CHECK_ARG(t->numel() == N, arg, "must have one value per row (", N, "), got ", t->sizes());
  holder = t->to(acc).contiguous();
  return holder.data_ptr<acc_t>();
}

template <typename acc_t>
void forward_rows(const Tensor& logits, const Tensor& labels, const std::optional<Tensor>& ref_logits,
                  const acc_t* temperature, acc_t scalar_temperature, int64_t ignore_index, VocabShard shard,
                  bool need_entropy, bool need_full, acc_t* logp, acc_t* ref_logp, acc_t* ent, acc_t* kl, double* lse,
                  double* ref_lse) {
  const int64_t N = labels.numel(), V = logits.size(2);
  const Rows policy(logits);
  const bool has_ref = ref_logits.has_value();
  const Rows reference = has_ref ? Rows(*ref_logits) : policy;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const TileReader<acc_t> read(logits.scalar_type(), acc);
  const TileReader<acc_t> read_ref(has_ref ? ref_logits->scalar_type() : logits.scalar_type(), acc);
  const AccumulateFn<acc_t> add = accumulator_for<acc_t>(logits.scalar_type());
  // the full KL's sum reads the reference tile beside the policy's, so it is converted once
  const AccumulateFn<acc_t> add_ref = has_ref && !need_full ? accumulator_for<acc_t>(ref_logits->scalar_type()) : nullptr;
  const int64_t* y = labels.data_ptr<int64_t>();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN(), inf = std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t x[kTile + 64], xr[kTile + 64];
    for (int64_t n = begin; n < end; ++n) {
      const int64_t label = y[n];
      if (label == ignore_index) {  // ignored rows are 0 in every output and never read
        logp[n] = 0, lse[n] = 0;
        if (has_ref) ref_logp[n] = 0, ref_lse[n] = 0;
        if (need_entropy) ent[n] = 0;
        if (need_full) kl[n] = 0;
        continue;
      }
      const acc_t inv_t = acc_t(1) / (temperature ? temperature[n] : scalar_temperature);
      const char* row = policy.row(n);
      const char* ref_row = has_ref ? reference.row(n) : nullptr;
      RowSums<acc_t> p = empty_row_sums<acc_t>(), q = empty_row_sums<acc_t>();
      for (int64_t v0 = 0; v0 < V; v0 += kTile) {
        const int64_t count = std::min(kTile, V - v0);
        int64_t padded;
        const acc_t* xrt = nullptr;  // the reference tile as acc_t, when the full KL needs it
        if (add_ref) {
          add_ref(q, ref_row + v0 * read_ref.element_size, nullptr, count, inv_t, false, false);
        } else if (has_ref) {
          xrt = read_ref.read(ref_row, v0, count, xr, padded);
          accumulate_tile<acc_t, acc_t>(q, xrt, nullptr, count, inv_t, false, false);
        }
        if (add) {
          add(p, row + v0 * read.element_size, xrt, count, inv_t, need_entropy, need_full);
        } else {
          accumulate_tile<acc_t, acc_t>(p, read.read(row, v0, count, x, padded), xrt, count, inv_t, need_entropy,
                                        need_full);
        }
      }
      const RowSums<acc_t> raw_p = p, raw_q = q;  // the full KL's gap is taken in raw units
      p = scaled(p, inv_t), q = scaled(q, inv_t);
      const acc_t row_lse = log_sum_exp(p);
      const bool bad = shard.bad(label);  // only with validate=False: NaN, never a wild read
      const bool owned = shard.owns(label, V);
      auto label_logit = [&](const TileReader<acc_t>& reader, const char* r) {
        acc_t value;
        reader.load(r + (label - shard.start) * reader.element_size, 1, &value);
        return value;
      };
      lse[n] = saved_lse(raw_p, inv_t);
      logp[n] = bad ? nan : owned ? label_logprob(raw_p, label_logit(read, row), inv_t, row_lse) : -inf;
      if (need_entropy) ent[n] = bad ? nan : entropy(p, row_lse);
      if (has_ref) {
        const acc_t row_ref_lse = log_sum_exp(q);
        ref_lse[n] = saved_lse(raw_q, inv_t);
        ref_logp[n] = bad ? nan : owned ? label_logprob(raw_q, label_logit(read_ref, ref_row), inv_t, row_ref_lse) : -inf;
        if (need_full) kl[n] = bad ? nan : full_kl(raw_p, raw_q, inv_t, row_lse, row_ref_lse);
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> fused_kl_fwd_cpu(
    const Tensor& logits, const Tensor& labels, const std::optional<Tensor>& ref_logits,
    const std::optional<Tensor>& temperature, double scalar_temperature, int64_t ignore_index, int64_t vocab_start,
    int64_t vocab_size, bool need_entropy, bool need_full) {
  check_rows(logits, "logits");
  const int64_t N = logits.size(0) * logits.size(1);
  check_labels(labels, N);
  const VocabShard shard = checked_shard(vocab_start, vocab_size, logits.size(2));
  if (ref_logits.has_value()) {
    check_rows(*ref_logits, "ref_logits");
    KL_CHECK_ARG(ref_logits->sizes() == logits.sizes(), "ref_logits", "must match the logits' shape");
  }
  KL_CHECK_ARG(!need_full || ref_logits.has_value(), "ref_logits", "are needed for the full KL");
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = logits.options().dtype(acc);
  auto make = [&](bool needed) { return at::empty({needed ? N : 0}, options); };
  // the saved lse is double whatever the logits (saved_lse in fused_kl_math.h)
  auto make_lse = [&](bool needed) { return at::empty({needed ? N : 0}, options.dtype(at::kDouble)); };
  Tensor logp = make(true), lse = make_lse(true), ref_logp = make(ref_logits.has_value()),
         ref_lse = make_lse(ref_logits.has_value()), ent = make(need_entropy), kl = make(need_full);
  Tensor temperature_holder;
  AT_DISPATCH_FLOATING_TYPES(acc, "fused_kl_fwd_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* temp = per_row<acc_t>(temperature, temperature_holder, N, acc, "temperature");
    auto ptr = [](Tensor& t) { return t.numel() ? t.data_ptr<acc_t>() : nullptr; };
    auto ptr_lse = [](Tensor& t) { return t.numel() ? t.data_ptr<double>() : nullptr; };
    forward_rows<acc_t>(logits, labels, ref_logits, temp, static_cast<acc_t>(scalar_temperature), ignore_index, shard,
                        need_entropy, need_full, ptr(logp), ptr(ref_logp), ptr(ent), ptr(kl), ptr_lse(lse),
                        ptr_lse(ref_lse));
  });
  return {logp, ref_logp, ent, kl, lse, ref_lse};
}

template <typename acc_t>
void backward_rows(const acc_t* g_logp, const acc_t* g_entropy, const acc_t* g_full, const Tensor& logits,
                   const Tensor& labels, const std::optional<Tensor>& ref_logits, const acc_t* temperature,
                   acc_t scalar_temperature, int64_t ignore_index, VocabShard shard, const double* lse,
                   const double* ref_lse, const acc_t* ent, const acc_t* kl, Tensor& grad) {
  using Vec = Vectorized<acc_t>;
  const int64_t N = labels.numel(), V = logits.size(2);
  const Rows policy(logits), out(grad);
  const bool use_ref = g_full != nullptr;
  const Rows reference = use_ref ? Rows(*ref_logits) : policy;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const TileReader<acc_t> read(logits.scalar_type(), acc);
  const TileReader<acc_t> read_ref(use_ref ? ref_logits->scalar_type() : logits.scalar_type(), acc);
  const StoreFn<acc_t> store = storer_for<acc_t>(grad.scalar_type());
  const int64_t* y = labels.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t x[kTile + 64], xr[kTile + 64], g[kTile + 64];
    for (int64_t n = begin; n < end; ++n) {
      char* out_row = const_cast<char*>(out.row(n));
      const int64_t label = y[n];
      RowGrad<acc_t> r{g_logp ? g_logp[n] : acc_t(0), g_entropy ? g_entropy[n] : acc_t(0),
                       g_full ? g_full[n] : acc_t(0), ent ? ent[n] : acc_t(0), kl ? kl[n] : acc_t(0),
                       lse_parts<acc_t>(lse[n]), lse_parts<acc_t>(use_ref ? ref_lse[n] : 0.0), acc_t(0)};
      // nothing flows back from ignored or fully masked rows: an exact 0, even for NaN logits
      if (label == ignore_index || (r.g_logp == 0 && r.g_entropy == 0 && r.g_full == 0)) {
        std::memset(out_row, 0, V * out.element_size);  // 0 bits are 0.0 in every float dtype
        continue;
      }
      r.inv_t = acc_t(1) / (temperature ? temperature[n] : scalar_temperature);
      // full's term only where its gradient flows: a row whose kl is masked (g_full = 0) never reads
      // its reference row, so NaN or -inf there cannot reach the logprobs' or entropy's gradient
      const bool row_ref = use_ref && r.g_full != acc_t(0);
      const bool bad = shard.bad(label);
      // the label's own term, at its column of this shard (none when another shard owns it)
      const int64_t label_col = shard.owns(label, V) ? label - shard.start : -1;
      const char* row = policy.row(n);
      const char* ref_row = row_ref ? reference.row(n) : nullptr;
      const Vec v_lse(r.lse.head), v_lse_tail(r.lse.tail), v_ref_lse(r.ref_lse.head), v_ref_lse_tail(r.ref_lse.tail),
          v_ent(r.entropy), v_kl(r.kl), v_inv_t(r.inv_t),
          v_gl(r.g_logp), v_gh(r.g_entropy), v_gf(r.g_full), v_log2e{acc_t(kLog2e)}, zero(0);
      // only the label log-prob's gradient flows (the common case): the row is p_v * k, k = -g_logp/T,
      // exactly 0 where p_v = 0 as long as k is finite
      const bool only_logp = r.g_entropy == 0 && !row_ref && std::isfinite(r.g_logp);
      const Vec v_k(-r.g_logp * r.inv_t);
      for (int64_t v0 = 0; v0 < V; v0 += kTile) {
        const int64_t count = std::min(kTile, V - v0);
        // the tile is read whole before it is written: safe when grad aliases logits (in place)
        int64_t padded;
        const acc_t* xt = read.read(row, v0, count, x, padded);
        const acc_t* xrt = row_ref ? read_ref.read(ref_row, v0, count, xr, padded) : nullptr;
        for (int64_t i = 0; i < padded; i += Vec::size()) {  // the RowGrad formula, a vector at a time
          __builtin_prefetch(reinterpret_cast<const char*>(xt + i) + kPrefetchBytes);
          if (row_ref) __builtin_prefetch(reinterpret_cast<const char*>(xrt + i) + kPrefetchBytes);
          // z/T - lse: the product exact inside the fma, lse's head then its tail (lse_parts)
          const Vec log_p = at::vec::fmsub(Vec::loadu(xt + i), v_inv_t, v_lse) - v_lse_tail;
          const Vec p = softmax_exp2(log_p * v_log2e);
          if (only_logp) {
            (p * v_k).store(g + i);
            continue;
          }
          const Vec log_q = row_ref ? at::vec::fmsub(Vec::loadu(xrt + i), v_inv_t, v_ref_lse) - v_ref_lse_tail : zero;
          const Vec f = logit_factor(log_p, log_q, v_gl, v_gh, v_ent, v_gf, v_kl, row_ref);
          Vec::blendv(p * f * v_inv_t, zero, p == zero).store(g + i);
        }
        if (bad) {
          std::fill(g, g + count, std::numeric_limits<acc_t>::quiet_NaN());
        } else if (label_col >= v0 && label_col < v0 + count) {
          g[label_col - v0] += r.g_logp * r.inv_t;
        }
        store(g, count, out_row + v0 * out.element_size);
      }
    }
  });
}

void fused_kl_bwd_into(const std::optional<Tensor>& grad_logp, const std::optional<Tensor>& grad_entropy,
                       const std::optional<Tensor>& grad_full, const Tensor& logits, const Tensor& labels,
                       const std::optional<Tensor>& ref_logits, const std::optional<Tensor>& temperature,
                       double scalar_temperature, int64_t ignore_index, int64_t vocab_start, int64_t vocab_size,
                       const Tensor& lse, const std::optional<Tensor>& ref_lse,
                       const std::optional<Tensor>& entropy_out, const std::optional<Tensor>& full_out, Tensor& grad) {
  check_rows(logits, "logits");
  const int64_t N = logits.size(0) * logits.size(1);
  check_labels(labels, N);
  const VocabShard shard = checked_shard(vocab_start, vocab_size, logits.size(2));
  const bool use_full = grad_full.has_value();
  KL_CHECK_ARG(!use_full || (ref_logits.has_value() && ref_lse.has_value() && full_out.has_value()), "ref_logits",
               "and the saved reference statistics are needed for the gradient of the full KL");
  KL_CHECK_ARG(!grad_entropy.has_value() || entropy_out.has_value(), "entropy", "must be saved for its gradient");
  if (use_full) check_rows(*ref_logits, "ref_logits");
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  AT_DISPATCH_FLOATING_TYPES(acc, "fused_kl_bwd_cpu", [&] {
    using acc_t = scalar_t;
    Tensor h[8];  // contiguous acc_t copies of the per-row inputs
    const acc_t* gl = per_row<acc_t>(grad_logp, h[0], N, acc, "grad_logp");
    const acc_t* ge = per_row<acc_t>(grad_entropy, h[1], N, acc, "grad_entropy");
    const acc_t* gf = per_row<acc_t>(grad_full, h[2], N, acc, "grad_full");
    const acc_t* temp = per_row<acc_t>(temperature, h[3], N, acc, "temperature");
    const double* l = per_row<double>(std::optional<Tensor>(lse), h[4], N, at::kDouble, "lse");
    const double* rl = use_full ? per_row<double>(ref_lse, h[5], N, at::kDouble, "ref_lse") : nullptr;
    const acc_t* e = ge ? per_row<acc_t>(entropy_out, h[6], N, acc, "entropy") : nullptr;
    const acc_t* k = use_full ? per_row<acc_t>(full_out, h[7], N, acc, "full_kl") : nullptr;
    backward_rows<acc_t>(gl, ge, gf, logits, labels, ref_logits, temp, static_cast<acc_t>(scalar_temperature),
                         ignore_index, shard, l, rl, e, k, grad);
  });
}

Tensor fused_kl_bwd_cpu(const std::optional<Tensor>& grad_logp, const std::optional<Tensor>& grad_entropy,
                        const std::optional<Tensor>& grad_full, const Tensor& logits, const Tensor& labels,
                        const std::optional<Tensor>& ref_logits, const std::optional<Tensor>& temperature,
                        double scalar_temperature, int64_t ignore_index, int64_t vocab_start, int64_t vocab_size,
                        const Tensor& lse, const std::optional<Tensor>& ref_lse,
                        const std::optional<Tensor>& entropy_out, const std::optional<Tensor>& full_out) {
  Tensor grad = gradient_cache().empty_like(logits);
  fused_kl_bwd_into(grad_logp, grad_entropy, grad_full, logits, labels, ref_logits, temperature,
                    scalar_temperature, ignore_index, vocab_start, vocab_size, lse, ref_lse, entropy_out, full_out, grad);
  return grad;
}

void fused_kl_bwd_inplace_cpu(const std::optional<Tensor>& grad_logp, const std::optional<Tensor>& grad_entropy,
                              const std::optional<Tensor>& grad_full, Tensor& logits, const Tensor& labels,
                              const std::optional<Tensor>& ref_logits, const std::optional<Tensor>& temperature,
                              double scalar_temperature, int64_t ignore_index, int64_t vocab_start,
                              int64_t vocab_size, const Tensor& lse, const std::optional<Tensor>& ref_lse,
                              const std::optional<Tensor>& entropy_out, const std::optional<Tensor>& full_out) {
  fused_kl_bwd_into(grad_logp, grad_entropy, grad_full, logits, labels, ref_logits, temperature,
                    scalar_temperature, ignore_index, vocab_start, vocab_size, lse, ref_lse, entropy_out, full_out,
                    logits);
}

// ---- kl_penalty in one op: the row pass above, then the estimator, masks, penalty and per-sequence
// sums over its [N] statistics, and in the backward the chain from all six outputs back to the rows'
// upstream gradients before the row pass. The O(N) loops cost nothing next to the [N, V] pass, but on
// a GPU each would be a launch, and here each was an ATen op with its own [N] temporaries.

// The rows of each sequence: padded [B, T] (sequence b is rows b*T ... b*T + T - 1), or packed
// cu_seqlens as given, clamped into [0, N] and made non-decreasing here (validate=False must not
// read out of bounds); packed without cu_seqlens is one sequence of all N rows.
std::vector<int64_t> sequence_bounds(bool padded, int64_t B, int64_t T, const std::optional<Tensor>& cu_seqlens) {
  const int64_t N = B * T;
  std::vector<int64_t> bounds;
  if (padded) {
    for (int64_t b = 0; b <= B; ++b) bounds.push_back(b * T);
  } else if (!cu_seqlens.has_value()) {
    bounds = {0, N};
  } else {
    KL_CHECK_ARG(cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 1, "cu_seqlens", "must be 1-D [S+1], got ",
                 cu_seqlens->sizes());
    const Tensor cu = cu_seqlens->to(at::kLong).contiguous();
    const int64_t* c = cu.data_ptr<int64_t>();
    int64_t running = 0;
    for (int64_t i = 0; i < cu.numel(); ++i) bounds.push_back(running = std::max(running, std::clamp(c[i], int64_t(0), N)));
  }
  return bounds;
}

// nonzero = valid, as a bool per row (a mask may have any real dtype); empty when there is no mask
Tensor valid_rows(const std::optional<Tensor>& mask, int64_t N) {
  if (!mask.has_value()) return Tensor();
  KL_CHECK_ARG(mask->numel() == N, "mask", "must have one value per row (", N, "), got ", mask->sizes());
  return mask->ne(0).reshape({N}).contiguous();
}

template <typename acc_t>
EstimatorSpec<acc_t> estimator_spec(int64_t estimator, bool straight_through, std::optional<double> log_ratio_clamp,
                                    std::optional<double> kl_clamp) {
  KL_CHECK_ARG(estimator >= kK1 && estimator <= kFull, "estimator", "must be a code 0-4 (estimators.py), got ", estimator);
  const acc_t none = std::numeric_limits<acc_t>::infinity();
  return {estimator, straight_through, log_ratio_clamp ? acc_t(*log_ratio_clamp) : none,
          kl_clamp ? acc_t(*kl_clamp) : none};
}

template <typename acc_t>
acc_t coefficient(const std::optional<Tensor>& kl_coef, double scalar_kl_coef) {
  return kl_coef.has_value() ? kl_coef->to(c10::CppTypeToScalarType<acc_t>::value).template item<acc_t>()
                             : static_cast<acc_t>(scalar_kl_coef);
}

KL_PENALTY_FWD_OUTPUTS kl_penalty_fwd_cpu(KL_PENALTY_FWD_ARGS) {
  const bool full = estimator == kFull;
  KL_CHECK_ARG(ref_logits.has_value() != ref_logprobs.has_value(), "ref_logits", "or ref_logprobs: exactly one is needed");
  auto [logp, ref_logp, ent, full_kl, lse, ref_lse] = fused_kl_fwd_cpu(
      logits, labels, ref_logits, temperature, scalar_temperature, ignore_index, 0, logits.size(2), need_entropy, full);
  const int64_t B = logits.size(0), T = logits.size(1), N = B * T;
  const std::vector<int64_t> bounds = sequence_bounds(padded, B, T, cu_seqlens);
  const int64_t S = static_cast<int64_t>(bounds.size()) - 1;
  KL_CHECK_ARG(S < (int64_t(1) << 31), "cu_seqlens", "may hold at most 2^31 - 1 sequences");
  const Tensor valid = valid_rows(mask, N);
  const auto options = logp.options();
  if (ref_logprobs.has_value()) ref_logp = at::empty({N}, options);
  Tensor kl = at::empty({N}, options), penalty = at::empty({N}, options), kl_sum = at::empty({S}, options),
         kl_mean = at::empty({S}, options), counts = at::empty({S}, options),
         sequence = at::empty({N}, options.dtype(at::kInt));
  int32_t* seq = sequence.data_ptr<int32_t>();
  std::fill(seq, seq + N, -1);  // rows outside every sequence (packed, validate=False) stay -1
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "kl_penalty_fwd_cpu", [&] {
    using acc_t = scalar_t;
    const EstimatorSpec<acc_t> spec = estimator_spec<acc_t>(estimator, straight_through, log_ratio_clamp, kl_clamp);
    const acc_t coef = coefficient<acc_t>(kl_coef, scalar_kl_coef);
    Tensor given_holder;
    const acc_t* given = per_row<acc_t>(ref_logprobs, given_holder, N, logp.scalar_type(), "ref_logprobs");
    const int64_t* y = labels.data_ptr<int64_t>();
    const bool* ok = valid.defined() ? valid.data_ptr<bool>() : nullptr;
    const acc_t* lp = logp.data_ptr<acc_t>();
    acc_t* rlp = ref_logp.data_ptr<acc_t>();
    const acc_t* fk = full ? full_kl.data_ptr<acc_t>() : nullptr;
    acc_t *k = kl.data_ptr<acc_t>(), *pen = penalty.data_ptr<acc_t>();
    at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const bool labelled = y[n] != ignore_index;
        if (given) rlp[n] = labelled ? given[n] : acc_t(0);
        // select, never multiply: a masked row's NaN or infinite log-ratio reaches no output
        const bool use = labelled && (!ok || ok[n]);
        k[n] = use ? estimate(spec, lp[n], rlp[n], fk ? fk[n] : acc_t(0)).value : acc_t(0);
        pen[n] = -coef * k[n];
      }
    });
    acc_t *sum = kl_sum.data_ptr<acc_t>(), *mean = kl_mean.data_ptr<acc_t>(), *cnt = counts.data_ptr<acc_t>();
    at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        double total = 0;  // in row order, in double: deterministic, and no drift over long sequences
        int64_t used = 0;
        for (int64_t n = bounds[s]; n < bounds[s + 1]; ++n) {
          seq[n] = static_cast<int32_t>(s);
          total += static_cast<double>(k[n]);
          used += y[n] != ignore_index && (!ok || ok[n]);
        }
        sum[s] = static_cast<acc_t>(total);
        cnt[s] = static_cast<acc_t>(used);
        mean[s] = sum[s] / std::max(cnt[s], acc_t(1));  // a sequence with no valid row: 0 / 1
      }
    });
  });
  return {logp, ref_logp, kl, penalty, kl_sum, kl_mean, counts, sequence, ent, full_kl, lse, ref_lse};
}

// The rows' upstream gradients (of logp and, for `full`, of the exact KL) from those of the six
// outputs, then the row backward.
void kl_penalty_bwd_into(KL_PENALTY_BWD_ARGS, const Tensor& logits, KL_PENALTY_BWD_REST, Tensor& grad) {
  check_rows(logits, "logits");
  const int64_t B = logits.size(0), T = logits.size(1), N = B * T;
  check_labels(labels, N);
  const bool full = estimator == kFull;
  const int64_t S = counts.numel();
  KL_CHECK_ARG(sequence.scalar_type() == at::kInt && sequence.is_contiguous() && sequence.numel() == N, "sequence",
               "must be the forward's contiguous int32 [", N, "] sequence ids");
  const Tensor valid = valid_rows(mask, N);
  const bool through_kl = grad_kl || grad_penalty || grad_kl_sum || grad_kl_mean;
  const at::ScalarType acc = logp.scalar_type();
  AT_DISPATCH_FLOATING_TYPES(acc, "kl_penalty_bwd_cpu", [&] {
    using acc_t = scalar_t;
    const EstimatorSpec<acc_t> spec = estimator_spec<acc_t>(estimator, straight_through, log_ratio_clamp, kl_clamp);
    const acc_t coef = through_kl && grad_penalty ? coefficient<acc_t>(kl_coef, scalar_kl_coef) : acc_t(0);
    Tensor h[6];
    const acc_t* gl = per_row<acc_t>(grad_logp, h[0], N, acc, "grad_logp");
    const acc_t* gk = per_row<acc_t>(grad_kl, h[1], N, acc, "grad_kl");
    const acc_t* gp = per_row<acc_t>(grad_penalty, h[2], N, acc, "grad_penalty");
    const acc_t* gs = per_row<acc_t>(grad_kl_sum, h[3], S, acc, "grad_kl_sum");
    const acc_t* gm = per_row<acc_t>(grad_kl_mean, h[4], S, acc, "grad_kl_mean");
    const acc_t* fk = full ? per_row<acc_t>(full_out, h[5], N, acc, "full_kl") : nullptr;
    const acc_t *lp = logp.data_ptr<acc_t>(), *rlp = ref_logp.data_ptr<acc_t>(), *cnt = counts.data_ptr<acc_t>();
    const int64_t* y = labels.data_ptr<int64_t>();
    const bool* ok = valid.defined() ? valid.data_ptr<bool>() : nullptr;
    // the logp and (for full) exact-KL gradients the row backward takes
    Tensor row_grad = at::empty({N}, logp.options()), full_grad = at::empty({full ? N : 0}, logp.options());
    acc_t *rg = row_grad.data_ptr<acc_t>(), *fg = full ? full_grad.data_ptr<acc_t>() : nullptr;
    const int32_t* seq = sequence.data_ptr<int32_t>();
    at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t s = seq[n];  // -1: outside every sequence (packed, validate=False), no sum term
        const bool use = through_kl && y[n] != ignore_index && (!ok || ok[n]);
        const acc_t upstream =
            use ? kl_upstream(gk ? gk[n] : acc_t(0), gp ? gp[n] : acc_t(0), coef, gs && s >= 0 ? gs[s] : acc_t(0),
                              gm && s >= 0 ? gm[s] : acc_t(0), s >= 0 ? cnt[s] : acc_t(1))
                : acc_t(0);
        const acc_t slope = use ? estimate(spec, lp[n], rlp[n], fk ? fk[n] : acc_t(0)).slope : acc_t(0);
        const acc_t through = times_slope(upstream, slope);
        rg[n] = (gl ? gl[n] : acc_t(0)) + (full ? acc_t(0) : through);
        if (full) fg[n] = through;
      }
    });
    fused_kl_bwd_into(row_grad, grad_entropy, full ? std::optional<Tensor>(full_grad) : std::nullopt, logits, labels,
                      full ? ref_logits : std::optional<Tensor>(), temperature, scalar_temperature, ignore_index, 0, logits.size(2),
                      lse, full ? ref_lse : std::optional<Tensor>(), entropy_out,
                      full ? full_out : std::optional<Tensor>(), grad);
  });
}

Tensor kl_penalty_bwd_cpu(KL_PENALTY_BWD_ARGS, const Tensor& logits, KL_PENALTY_BWD_REST) {
  Tensor grad = gradient_cache().empty_like(logits);
  KL_PENALTY_BWD_CALL(logits, grad);
  return grad;
}

void kl_penalty_bwd_inplace_cpu(KL_PENALTY_BWD_ARGS, Tensor& logits, KL_PENALTY_BWD_REST) {
  KL_PENALTY_BWD_CALL(logits, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(kl_kernels, CPU, m) {
  m.impl("fused_kl_fwd", &fused_kl_fwd_cpu);
  m.impl("fused_kl_bwd", &fused_kl_bwd_cpu);
  m.impl("fused_kl_bwd_", &fused_kl_bwd_inplace_cpu);
  m.impl("kl_penalty_fwd", &kl_penalty_fwd_cpu);
  m.impl("kl_penalty_bwd", &kl_penalty_bwd_cpu);
  m.impl("kl_penalty_bwd_", &kl_penalty_bwd_inplace_cpu);
}

TORCH_LIBRARY_IMPL(kl_kernels, CompositeExplicitAutograd, m) {
  m.impl("empty_cpu_cache", [] { gradient_cache().release(); });
}

}  // namespace kl_kernels
