// Torch glue of the lowfreq_mix CUDA backend: private op longvideo::_lowfreq_mix_cuda.
//
// _lowfreq_mix_cuda(x, noise, table, filter, coef, order, stream) -> out (contiguous, x's dtype)
//   x, noise  contiguous CUDA tensors (..., T, H, W), float32/float16/bfloat16, same shape/dtype
//   table     float64 (T + H + W + 1,) per-axis filter table (longvideo.reference.lowfreq_mix.
//             unshifted_axis_table) on x's device
//   filter    0 gaussian, 1 butterworth, 2 ideal, 3 box; coef 1/(2 d_s^2) (gaussian) or 1/d_s^2
//   stream    the current CUDA stream (torch.cuda.current_stream().cuda_stream); ATen's FFTs run
//             on the current stream too, which is the same one.
// T == 1 slices whose shared-memory footprint fits run the single-pass kernel; everything else runs
// d = x - noise (fp32), at::fft_rfftn, the in-place filter kernel, at::fft_irfftn, out = noise + y.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <cstdint>
#include <vector>

extern "C" {
int64_t longvideo_lowfreq_mix_slice_smem_bytes(int H, int W);
int longvideo_lowfreq_mix_slice_launch(const void* x, const void* n, void* out, const double* tab, int64_t n_slices,
                                       int H, int W, int filter, float coef, float order, int dtype, void* stream);
int longvideo_lowfreq_mix_diff_launch(const void* x, const void* n, float* d, int64_t numel, int dtype, void* stream);
int longvideo_lowfreq_mix_add_launch(const void* n, const float* y, void* out, int64_t numel, int dtype, void* stream);
int longvideo_lowfreq_mix_filter_launch(void* spec, const double* tab, int64_t L, int T, int H, int W, int filter,
                                        float coef, float order, void* stream);
}

namespace {

// Largest dynamic shared memory the single-pass kernel asks for (H100/A100 allow 227/163 KiB per block).
constexpr int64_t kMaxSliceSmem = 160 * 1024;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "lowfreq_mix (cuda): x dtype must be float32/float16/bfloat16, got ", t);
  }
  return -1;
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "lowfreq_mix (cuda): ", what, " launch failed with cudaError ", err);
}

at::Tensor lowfreq_mix_cuda(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& table, int64_t filter,
                            double coef, double order, int64_t stream_handle) {
  TORCH_CHECK(x.is_cuda(), "lowfreq_mix (cuda): x must be a CUDA tensor");
  TORCH_CHECK(noise.device() == x.device(), "lowfreq_mix (cuda): noise must be on x's device");
  TORCH_CHECK(table.device() == x.device() && table.scalar_type() == at::kDouble && table.is_contiguous(),
              "lowfreq_mix (cuda): table must be a contiguous float64 tensor on x's device");
  TORCH_CHECK(x.dim() >= 3, "lowfreq_mix (cuda): x must be (..., T, H, W)");
  TORCH_CHECK(noise.sizes() == x.sizes(), "lowfreq_mix (cuda): noise shape must equal x's");
  TORCH_CHECK(noise.scalar_type() == x.scalar_type(), "lowfreq_mix (cuda): noise dtype must equal x's");
  TORCH_CHECK(x.is_contiguous() && noise.is_contiguous(), "lowfreq_mix (cuda): x and noise must be contiguous");
  TORCH_CHECK(filter >= 0 && filter <= 3, "lowfreq_mix (cuda): filter code must be 0..3, got ", filter);
  const int64_t T = x.size(-3), H = x.size(-2), W = x.size(-1);
  TORCH_CHECK(table.numel() == T + H + W + 1, "lowfreq_mix (cuda): table must have T + H + W + 1 entries");
  TORCH_CHECK(H <= INT32_MAX && W <= INT32_MAX && T <= INT32_MAX, "lowfreq_mix (cuda): T, H, W too large");
  c10::DeviceGuard guard(x.device());
  void* stream = reinterpret_cast<void*>(stream_handle);
  const int code = dtype_code(x.scalar_type());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const int64_t slices = numel / (T * H * W);

  if (T == 1 && longvideo_lowfreq_mix_slice_smem_bytes((int)H, (int)W) <= kMaxSliceSmem) {
    check_launch(longvideo_lowfreq_mix_slice_launch(x.data_ptr(), noise.data_ptr(), out.data_ptr(),
                                                    table.data_ptr<double>(), slices, (int)H, (int)W, (int)filter,
                                                    (float)coef, (float)order, code, stream),
                 "single-pass");
    return out;
  }
  at::Tensor d = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  check_launch(longvideo_lowfreq_mix_diff_launch(x.data_ptr(), noise.data_ptr(), d.data_ptr<float>(), numel, code,
                                                 stream),
               "difference");
  const std::vector<int64_t> dims = {-3, -2, -1};
  at::Tensor spec = at::fft_rfftn(d, c10::nullopt, dims, c10::nullopt).contiguous();
  check_launch(longvideo_lowfreq_mix_filter_launch(spec.data_ptr(), table.data_ptr<double>(), slices, (int)T, (int)H,
                                                   (int)W, (int)filter, (float)coef, (float)order, stream),
               "filter");
  const std::vector<int64_t> sizes = {T, H, W};
  at::Tensor y = at::fft_irfftn(spec, sizes, dims, c10::nullopt).contiguous();
  check_launch(longvideo_lowfreq_mix_add_launch(noise.data_ptr(), y.data_ptr<float>(), out.data_ptr(), numel, code,
                                                stream),
               "add");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(longvideo, m) {
  m.def("_lowfreq_mix_cuda(Tensor x, Tensor noise, Tensor table, int filter, float coef, float order, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(longvideo, CUDA, m) { m.impl("_lowfreq_mix_cuda", &lowfreq_mix_cuda); }
