// The torch boundary of the fused margin-softmax engine (the "cuda" kernels of the
// magloss::margin_ce / magloss::margin_ce_backward custom ops).
//
// This layer validates arguments (named CHECK macros, errors name the argument and raise
// ValueError/TypeError in Python), picks the device and stream, allocates every buffer,
// issues the class-chunked cuBLAS products through ATen and launches the torch-free kernels
// of engine.cu in between (C10_CUDA_KERNEL_LAUNCH_CHECK after each launch).
//
// Per call, with chunks of n <= N whole classes (chunk_classes; N*K weight rows with K sub-centers):
//   forward : col_norms(W) -> row_stage -> [input check] -> for each chunk:
//               S = x @ W_chunk^T (fp32 out) ; forward_epilogue(S)   -> finalize(lse)
//   backward: col_norms(W) -> row_stage(bwd) -> for each chunk:
//               S = x @ W_chunk^T ; T = backward_epilogue(S) (= G*r) ;
//               g_xhat += T @ W_chunk ; P = T^T @ xhat ; column_correction(P) -> dW_chunk
//             -> row_chain -> dx
// Extra memory: B*N fp32 tile (+ B*N half copy and N*D fp32 for half inputs; N*D half for the
// chunk cast of an fp32 W with half embeddings), O(B*D + C) otherwise: flat in C. W is never
// normalized or cast into a C x D copy (r_j is applied in the epilogues).
// The speed path (margin_ce_kept / margin_ce_backward_kept, docs/cuda.md "Two paths"): the forward's
// GEMM writes each chunk into its column block of a kept [B, K*C] fp32 matrix instead of the tile
// (the epilogue converts it in place to what the chunked engine keeps), and the backward reads the
// blocks instead of recomputing S: 1 + 2 products per chunk, B*K*C*4 bytes more.
#include "margin_ce.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "engine.cuh"
#include "input_checks.h"

// ---- named argument checks (messages name the argument, as magloss.checks does) ---------------
// MAGLOSS_EMULATED: compiled against the CPU build of torch for the CUDA emulator (tests/emu), whose
// stand-ins serve the CUDA runtime and c10::cuda calls below; its "device" tensors are CPU tensors.
#ifdef MAGLOSS_EMULATED
#define CHECK_CUDA(t, name) \
  TORCH_CHECK_VALUE((t).is_cpu(), name ": expected a CPU tensor (emulated CUDA device), got device ", (t).device())
#else
#define CHECK_CUDA(t, name) \
  TORCH_CHECK_VALUE((t).is_cuda(), name ": expected a CUDA tensor, got device ", (t).device())
#endif
#define CHECK_SAME_DEVICE(t, ref, name) \
  TORCH_CHECK_VALUE((t).device() == (ref).device(), name ": expected device ", (ref).device(), ", got ", (t).device())
#define CHECK_DIM(t, d, name, shape) \
  TORCH_CHECK_VALUE((t).dim() == (d), name ": expected shape " shape ", got ", (t).sizes())
#define CHECK_SIZE(t_, dim_, want_, name, what)                                                           \
  TORCH_CHECK_VALUE((t_).size(dim_) == (want_), name ": expected " what " = ", (want_), " in dim ", (dim_), \
                    ", got shape ", (t_).sizes())
#define CHECK_DTYPE(t, name)                                                                                 \
  TORCH_CHECK_TYPE(engine_dtype_ok((t).scalar_type()),                                                     \
                   name ": expected a float32/float16/bfloat16 CUDA tensor (float64 runs the chunked engine), got ", \
                   (t).scalar_type())
#define CHECK_LABEL_DTYPE(t, name)                                                                      \
  TORCH_CHECK_TYPE((t).scalar_type() == at::kLong || (t).scalar_type() == at::kInt,                    \
                   name ": expected an int64 or int32 tensor of class indices, got ", (t).scalar_type())
#define CHECK_CONTIGUOUS(t, name) TORCH_CHECK((t).is_contiguous(), name ": internal error, expected contiguous")
// The optional tensor arguments (row_margins, neg_threshold, neg_t): fp32, the compute dtype of
// fp32/fp16/bf16 embeddings (float64 inputs never reach this file: they run the chunked engine),
// contiguous. ValueError for every one of these, as magloss.checks.check_extras raises.
#define CHECK_COMPUTE_DTYPE(t, name)                                                                            \
  TORCH_CHECK_VALUE((t).scalar_type() == at::kFloat,                                                            \
                    name ": expected a float32 tensor (the compute dtype of float32/float16/bfloat16 embeddings), " \
                    "got ", (t).scalar_type())
#define CHECK_INPUT_CONTIGUOUS(t, name) \
  TORCH_CHECK_VALUE((t).is_contiguous(), name ": expected a contiguous tensor, got strides ", (t).strides())
#define CHECK_SCALAR_TENSOR(t, name) \
  TORCH_CHECK_VALUE((t).dim() == 0, name ": expected a 0-d tensor, got shape ", (t).sizes())
#define CHECK_SHAPE2(t, d0, d1, name, shape)                                                                     \
  TORCH_CHECK_VALUE((t).dim() == 2 && (t).size(0) == (d0) && (t).size(1) == (d1),                                \
                    name ": expected shape " shape " = [", (d0), ", ", (d1), "], got ", (t).sizes())
#define CHECK_SHAPE1(t, d0, name, shape) \
  TORCH_CHECK_VALUE((t).dim() == 1 && (t).size(0) == (d0), name ": expected shape " shape " = [", (d0), "], got ", (t).sizes())
#define CHECK_NEEDS_COMBINED(kind, what)                                                                      \
  TORCH_CHECK_VALUE((kind) == COMBINED, what " only with kind COMBINED (0), got kind ", (kind))

namespace magloss {
namespace {

using engine::DType;

bool engine_dtype_ok(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// The autocast pair: fp16/bf16 embeddings with an fp32 class matrix. The math uses W rounded
// to the embeddings' dtype (the kernels round on load, the products get per-chunk casts) and
// dL/dW is written in fp32: no C x D half copy of W exists at any time.
bool mixed_weight(const at::Tensor& x, const at::Tensor& w) {
  return w.scalar_type() == at::kFloat && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16);
}

DType to_engine(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "magloss: unsupported dtype ", t);
  return DType::F32;  // unreachable
}

bool env_flag(const char* name, bool dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  const std::string s(v);
  if (s == "0" || s == "false" || s == "False" || s == "no" || s == "off") return false;
  return true;
}

MarginParams make_params(int64_t kind, double scale, double m1, double m2, double m3, double l_a, double u_a,
                         double l_m, double u_m, int64_t boundary, bool straight_through) {
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 3, "kind: unknown margin family ", kind);
  TORCH_CHECK_VALUE(boundary >= THRESHOLD && boundary <= NONE,
                    "boundary: expected 0 (THRESHOLD), 1 (EASY), 2 (CLIP) or 3 (NONE), got ", boundary);
  if (boundary == CLIP || boundary == NONE) {
    CHECK_NEEDS_COMBINED(kind, "boundary: the CLIP (2) and NONE (3) policies are defined");
  }
  MarginParams p;
  p.kind = static_cast<int>(kind);
  p.scale = static_cast<float>(scale);
  p.m1 = static_cast<float>(m1);
  p.m2 = static_cast<float>(m2);
  p.m3 = static_cast<float>(m3);
  p.l_a = static_cast<float>(l_a);
  p.u_a = static_cast<float>(u_a);
  p.l_m = static_cast<float>(l_m);
  p.u_m = static_cast<float>(u_m);
  p.boundary = static_cast<int>(boundary);
  p.straight_through = straight_through;
  return p;
}

// Argument checks shared by both entry points; returns nothing, raises on failure.
void check_operands(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels) {
  CHECK_CUDA(x, "embeddings");
  CHECK_SAME_DEVICE(w, x, "weight");
  CHECK_SAME_DEVICE(labels, x, "labels");
  CHECK_DTYPE(x, "embeddings");
  CHECK_DTYPE(w, "weight");
  TORCH_CHECK_TYPE(x.scalar_type() == w.scalar_type() || mixed_weight(x, w),
                   "embeddings, weight: expected the same dtype (or a float32 weight with float16/bfloat16 "
                   "embeddings), got ", x.scalar_type(), " and ", w.scalar_type());
  CHECK_LABEL_DTYPE(labels, "labels");
  CHECK_DIM(x, 2, "embeddings", "[B, D]");
  CHECK_DIM(w, 2, "weight", "[C, D]");
  CHECK_DIM(labels, 1, "labels", "[B]");
  TORCH_CHECK_VALUE(w.size(0) > 0, "weight: expected at least one class, got C = 0");
  CHECK_SIZE(x, 1, w.size(1), "embeddings", "embedding size D");
  CHECK_SIZE(labels, 0, x.size(0), "labels", "one label per embedding row, B");
  TORCH_CHECK_VALUE(x.size(0) < engine::FLAG_CLEAR, "embeddings: at most ", engine::FLAG_CLEAR - 1,
                    " rows are supported, got ", x.size(0));
  TORCH_CHECK_VALUE(w.size(0) < engine::FLAG_CLEAR, "weight: at most ", engine::FLAG_CLEAR - 1,
                    " classes are supported, got ", w.size(0));
}

// The optional engine inputs (per-row margins, curricular modulation, sub-centers), checked; undefined
// tensors where absent.
struct Features {
  at::Tensor row_margins, neg_threshold, neg_t;
  int64_t K = 1;
  int64_t classes = 0;  // C = weight rows / K
};

Features check_features(const at::Tensor& x, const at::Tensor& w, int64_t kind,
                        const std::optional<at::Tensor>& row_margins, const std::optional<at::Tensor>& neg_threshold,
                        const std::optional<at::Tensor>& neg_t, int64_t subcenters) {
  const int64_t B = x.size(0);
  Features f;
  TORCH_CHECK_VALUE(subcenters >= 1, "subcenters: expected K >= 1 sub-centers per class, got ", subcenters);
  TORCH_CHECK_VALUE(w.size(0) % subcenters == 0, "weight: expected K*C rows for subcenters K = ", subcenters,
                    ", got ", w.size(0), " rows (not a multiple of ", subcenters, ")");
  f.K = subcenters;
  f.classes = w.size(0) / subcenters;
  if (row_margins.has_value() && row_margins->defined()) {
    const at::Tensor& t = *row_margins;
    CHECK_NEEDS_COMBINED(kind, "row_margins: per-row margins are defined");
    CHECK_SAME_DEVICE(t, x, "row_margins");
    CHECK_COMPUTE_DTYPE(t, "row_margins");
    CHECK_SHAPE2(t, B, 2, "row_margins", "[B, 2]");
    CHECK_INPUT_CONTIGUOUS(t, "row_margins");
    f.row_margins = t;
  }
  const bool has_tau = neg_threshold.has_value() && neg_threshold->defined();
  const bool has_t = neg_t.has_value() && neg_t->defined();
  TORCH_CHECK_VALUE(has_tau == has_t, "neg_threshold, neg_t: expected both (the curricular modulation) or neither, "
                    "got ", has_tau ? "neg_threshold without neg_t" : "neg_t without neg_threshold");
  if (has_tau) {
    CHECK_SAME_DEVICE(*neg_threshold, x, "neg_threshold");
    CHECK_COMPUTE_DTYPE(*neg_threshold, "neg_threshold");
    CHECK_SHAPE1(*neg_threshold, B, "neg_threshold", "[B]");
    CHECK_INPUT_CONTIGUOUS(*neg_threshold, "neg_threshold");
    CHECK_SAME_DEVICE(*neg_t, x, "neg_t");
    CHECK_COMPUTE_DTYPE(*neg_t, "neg_t");
    CHECK_SCALAR_TENSOR(*neg_t, "neg_t");
    f.neg_threshold = *neg_threshold;
    f.neg_t = *neg_t;  // 0-d: one element
  }
  return f;
}

// Points the RowState's feature inputs at f's tensors (nullptr where absent) and, with sub-centers,
// at a [B] int32 buffer for the label class's winning sub-center (returned, to keep it alive).
at::Tensor attach_features(const Features& f, engine::RowState& rows, const at::Tensor& x) {
  rows.row_margins = f.row_margins.defined() ? f.row_margins.data_ptr<float>() : nullptr;
  rows.neg_threshold = f.neg_threshold.defined() ? f.neg_threshold.data_ptr<float>() : nullptr;
  rows.neg_t = f.neg_t.defined() ? f.neg_t.data_ptr<float>() : nullptr;
  if (f.K == 1) {
    rows.label_sub = nullptr;
    return at::Tensor();
  }
  at::Tensor sub = at::empty({x.size(0)}, x.options().dtype(at::kInt));
  rows.label_sub = sub.data_ptr<int32_t>();
  return sub;
}

// SphereFace's lambda as a device float scalar (kept alive by the returned tensor), or undefined.
at::Tensor lambda_tensor(int64_t kind, const std::optional<at::Tensor>& sphere_lambda, const at::Tensor& x) {
  if (kind != SPHERE) return at::Tensor();
  TORCH_CHECK_VALUE(sphere_lambda.has_value() && sphere_lambda->defined(),
                    "sphere_lambda: SphereFace needs the annealing weight lambda");
  TORCH_CHECK_VALUE(sphere_lambda->numel() == 1, "sphere_lambda: expected a 0-d tensor, got shape ",
                    sphere_lambda->sizes());
  return sphere_lambda->to(x.device(), at::kFloat).reshape({1}).contiguous();
}

// The plain-fp32 product path: forced by MAGLOSS_FORCE_SIMT, or a GPU without tensor cores.
// TF32 is switched off for this thread only, for the scope of the call, with ATen's
// thread-local at::NoTF32Guard: the global torch.backends.cuda.matmul settings are never
// written (flipping them would race with other threads and trip torch's legacy/new TF32
// API consistency check).
class SimtScope {
 public:
  explicit SimtScope(bool on) {
    if (on) guard_.emplace();
  }

 private:
  std::optional<at::NoTF32Guard> guard_;
};

// Whether aten::mm / aten::addmm with out_dtype=float32 accept fp16/bf16 inputs on this build
// (they do in the torch versions we target; probed once per dtype so that a torch without them
// degrades to the fp32 products with a warning instead of failing).
bool half_fp32_out_supported(const at::Tensor& like) {
  static std::atomic<int> state[2] = {-1, -1};  // [fp16, bf16]: -1 unknown, 0 no, 1 yes
  std::atomic<int>& st = state[like.scalar_type() == at::kBFloat16 ? 1 : 0];
  int s = st.load();
  if (s < 0) {
    try {
      const at::Tensor a = at::ones({2, 2}, like.options());
      at::Tensor o = at::mm(a, a, at::kFloat);
      at::addmm_out(o, o, a, a, at::kFloat);
      s = 1;
    } catch (const c10::Error& e) {
      TORCH_WARN("magloss: aten::mm with out_dtype=float32 is unavailable for ", like.scalar_type(), " (",
                 e.what_without_backtrace(), "); the fused engine uses fp32 products for these inputs");
      s = 0;
    }
    st.store(s);
  }
  return s == 1;
}

// The class chunk as the products use it: rounded to the embeddings' dtype (a copy only for
// the autocast pair), then up-cast to fp32 on the SIMT path.
at::Tensor chunk_operand(const at::Tensor& w_chunk, at::ScalarType x_dtype, bool simt) {
  const at::Tensor rounded = w_chunk.to(x_dtype);
  return simt ? rounded.to(at::kFloat) : rounded;
}

// S = x_gemm @ w_op^T as fp32 into `tile` ([B, n], contiguous). x_gemm is x itself, or x in
// fp32 on the SIMT path; w_op comes from chunk_operand.
void raw_dots(at::Tensor& tile, const at::Tensor& x_gemm, const at::Tensor& w_op) {
  if (w_op.scalar_type() == at::kFloat) {
    at::mm_out(tile, x_gemm, w_op.t());  // honours the TF32 settings (off on the SIMT path)
  } else {
    at::mm_out(tile, x_gemm, w_op.t(), at::kFloat);  // aten::mm.dtype_out: half in, fp32 accumulate/out
  }
}

// Views of one [K, B] fp32 workspace as the RowState arrays.
struct Workspace {
  at::Tensor f;    // [K, B] fp32
  at::Tensor lab;  // [B] int64
  float* row(int k) { return f.select(0, k).data_ptr<float>(); }
};

// What both entry points launch on: contiguous operands (non-contiguous inputs are copied once
// here; the Python engines accept any strides), their engine dtypes, SphereFace's lambda as a device
// float (undefined otherwise) and the current stream.
struct Operands {
  at::Tensor x, w, labels, lam;
  DType dt = DType::F32, wdt = DType::F32;
  cudaStream_t stream = nullptr;
};

Operands prepare(const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
                 const std::optional<at::Tensor>& sphere_lambda, int64_t kind) {
  Operands o;
  o.x = embeddings.contiguous();
  o.w = weight.contiguous();
  o.labels = labels.contiguous();
  CHECK_CONTIGUOUS(o.x, "embeddings");
  CHECK_CONTIGUOUS(o.w, "weight");
  o.lam = lambda_tensor(kind, sphere_lambda, o.x);
  o.dt = to_engine(o.x.scalar_type());
  o.wdt = to_engine(o.w.scalar_type());
  o.stream = c10::cuda::getCurrentCUDAStream().stream();
  return o;
}

// Output of the first two launches of both entry points: r_j and ||w_j|| ([2, C] fp32) and the
// device error flags.
struct ColumnStats {
  at::Tensor colr, flags;
  float* r() const { return colr.select(0, 0).data_ptr<float>(); }
  float* wnorm() const { return colr.select(0, 1).data_ptr<float>(); }
};

// col_norms(W), then the row stage (forward or backward outputs of `rows`).
// C = classes (weight rows / K); r_j and ||w_j|| are per weight row.
ColumnStats row_stages(const Operands& o, int64_t C, int64_t K, int64_t ignore_index, const MarginParams& params,
                       const engine::RowState& rows, bool backward) {
  const int64_t B = o.x.size(0), D = o.x.size(1), rows_w = o.w.size(0);
  ColumnStats cs{at::empty({2, rows_w}, o.x.options().dtype(at::kFloat)),
                 at::full({engine::NUM_FLAGS}, engine::FLAG_CLEAR, o.x.options().dtype(at::kInt))};
  engine::launch_col_norms(o.dt, o.wdt, o.w.data_ptr(), rows_w, D, cs.r(), cs.wnorm(), cs.flags.data_ptr<int32_t>(),
                           o.stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  engine::launch_row_stage(o.dt, o.wdt, o.x.data_ptr(), o.w.data_ptr(), o.labels.data_ptr(),
                           o.labels.scalar_type() == at::kLong, B, C, K, D, ignore_index, params,
                           o.lam.defined() ? o.lam.data_ptr<float>() : nullptr, cs.r(), rows, backward,
                           cs.flags.data_ptr<int32_t>(), o.stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return cs;
}

// Plain fp32 products: a GPU without tensor cores, MAGLOSS_FORCE_SIMT, or a torch without
// half-in/fp32-out products.
bool use_simt(const Operands& o) {
  return simt_path(o.x.get_device()) || (o.dt != DType::F32 && !half_fp32_out_supported(o.x));
}

}  // namespace

int64_t chunk_columns(int64_t B, int64_t C) {
  int64_t n = 0;
  const char* v = std::getenv("MAGLOSS_CHUNK");
  if (v != nullptr && *v != '\0') {
    char* end = nullptr;
    const long long parsed = std::strtoll(v, &end, 10);
    TORCH_CHECK_VALUE(end != v && *end == '\0' && parsed > 0, "MAGLOSS_CHUNK: expected a positive integer, got '",
                      v, "'");
    n = parsed;
  } else {
    constexpr int64_t kTileBudget = int64_t{1} << 22;  // fp32 elements of the B x n tile (16 MiB)
    n = kTileBudget / std::max<int64_t>(B, 1);
    n = std::max<int64_t>(n, 1024);
    n = (n + 255) / 256 * 256;
  }
  return std::max<int64_t>(std::min<int64_t>(n, C), 1);
}

int64_t chunk_classes(int64_t B, int64_t C, int64_t K) {
  return std::max<int64_t>(chunk_columns(B, K * C) / K, 1);
}

bool simt_path(int64_t device_index) {
  if (env_flag("MAGLOSS_FORCE_SIMT", false)) return true;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, static_cast<int>(device_index)));
  return major < 7;  // no tensor cores before Volta
}

namespace {

// Both forwards. keep (the speed path): each chunk's product goes straight into its column block of
// `kept` [B, K*C] (a strided GEMM output), which the epilogue converts in place to what the chunked
// engine keeps; kept_norms = ||w_j|| from col_norms. Otherwise a B x n*K scratch tile (flat path).
using Rows6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Side3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Rows9 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor, at::Tensor>;

// The side outputs (label_cosine, nearest_negative_cosine, nearest_negative_class): [B] with `side`
// (filled by the forward), empty otherwise (nothing computed).
Side3 side_outputs(const at::Tensor& like, int64_t B, bool side) {
  const int64_t n = side ? B : 0;
  const auto fopt = like.options().dtype(at::kFloat);
  return {at::empty({n}, fopt), at::empty({n}, fopt), at::empty({n}, like.options().dtype(at::kLong))};
}

// Both forwards; side (the side outputs, docs/math.md): the epilogue tracks each row's largest
// non-label class cosine and its class, and the row stage's label cosine is returned.
Rows9 forward_impl(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& sphere_lambda, const std::optional<at::Tensor>& row_margins,
    const std::optional<at::Tensor>& neg_threshold, const std::optional<at::Tensor>& neg_t, int64_t kind,
    double scale, double m1, double m2, double m3, double l_a, double u_a, double l_m, double u_m, int64_t boundary,
    bool straight_through, int64_t ignore_index, int64_t subcenters, bool keep, bool side) {
  poll_input_checks(/*wait=*/false);  // an earlier call's failed input check is raised first
  check_operands(embeddings, weight, labels);
  const MarginParams params = make_params(kind, scale, m1, m2, m3, l_a, u_a, l_m, u_m, boundary, straight_through);
  const Features feat = check_features(embeddings, weight, kind, row_margins, neg_threshold, neg_t, subcenters);
  const c10::cuda::CUDAGuard device_guard(embeddings.device());
  // Internal products must be neither recorded by autograd nor re-cast by autocast.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);

  const int64_t B = embeddings.size(0), C = feat.classes, K = feat.K;
  const auto fopt = embeddings.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({B}, fopt), zy = at::empty({B}, fopt), reg = at::empty({B}, fopt),
             norms = at::empty({B}, fopt);
  at::Tensor kept = keep ? at::empty({B, C * K}, fopt) : at::Tensor();
  auto [label_cos, nn_cos, nn_cls] = side_outputs(embeddings, B, side);
  if (B == 0) {  // no launch: the kept row norms as the kernels would give them (W rounded to x's dtype)
    const at::Tensor kn = keep ? weight.to(embeddings.scalar_type()).to(at::kFloat).norm(2, {1}) : at::Tensor();
    return {lse, zy, reg, norms, kept, kn, label_cos, nn_cos, nn_cls};
  }

  const Operands o = prepare(embeddings, weight, labels, sphere_lambda, kind);
  const at::Tensor& x = o.x;
  const CheckMode check = check_mode();

  Workspace ws{at::empty({7, B}, fopt), at::empty({B}, x.options().dtype(at::kLong))};
  engine::RowState rows{};
  rows.a = norms.data_ptr<float>();
  rows.inv_a = ws.row(0);
  rows.scale = ws.row(1);
  rows.cy = ws.row(2);
  rows.zlab = ws.row(3);
  rows.dpsi_dc = ws.row(4);
  rows.dpsi_da = ws.row(5);
  rows.run_sum = ws.row(6);
  rows.run_max = lse.data_ptr<float>();  // becomes lse in place at the end
  rows.lab = ws.lab.data_ptr<int64_t>();
  rows.zy = zy.data_ptr<float>();
  rows.reg = reg.data_ptr<float>();
  if (side) {
    rows.nn_val = nn_cos.data_ptr<float>();
    rows.nn_idx = nn_cls.data_ptr<int64_t>();
  }
  const at::Tensor label_sub = attach_features(feat, rows, x);

  const ColumnStats cs = row_stages(o, C, K, ignore_index, params, rows, /*backward=*/false);
  const float* r = cs.r();

  // Input check (docs/cuda.md, "Label and value checks"): the flags and labels are copied to
  // pinned memory asynchronously right after the kernels that write the flags. Async (default):
  // no host wait; a failure is raised by a later fused call or flush_input_checks(), and bad rows
  // meanwhile get lse = NaN. Sync: the host waits, but only after every chunk is enqueued.
  const std::unique_ptr<InputReadback> sync_check =
      submit_input_check(check, cs.flags, o.labels, C, ignore_index, o.stream);

  const bool simt = use_simt(o);
  SimtScope simt_scope(simt);
  const at::Tensor x_gemm = simt ? x.to(at::kFloat) : x;
  // Chunks of N whole classes: N*K weight rows, the tile's columns.
  const int64_t N = chunk_classes(B, C, K);
  at::Tensor tile_store = keep ? at::Tensor() : at::empty({B * N * K}, fopt);
  for (int64_t j0 = 0; j0 < C; j0 += N) {
    const int64_t n = std::min<int64_t>(N, C - j0);
    at::Tensor tile = keep ? kept.narrow(1, j0 * K, n * K) : tile_store.narrow(0, 0, B * n * K).view({B, n * K});
    raw_dots(tile, x_gemm, chunk_operand(o.w.narrow(0, j0 * K, n * K), x.scalar_type(), simt));
    engine::launch_forward_epilogue(tile.data_ptr<float>(), tile.stride(0), keep, B, n, j0, K, r, rows, o.stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  engine::launch_forward_finalize(B, rows, lse.data_ptr<float>(), o.stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (sync_check) sync_check->raise_if_failed();
  if (side) label_cos.copy_(ws.f.select(0, 2));  // rows.cy: 0 without a label column
  return {lse, zy, reg, norms, kept, keep ? cs.colr.select(0, 1).clone() : at::Tensor(), label_cos, nn_cos, nn_cls};
}

}  // namespace

Rows7 margin_ce_cuda(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& sphere_lambda, const std::optional<at::Tensor>& row_margins,
    const std::optional<at::Tensor>& neg_threshold, const std::optional<at::Tensor>& neg_t, int64_t kind,
    double scale, double m1, double m2, double m3, double l_a, double u_a, double l_m, double u_m, int64_t boundary,
    bool straight_through, int64_t ignore_index, int64_t subcenters, bool side) {
  auto [lse, zy, reg, norms, kept, kept_norms, label_cos, nn_cos, nn_cls] =
      forward_impl(embeddings, weight, labels, sphere_lambda, row_margins, neg_threshold, neg_t, kind, scale, m1, m2,
                   m3, l_a, u_a, l_m, u_m, boundary, straight_through, ignore_index, subcenters, /*keep=*/false, side);
  return {lse, zy, reg, norms, label_cos, nn_cos, nn_cls};
}

Rows9 margin_ce_kept_cuda(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& sphere_lambda, const std::optional<at::Tensor>& row_margins,
    const std::optional<at::Tensor>& neg_threshold, const std::optional<at::Tensor>& neg_t, int64_t kind,
    double scale, double m1, double m2, double m3, double l_a, double u_a, double l_m, double u_m, int64_t boundary,
    bool straight_through, int64_t ignore_index, int64_t subcenters, bool side) {
  return forward_impl(embeddings, weight, labels, sphere_lambda, row_margins, neg_threshold, neg_t, kind, scale, m1,
                      m2, m3, l_a, u_a, l_m, u_m, boundary, straight_through, ignore_index, subcenters, /*keep=*/true,
                      side);
}

namespace {

// Both backwards. kept (the speed path, both defined or neither): the forward's kept matrix is read
// in place instead of recomputing each chunk's product, and never written; kept_norms is checked
// (the col_norms pass runs anyway: the row stage needs r_j before any chunk).
std::tuple<at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_lse, const at::Tensor& grad_zy, const at::Tensor& grad_reg, const at::Tensor& grad_norms,
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& norms, const at::Tensor& kept_in, const at::Tensor& kept_norms,
    const std::optional<at::Tensor>& sphere_lambda, const std::optional<at::Tensor>& row_margins,
    const std::optional<at::Tensor>& neg_threshold, const std::optional<at::Tensor>& neg_t, int64_t kind,
    double scale, double m1, double m2, double m3, double l_a, double u_a, double l_m, double u_m, int64_t boundary,
    bool straight_through, int64_t ignore_index, int64_t subcenters) {
  poll_input_checks(/*wait=*/false);
  check_operands(embeddings, weight, labels);
  const Features feat = check_features(embeddings, weight, kind, row_margins, neg_threshold, neg_t, subcenters);
  const int64_t B = embeddings.size(0), D = embeddings.size(1), C = feat.classes, K = feat.K;
  const bool speed = kept_in.defined();
  if (speed) {
    CHECK_SAME_DEVICE(kept_in, embeddings, "kept");
    CHECK_SAME_DEVICE(kept_norms, embeddings, "kept_norms");
    TORCH_CHECK_VALUE(kept_in.scalar_type() == at::kFloat && kept_in.dim() == 2 && kept_in.size(0) == B &&
                          kept_in.size(1) == C * K,
                      "kept: expected the forward's kept products (margin_ce_kept), float32 of shape [B, K*C] = [",
                      B, ", ", C * K, "], got ", kept_in.scalar_type(), " of shape ", kept_in.sizes());
    TORCH_CHECK_VALUE(kept_norms.scalar_type() == at::kFloat && kept_norms.dim() == 1 && kept_norms.size(0) == C * K,
                      "kept_norms: expected the forward's kept row norms (margin_ce_kept), float32 of shape [K*C] = [",
                      C * K, "], got ", kept_norms.scalar_type(), " of shape ", kept_norms.sizes());
  }
  const std::pair<const at::Tensor*, const char*> row_args[] = {
      {&grad_lse, "grad_lse"}, {&grad_zy, "grad_zy"}, {&grad_reg, "grad_reg"},
      {&grad_norms, "grad_norms"}, {&lse, "lse"}, {&norms, "norms"}};
  for (const auto& [t, name] : row_args) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == B, name, ": expected shape [", B, "], got ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == embeddings.device(), name, ": expected device ", embeddings.device(), ", got ",
                      t->device());
    TORCH_CHECK_TYPE(t->is_floating_point(), name, ": expected a float tensor, got ", t->scalar_type());
  }
  const MarginParams params = make_params(kind, scale, m1, m2, m3, l_a, u_a, l_m, u_m, boundary, straight_through);
  const c10::cuda::CUDAGuard device_guard(embeddings.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);

  if (B == 0) {
    return {at::empty({0, D}, embeddings.options()), at::zeros({C * K, D}, weight.options())};
  }
  const Operands o = prepare(embeddings, weight, labels, sphere_lambda, kind);
  const at::Tensor &x = o.x, &w = o.w;
  const DType dt = o.dt;
  const bool half = dt != DType::F32;
  const bool sbn = scale_by_norm(params);
  cudaStream_t stream = o.stream;
  const auto fopt = x.options().dtype(at::kFloat);
  auto as_f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const at::Tensor gl = as_f32(grad_lse), gz = as_f32(grad_zy), gr = as_f32(grad_reg), gn = as_f32(grad_norms),
                   lse_f = as_f32(lse);

  Workspace ws{at::empty({12, B}, fopt), at::empty({B}, x.options().dtype(at::kLong))};
  engine::RowState rows{};
  rows.a = ws.row(0);
  rows.inv_a = ws.row(1);
  rows.scale = ws.row(2);
  rows.cy = ws.row(3);
  rows.zlab = ws.row(4);
  rows.dpsi_dc = ws.row(5);
  rows.dpsi_da = ws.row(6);
  rows.dz_y = ws.row(7);
  rows.g_y = ws.row(8);
  rows.grad_a = ws.row(9);
  rows.gc_row = ws.row(10);
  rows.sph = ws.row(11);
  rows.lab = ws.lab.data_ptr<int64_t>();
  rows.grad_lse = gl.data_ptr<float>();
  rows.grad_zy = gz.data_ptr<float>();
  rows.grad_reg = gr.data_ptr<float>();
  rows.grad_norms = gn.data_ptr<float>();
  rows.lse = lse_f.data_ptr<float>();
  const at::Tensor label_sub = attach_features(feat, rows, x);

  // The saved `norms` is not read: a_i is recomputed from x, exactly as the Python engines do.
  const ColumnStats cs = row_stages(o, C, K, ignore_index, params, rows, /*backward=*/true);
  const float *r = cs.r(), *wnorm = cs.wnorm();

  const bool simt = use_simt(o);
  SimtScope simt_scope(simt);
  const at::Tensor x_gemm = simt ? x.to(at::kFloat) : x;
  // xhat for the dW product: fp32 (fp32 inputs or SIMT), else the input dtype (fp32 accumulation).
  const bool half_products = half && !simt;
  at::Tensor xhat = at::empty({B, D}, half_products ? x.options() : fopt);
  engine::launch_normalize_rows(dt, x.data_ptr(), B, D, rows.inv_a, half_products ? dt : DType::F32,
                                xhat.data_ptr(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor g_xhat = at::zeros({B, D}, fopt);
  at::Tensor grad_w = at::empty({C * K, D}, w.options());  // every row is written exactly once below
  const bool grad_w_f32 = o.wdt == DType::F32;                 // P is computed in place in grad_w
  // Chunks of N whole classes, as the forward; below n, j0 count classes, nw, w0 weight rows.
  const int64_t N = chunk_classes(B, C, K);
  const at::Tensor kept = speed ? kept_in.contiguous() : at::Tensor();  // read only: a retained graph reuses it
  // The fp32 tile: the product (flat) or T (speed, fp32 T only: never written into `kept`).
  at::Tensor tile_store = (speed && half_products) ? at::Tensor() : at::empty({B * N * K}, fopt);
  at::Tensor t_store = half_products ? at::empty({B * N * K}, x.options()) : at::Tensor();
  at::Tensor p_store = grad_w_f32 ? at::Tensor() : at::empty({N * K * D}, fopt);  // fp32 P for half grad_w
  for (int64_t j0 = 0; j0 < C; j0 += N) {
    const int64_t n = std::min<int64_t>(N, C - j0);
    const int64_t nw = n * K, w0 = j0 * K;
    const at::Tensor w_op = chunk_operand(w.narrow(0, w0, nw), x.scalar_type(), simt);
    at::Tensor tile = speed ? kept.narrow(1, w0, nw) : tile_store.narrow(0, 0, B * nw).view({B, nw});
    if (!speed) raw_dots(tile, x_gemm, w_op);
    at::Tensor t = half_products ? t_store.narrow(0, 0, B * nw).view({B, nw})   // T = G * r
                                 : speed ? tile_store.narrow(0, 0, B * nw).view({B, nw}) : tile;
    engine::launch_backward_epilogue(tile.data_ptr<float>(), tile.stride(0), speed, t.data_ptr(),
                                     half_products ? dt : DType::F32, B, n, j0, K, r, rows, sbn, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // dL/dxhat += T @ W_chunk  ([B, n] @ [n, D]), fp32 accumulation into g_xhat.
    if (half_products) {
      at::addmm_out(g_xhat, g_xhat, t, w_op, at::kFloat);
    } else {
      g_xhat.addmm_(t, w_op);
    }
    // P = T^T @ xhat ([n, B] @ [B, D]) -> fp32, then the column correction writes dW_chunk.
    at::Tensor p = grad_w_f32 ? grad_w.narrow(0, w0, nw) : p_store.narrow(0, 0, nw * D).view({nw, D});
    if (half_products) {
      at::mm_out(p, t.t(), xhat, at::kFloat);
    } else {
      at::mm_out(p, t.t(), xhat);
    }
    engine::launch_column_correction(dt, o.wdt, p.data_ptr<float>(), w.data_ptr(), r, wnorm, nw, w0, D,
                                     grad_w.data_ptr(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor grad_x = at::empty({B, D}, x.options());
  engine::launch_row_chain(dt, x.data_ptr(), g_xhat.data_ptr<float>(), B, D, rows, sbn, grad_x.data_ptr(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_w};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> margin_ce_backward_cuda(
    const at::Tensor& grad_lse, const at::Tensor& grad_zy, const at::Tensor& grad_reg, const at::Tensor& grad_norms,
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& norms, const std::optional<at::Tensor>& sphere_lambda,
    const std::optional<at::Tensor>& row_margins, const std::optional<at::Tensor>& neg_threshold,
    const std::optional<at::Tensor>& neg_t, int64_t kind, double scale, double m1, double m2, double m3, double l_a,
    double u_a, double l_m, double u_m, int64_t boundary, bool straight_through, int64_t ignore_index,
    int64_t subcenters) {
  return backward_impl(grad_lse, grad_zy, grad_reg, grad_norms, embeddings, weight, labels, lse, norms, at::Tensor(),
                       at::Tensor(), sphere_lambda, row_margins, neg_threshold, neg_t, kind, scale, m1, m2, m3, l_a,
                       u_a, l_m, u_m, boundary, straight_through, ignore_index, subcenters);
}

std::tuple<at::Tensor, at::Tensor> margin_ce_backward_kept_cuda(
    const at::Tensor& grad_lse, const at::Tensor& grad_zy, const at::Tensor& grad_reg, const at::Tensor& grad_norms,
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& norms, const at::Tensor& kept, const at::Tensor& kept_norms,
    const std::optional<at::Tensor>& sphere_lambda, const std::optional<at::Tensor>& row_margins,
    const std::optional<at::Tensor>& neg_threshold, const std::optional<at::Tensor>& neg_t, int64_t kind,
    double scale, double m1, double m2, double m3, double l_a, double u_a, double l_m, double u_m, int64_t boundary,
    bool straight_through, int64_t ignore_index, int64_t subcenters) {
  return backward_impl(grad_lse, grad_zy, grad_reg, grad_norms, embeddings, weight, labels, lse, norms, kept,
                       kept_norms, sphere_lambda, row_margins, neg_threshold, neg_t, kind, scale, m1, m2, m3, l_a,
                       u_a, l_m, u_m, boundary, straight_through, ignore_index, subcenters);
}

}  // namespace magloss

// The one-vs-all boundary shares this file's helpers: compiled here, in this translation unit.
#include "one_vs_all.inc"
