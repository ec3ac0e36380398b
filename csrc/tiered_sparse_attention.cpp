// Torch glue of the CUDA tiered sparse attention forward: registers the private op
// longvideo::_tiered_sparse_attention_cuda (called by longvideo/ops/tiered_sparse_attention.py,
// which builds and caches the block schedule and the RoPE tables on the device).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <cstdint>

extern "C" int longvideo_tsa_launch(
    const void* q, const void* k, const void* v, void* o,
    const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides, const int64_t* o_strides,
    const int* full_idx, const int* full_cnt, const int* full_combo,
    const int* part_idx, const int* part_cnt, const int* part_combo, int full_w, int part_w, int num_q_blocks,
    const float* cos_t, const float* sin_t, int B, int H, int S, int head_dim, int frame_tokens,
    int local_frames, int stripe_frames, int stripe_width, int sink_frames, int rope_pairs, int w1, int w2,
    int layout, int te0, int te1, int te2, int te3, float scale, int dtype, int kernel, int block_m,
    void* stream);

namespace {

void check_schedule(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), "_tiered_sparse_attention_cuda: ", name, " must be on ", q.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, "_tiered_sparse_attention_cuda: ", name, " must be int32");
  TORCH_CHECK(t.is_contiguous(), "_tiered_sparse_attention_cuda: ", name, " must be contiguous");
}

at::Tensor tsa_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& full_idx,
                    const at::Tensor& full_cnt, const at::Tensor& full_combo, const at::Tensor& part_idx,
                    const at::Tensor& part_cnt, const at::Tensor& part_combo, const at::Tensor& cos_t,
                    const at::Tensor& sin_t, int64_t frame_tokens, int64_t local_frames, int64_t stripe_frames,
                    int64_t stripe_width, int64_t sink_frames, int64_t rope_pairs, int64_t w1, int64_t w2,
                    int64_t layout, at::IntArrayRef token_edges, double scale, int64_t kernel, int64_t block_m,
                    int64_t stream) {
  TORCH_CHECK(q.is_cuda(), "_tiered_sparse_attention_cuda: q must be a CUDA tensor");
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "_tiered_sparse_attention_cuda: q, k, v must share one (B, H, S, D) shape");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "_tiered_sparse_attention_cuda: q, k, v must share one dtype");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "_tiered_sparse_attention_cuda: dtype must be float16 or bfloat16");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  TORCH_CHECK(D == 64 || D == 128, "_tiered_sparse_attention_cuda: head dim must be 64 or 128, got ", D);
  TORCH_CHECK(frame_tokens >= 1 && S % frame_tokens == 0,
              "_tiered_sparse_attention_cuda: S must be a multiple of frame_tokens");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device() == q.device(), "_tiered_sparse_attention_cuda: q, k, v must be on one device");
    TORCH_CHECK(t->stride(3) == 1, "_tiered_sparse_attention_cuda: the head dim must be contiguous");
    TORCH_CHECK(t->stride(0) % 8 == 0 && t->stride(1) % 8 == 0 && t->stride(2) % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                "_tiered_sparse_attention_cuda: strides must be multiples of 8 elements and data 16-byte aligned");
  }
  check_schedule(full_idx, "full_idx", q);
  check_schedule(full_cnt, "full_cnt", q);
  check_schedule(full_combo, "full_combo", q);
  check_schedule(part_idx, "part_idx", q);
  check_schedule(part_cnt, "part_cnt", q);
  check_schedule(part_combo, "part_combo", q);
  // kernel 0: the legacy kernel (64-row query blocks); 1: the pipelined kernel (128-row query blocks)
  TORCH_CHECK((kernel == 0 && block_m == 64) || (kernel == 1 && block_m == 128),
              "_tiered_sparse_attention_cuda: kernel 0 takes block_m 64, kernel 1 block_m 128 (got kernel ", kernel,
              ", block_m ", block_m, ")");
  const int64_t num_q_blocks = full_cnt.numel();
  TORCH_CHECK(num_q_blocks == (S + block_m - 1) / block_m && part_cnt.numel() == num_q_blocks,
              "_tiered_sparse_attention_cuda: the schedule must have one row per ", block_m, "-row query block");
  TORCH_CHECK(full_idx.dim() == 2 && full_idx.size(0) == num_q_blocks && full_combo.sizes() == full_idx.sizes(),
              "_tiered_sparse_attention_cuda: full_idx/full_combo must be (num_q_blocks, width)");
  TORCH_CHECK(part_idx.dim() == 2 && part_idx.size(0) == num_q_blocks && part_combo.sizes() == part_idx.sizes(),
              "_tiered_sparse_attention_cuda: part_idx/part_combo must be (num_q_blocks, width)");
  const int64_t F = S / frame_tokens;
  if (rope_pairs > 0) {
    TORCH_CHECK(2 * rope_pairs <= D, "_tiered_sparse_attention_cuda: rope_pairs exceeds head_dim / 2");
    for (const at::Tensor* t : {&cos_t, &sin_t}) {
      TORCH_CHECK(t->device() == q.device() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                      t->dim() == 3 && t->size(0) == 5 && t->size(1) == F && t->size(2) == 2 * rope_pairs,
                  "_tiered_sparse_attention_cuda: cos/sin tables must be contiguous float32 (5, F, 2R) on q's device");
    }
  }
  TORCH_CHECK(S < (int64_t(1) << 31), "_tiered_sparse_attention_cuda: sequence too long");
  TORCH_CHECK(layout >= 0 && layout <= 2 && token_edges.size() == 4,
              "_tiered_sparse_attention_cuda: layout must be 0, 1 or 2 with four token edges");

  c10::DeviceGuard guard(q.device());
  at::Tensor out = at::empty({B, H, S, D}, q.options());
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const int64_t vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const int64_t os[3] = {out.stride(0), out.stride(1), out.stride(2)};
  const int err = longvideo_tsa_launch(
      q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), qs, ks, vs, os,
      full_idx.data_ptr<int>(), full_cnt.data_ptr<int>(), full_combo.data_ptr<int>(),
      part_idx.data_ptr<int>(), part_cnt.data_ptr<int>(), part_combo.data_ptr<int>(),
      static_cast<int>(full_idx.size(1)), static_cast<int>(part_idx.size(1)), static_cast<int>(num_q_blocks),
      rope_pairs > 0 ? cos_t.data_ptr<float>() : nullptr, rope_pairs > 0 ? sin_t.data_ptr<float>() : nullptr,
      static_cast<int>(B), static_cast<int>(H), static_cast<int>(S), static_cast<int>(D),
      static_cast<int>(frame_tokens), static_cast<int>(local_frames), static_cast<int>(stripe_frames),
      static_cast<int>(stripe_width), static_cast<int>(sink_frames), static_cast<int>(rope_pairs),
      static_cast<int>(w1), static_cast<int>(w2), static_cast<int>(layout), static_cast<int>(token_edges[0]),
      static_cast<int>(token_edges[1]), static_cast<int>(token_edges[2]), static_cast<int>(token_edges[3]),
      static_cast<float>(scale),
      q.scalar_type() == at::kHalf ? 0 : 1, static_cast<int>(kernel), static_cast<int>(block_m),
      reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "_tiered_sparse_attention_cuda: kernel launch failed with CUDA error ", err);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(longvideo, m) {
  m.def(
      "_tiered_sparse_attention_cuda(Tensor q, Tensor k, Tensor v, Tensor full_idx, Tensor full_cnt, "
      "Tensor full_combo, Tensor part_idx, Tensor part_cnt, Tensor part_combo, Tensor cos_t, Tensor sin_t, "
      "int frame_tokens, int local_frames, int stripe_frames, int stripe_width, int sink_frames, "
      "int rope_pairs, int w1, int w2, int layout, int[] token_edges, float scale, int kernel, int block_m, "
      "int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(longvideo, CUDA, m) { m.impl("_tiered_sparse_attention_cuda", &tsa_cuda); }
