// Torch glue of the consistent-attention CUDA forward (kernel: consistent_attention_kernels.cu).
//
// Registers the private op longvideo::_consistent_attention_cuda(q, k, v, sample_idx, seg,
// group_size, bank_k, bank_v, scale, stream) -> (out, lse), called by the "cuda" backend of
// longvideo.ops.consistent_attention after it validated the arguments and built the segment table
// (int32 (B, 4): [lo1, hi1, lo2, hi2] runs of sample_idx each row sees; the window is encoded there).
// `stream` is torch.cuda.current_stream(device).cuda_stream (no c10/cuda headers in this unit).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <tuple>

extern "C" int longvideo_consistent_attention_launch(
    const void* q, const void* k, const void* v, void* out, float* lse, const void* sample_idx, int sidx_is64,
    const int* seg, const void* bank_k, const void* bank_v, const int64_t* strides, int B, int H, int N, int D,
    int E, int group_size, int has_samples, float scale, int dtype, void* stream);

namespace {

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), "_consistent_attention_cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == q.device(), "_consistent_attention_cuda: ", name, " is on another device than q");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "_consistent_attention_cuda: ", name, " dtype must equal q's");
  TORCH_CHECK(t.stride(-1) == 1, "_consistent_attention_cuda: ", name, " must have unit stride in the head dim");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "_consistent_attention_cuda: ", name,
              " must be 16-byte aligned");
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    TORCH_CHECK(t.size(i) == 1 || t.stride(i) % 8 == 0, "_consistent_attention_cuda: ", name,
                " strides must be multiples of 8 elements (16-byte rows)");
}

std::tuple<at::Tensor, at::Tensor> consistent_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& sample_idx,
    const at::Tensor& seg, int64_t group_size, const c10::optional<at::Tensor>& bank_k,
    const c10::optional<at::Tensor>& bank_v, double scale, int64_t stream) {
  TORCH_CHECK(q.dim() == 4, "_consistent_attention_cuda: q must be (B, H, N, D)");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "_consistent_attention_cuda: k, v must match q");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "_consistent_attention_cuda: dtype must be float16 or bfloat16");
  check_operand(q, "q", q);
  check_operand(k, "k", q);
  check_operand(v, "v", q);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK(D % 8 == 0 && D >= 8 && D <= 256, "_consistent_attention_cuda: head dim must be a multiple of 8 in [8, 256]");
  TORCH_CHECK(B * H <= 65535, "_consistent_attention_cuda: B*H must be <= 65535");
  TORCH_CHECK(group_size > 0 && B % group_size == 0, "_consistent_attention_cuda: group_size must divide B");
  TORCH_CHECK(sample_idx.is_cuda() && sample_idx.dim() == 1 &&
                  (sample_idx.scalar_type() == at::kInt || sample_idx.scalar_type() == at::kLong),
              "_consistent_attention_cuda: sample_idx must be a 1-D int32/int64 CUDA tensor");
  TORCH_CHECK(seg.is_cuda() && seg.scalar_type() == at::kInt && seg.dim() == 2 && seg.size(0) == B && seg.size(1) == 4,
              "_consistent_attention_cuda: seg must be an int32 (B, 4) CUDA tensor");
  TORCH_CHECK(bank_k.has_value() == bank_v.has_value(), "_consistent_attention_cuda: bank_k and bank_v go together");
  c10::DeviceGuard guard(q.device());

  const at::Tensor sidx = sample_idx.contiguous();
  const at::Tensor segc = seg.contiguous();
  at::Tensor out = at::empty_like(q);
  TORCH_CHECK(out.stride(-1) == 1, "_consistent_attention_cuda: output must have unit stride in the head dim");
  at::Tensor lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));

  int64_t strides[24] = {0};
  for (int i = 0; i < 4; ++i) {
    strides[i] = q.stride(i);
    strides[4 + i] = k.stride(i);
    strides[8 + i] = v.stride(i);
    strides[12 + i] = out.stride(i);
  }
  int64_t E = 0;
  const void* bk_ptr = nullptr;
  const void* bv_ptr = nullptr;
  if (bank_k.has_value()) {
    const at::Tensor& bk = *bank_k;
    const at::Tensor& bv = *bank_v;
    check_operand(bk, "bank_k", q);
    check_operand(bv, "bank_v", q);
    TORCH_CHECK(bk.sizes() == bv.sizes(), "_consistent_attention_cuda: bank_k and bank_v shapes differ");
    TORCH_CHECK((bk.dim() == 3 && bk.size(0) == H && bk.size(2) == D) ||
                    (bk.dim() == 4 && bk.size(0) == B / group_size && bk.size(1) == H && bk.size(3) == D),
                "_consistent_attention_cuda: bank must be (H, E, D) or (B/group_size, H, E, D)");
    const bool shared = bk.dim() == 3;
    E = bk.size(shared ? 1 : 2);
    for (int i = 0; i < 4; ++i) {  // (group, h, e, d); group stride 0 for a shared bank
      strides[16 + i] = shared ? (i == 0 ? 0 : bk.stride(i - 1)) : bk.stride(i);
      strides[20 + i] = shared ? (i == 0 ? 0 : bv.stride(i - 1)) : bv.stride(i);
    }
    bk_ptr = bk.data_ptr();
    bv_ptr = bv.data_ptr();
  }
  if (N == 0 || B == 0 || H == 0) return {out, lse};
  const int dtype = q.scalar_type() == at::kHalf ? 0 : 1;
  const int err = longvideo_consistent_attention_launch(
      q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(), sidx.data_ptr(),
      sidx.scalar_type() == at::kLong ? 1 : 0, segc.data_ptr<int>(), bk_ptr, bv_ptr, strides, static_cast<int>(B),
      static_cast<int>(H), static_cast<int>(N), static_cast<int>(D), static_cast<int>(E),
      static_cast<int>(group_size), sidx.numel() > 0 ? 1 : 0, static_cast<float>(scale), dtype,
      reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "_consistent_attention_cuda: kernel launch failed with cudaError ", err);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(longvideo, m) {
  m.def("_consistent_attention_cuda(Tensor q, Tensor k, Tensor v, Tensor sample_idx, Tensor seg, int group_size, "
        "Tensor? bank_k, Tensor? bank_v, float scale, int stream) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(longvideo, CUDA, m) { m.impl("_consistent_attention_cuda", &consistent_attention_cuda); }
