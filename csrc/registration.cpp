// Every C++ op schema of fastvl in one place, plus the Python module `fastvl._C` (build information).
// Kernels register their device implementations next to their code (TORCH_LIBRARY_IMPL in <op>/).
#include <Python.h>
#include <torch/library.h>

#include <string>

#ifndef FASTVL_CUDA_ARCHS
#define FASTVL_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(fastvl, m) {
  // Word-region alignment: IPOT transport plan. cost [B,N,M] f32, pads bool -> plan [B,N,M] f32.
  m.def("ipot_plan(Tensor cost, Tensor txt_pad, Tensor img_pad, float beta, int iterations, int k) -> Tensor");
  // VILLA adversarial step, in place, every slot (text, image) in one call: padded deltas/grads [B,L,D] with
  // masks bool [B,L] (True = valid), or packed [T,D] with masks = cu_seqlens int32 [B+1] and max_seqlens >= every
  // length; f32/bf16/f16; norm 'l2'|'linf'; max_norms 0 = no projection.
  m.def("adv_perturb_step_kernel(Tensor(a!)[] deltas, Tensor[] grads, Tensor[] masks, float[] lrs, str norm, "
        "float[] max_norms, int[] max_seqlens) -> ()");
  // VILLA random init, in place: noise [B,L,D] + mask, or [T,D] + cu_seqlens (uniform [-1,1] or normal noise)
  // -> scaled, masked perturbation.
  m.def("adv_perturb_init_kernel(Tensor(a!) noise, Tensor mask, float init_mag, str norm, int max_seqlen) -> ()");
  // SPADE normalisation: x, gamma, beta [N,C,H,W] f32/bf16/f16; mean/var float32 [G] running statistics (eval) or
  // None (from x); G = C (batch) or N*C (instance) -> (out, mean [G] f32, biased var [G] f32).
  m.def("spade_norm_fwd_kernel(Tensor x, Tensor gamma, Tensor beta, Tensor? mean, Tensor? var, bool instance, "
        "float eps) -> (Tensor, Tensor, Tensor)");
  // Its backward: dout, x, gamma [N,C,H,W], the forward's mean/var -> (dx, d_gamma, d_beta).
  m.def("spade_norm_bwd_kernel(Tensor dout, Tensor x, Tensor gamma, Tensor mean, Tensor var, bool instance, "
        "bool use_input_stats, float eps) -> (Tensor, Tensor, Tensor)");
  // BachGAN layout retrieval intersections of one chunk of maps: table int64 [NB,HW,S1] per-pixel query masks of
  // 64-query blocks, lut int32 [65536] id -> slot, maps uint8/int16 [B,HW] -> inter int32 [Q,B].
  m.def("layout_intersections_kernel(Tensor table, Tensor lut, Tensor maps, int num_queries) -> Tensor");
  // Per-map class areas: maps uint8/int16 [B,HW] -> int32 [B,C+1] (column C: ids neither in [0,C) nor ignore).
  m.def("layout_class_counts_kernel(Tensor maps, int num_classes, int ignore_index) -> Tensor");
}

namespace {

PyObject* build_info(PyObject*, PyObject*) {
#ifdef FASTVL_WITH_CUDA
  PyObject* cuda = Py_True;
#else
  PyObject* cuda = Py_False;
#endif
#ifdef _OPENMP
  PyObject* openmp = Py_True;
#else
  PyObject* openmp = Py_False;
#endif
  return Py_BuildValue("{s:O,s:s,s:O,s:s}", "cuda", cuda, "cuda_archs", FASTVL_CUDA_ARCHS, "openmp", openmp,
                       "compiler", __VERSION__);
}

PyMethodDef methods[] = {{"build_info", build_info, METH_NOARGS, "How this fastvl._C was built."},
                         {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastvl compiled kernels (ops register under torch.ops.fastvl)",
                      -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
