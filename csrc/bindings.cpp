// pybind11 bindings of the fused engine: the module magloss._C, imported only by
// magloss/_ext.py, which registers margin_ce / margin_ce_backward as the "cuda" kernels of
// the magloss::margin_ce / magloss::margin_ce_backward custom ops (magloss/ops.py), and
// one_vs_all / one_vs_all_backward as those of magloss::one_vs_all(_backward) (magloss/onevsall.py).
// Argument order and names mirror the op schemas exactly.
#include <torch/extension.h>

#include "input_checks.h"
#include "margin_ce.h"
#include "one_vs_all.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "magloss fused CUDA engine: normalized linear + margin + softmax cross-entropy (docs/cuda.md)";
  m.def("margin_ce", &magloss::margin_ce_cuda,
        "Fused forward: (lse, zy, reg, norms), each [B] float32, then the side outputs (label_cosine, "
        "nearest_negative_cosine, nearest_negative_class; empty without side). See magloss.ops.margin_ce.",
        py::arg("embeddings"), py::arg("weight"), py::arg("labels"), py::arg("sphere_lambda"),
        py::arg("row_margins"), py::arg("neg_threshold"), py::arg("neg_t"), py::arg("kind"), py::arg("scale"),
        py::arg("m1"), py::arg("m2"), py::arg("m3"), py::arg("l_a"), py::arg("u_a"), py::arg("l_m"), py::arg("u_m"),
        py::arg("boundary"), py::arg("straight_through"), py::arg("ignore_index"), py::arg("subcenters"),
        py::arg("side") = false);
  m.def("margin_ce_backward", &magloss::margin_ce_backward_cuda,
        "Fused backward: (grad_embeddings, grad_weight). See magloss.reference.margin_ce_backward.",
        py::arg("grad_lse"), py::arg("grad_zy"), py::arg("grad_reg"), py::arg("grad_norms"), py::arg("embeddings"),
        py::arg("weight"), py::arg("labels"), py::arg("lse"), py::arg("norms"), py::arg("sphere_lambda"),
        py::arg("row_margins"), py::arg("neg_threshold"), py::arg("neg_t"), py::arg("kind"), py::arg("scale"),
        py::arg("m1"), py::arg("m2"), py::arg("m3"), py::arg("l_a"), py::arg("u_a"), py::arg("l_m"), py::arg("u_m"),
        py::arg("boundary"), py::arg("straight_through"), py::arg("ignore_index"), py::arg("subcenters"));
  m.def("margin_ce_kept", &magloss::margin_ce_kept_cuda,
        "Fused forward of the speed path: (lse, zy, reg, norms, kept, kept_norms), then the side outputs as "
        "margin_ce's. See magloss.ops.margin_ce_kept.",
        py::arg("embeddings"), py::arg("weight"), py::arg("labels"), py::arg("sphere_lambda"),
        py::arg("row_margins"), py::arg("neg_threshold"), py::arg("neg_t"), py::arg("kind"), py::arg("scale"),
        py::arg("m1"), py::arg("m2"), py::arg("m3"), py::arg("l_a"), py::arg("u_a"), py::arg("l_m"), py::arg("u_m"),
        py::arg("boundary"), py::arg("straight_through"), py::arg("ignore_index"), py::arg("subcenters"),
        py::arg("side") = false);
  m.def("margin_ce_backward_kept", &magloss::margin_ce_backward_kept_cuda,
        "Fused backward of the speed path, from the forward's kept products. See magloss.ops.margin_ce_backward_kept.",
        py::arg("grad_lse"), py::arg("grad_zy"), py::arg("grad_reg"), py::arg("grad_norms"), py::arg("embeddings"),
        py::arg("weight"), py::arg("labels"), py::arg("lse"), py::arg("norms"), py::arg("kept"),
        py::arg("kept_norms"), py::arg("sphere_lambda"), py::arg("row_margins"), py::arg("neg_threshold"),
        py::arg("neg_t"), py::arg("kind"), py::arg("scale"), py::arg("m1"), py::arg("m2"), py::arg("m3"),
        py::arg("l_a"), py::arg("u_a"), py::arg("l_m"), py::arg("u_m"), py::arg("boundary"),
        py::arg("straight_through"), py::arg("ignore_index"), py::arg("subcenters"));
  m.def("chunk_columns", &magloss::chunk_columns,
        "Class-chunk width used for B rows and C classes (MAGLOSS_CHUNK or the default tile bound).", py::arg("B"),
        py::arg("C"));
  m.def("flush_input_checks", &magloss::flush_input_checks,
        "Wait for the pending asynchronous input checks of earlier fused calls and raise the first failure "
        "(ValueError); see magloss.flush_input_checks.");
  m.def("simt_path", &magloss::simt_path,
        "Whether calls on this CUDA device take the plain-fp32 path (MAGLOSS_FORCE_SIMT=1 or sm < 7.0).",
        py::arg("device_index"));
  m.def("one_vs_all", &magloss::one_vs_all_cuda,
        "Fused one-vs-all forward: (rows [B] float32, then with side the side outputs label_cosine, "
        "nearest_negative_cosine, nearest_negative_class, empty without). See magloss.onevsall.one_vs_all.",
        py::arg("embeddings"), py::arg("weight"), py::arg("labels"), py::arg("bias"), py::arg("kind"),
        py::arg("params"), py::arg("ignore_index"), py::arg("side") = false);
  m.def("one_vs_all_backward", &magloss::one_vs_all_backward_cuda,
        "Fused one-vs-all backward: (grad_embeddings, grad_weight, grad_bias [1] float32). See "
        "magloss.onevsall.one_vs_all_backward.",
        py::arg("grad_rows"), py::arg("embeddings"), py::arg("weight"), py::arg("labels"), py::arg("bias"),
        py::arg("kind"), py::arg("params"), py::arg("ignore_index"));
}
