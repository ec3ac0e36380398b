// CUDA kernels of lowfreq_mix (FreeInit's low-frequency mixing); torch glue in lowfreq_mix.cpp.
//
// Algebra (same as the Triton backend): with D = fftn(x - noise) and the filter moved to unshifted
// frequency indices, out = noise + Re(ifftn(M' D)) = noise + ifftn(Ms D), where
// Ms(k) = (M'(k) + M'(-k)) / 2 is the real, even symmetrisation of the filter (x, noise real), so a
// half spectrum suffices. The filter is evaluated in-kernel from a per-axis float64 table
// [T terms | H terms | W terms | 2 d_s] indexed by unshifted frequency (built by
// longvideo.reference.lowfreq_mix.unshifted_axis_table).
//
// Kernels:
//   slice_kernel   T == 1 single pass: one block per (H, W) slice; x - noise, the 2-D DFT (direct
//                  sums against cos/sin tables in shared memory), filter, inverse, + noise, store.
//   diff_kernel    d = float(x) - float(noise)                 (spectral path, before rfftn)
//   filter_kernel  half spectrum *= Ms, in place                 (spectral path, between the FFTs)
//   add_kernel     out = dtype(noise + y)                        (spectral path, after irfftn)
// Only CUDA headers here (the CPU torch wheel lacks the c10/cuda generated headers).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace {

// dtype codes shared with lowfreq_mix.cpp
constexpr int kF32 = 0, kF16 = 1, kBF16 = 2;
// filter codes
constexpr int kGaussian = 0, kButterworth = 1, kIdeal = 2, kBox = 3;
static_assert(kGaussian == 0 && kButterworth == 1 && kIdeal == 2 && kBox == 3, "codes of FILTER_CODES (Python)");

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Filter value at unshifted frequency (kt, kh, kw).
__device__ __forceinline__ float lpf_at(const double* __restrict__ tab, int kt, int kh, int kw, int T, int H, int W,
                                        int filter, float coef, float order) {
  const double a = tab[kt], b = tab[T + kh], c = tab[T + H + kw];
  if (filter == kBox) return (float)(a * b * c);
  // float64 sum in diffusers' order; __dadd_rn keeps the compiler from reassociating.
  const double d2 = __dadd_rn(__dadd_rn(a, b), c);
  if (filter == kIdeal) return d2 <= tab[T + H + W] ? 1.f : 0.f;
  const float d2f = (float)d2;
  if (filter == kGaussian) return expf(-coef * d2f);
  const float q = d2f * coef;  // butterworth: 1 / (1 + q^order); q = 0 -> 1
  return q > 0.f ? 1.f / (1.f + powf(q, order)) : 1.f;
}

__device__ __forceinline__ float lpf_sym(const double* __restrict__ tab, int kt, int kh, int kw, int T, int H, int W,
                                         int filter, float coef, float order) {
  const int rt = (T - kt) % T, rh = (H - kh) % H, rw = (W - kw) % W;
  return 0.5f * (lpf_at(tab, kt, kh, kw, T, H, W, filter, coef, order) +
                 lpf_at(tab, rt, rh, rw, T, H, W, filter, coef, order));
}

template <typename T>
__global__ void diff_kernel(const T* __restrict__ x, const T* __restrict__ n, float* __restrict__ d, int64_t numel) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel; i += (int64_t)gridDim.x * blockDim.x)
    d[i] = to_f32(x[i]) - to_f32(n[i]);
}

template <typename T>
__global__ void add_kernel(const T* __restrict__ n, const float* __restrict__ y, T* __restrict__ out, int64_t numel) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = from_f32<T>(to_f32(n[i]) + y[i]);
}

// spec: (L, T, H, WH) complex. Thread = one frequency; its filter value serves l_chunk leading slices
// (grid.y covers L in chunks so that small volumes still fill the device).
__global__ void filter_kernel(float2* __restrict__ spec, const double* __restrict__ tab, int64_t L, int T, int H,
                              int W, int WH, int filter, float coef, float order, int l_chunk) {
  const int64_t per_l = (int64_t)T * H * WH;
  const int64_t f = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (f >= per_l) return;
  const int kw = (int)(f % WH), kh = (int)((f / WH) % H), kt = (int)(f / ((int64_t)WH * H));
  const float m = lpf_sym(tab, kt, kh, kw, T, H, W, filter, coef, order);
  const int64_t l0 = (int64_t)blockIdx.y * l_chunk;
  for (int64_t l = l0; l < l0 + l_chunk && l < L; ++l) {
    float2 v = spec[l * per_l + f];
    v.x *= m;
    v.y *= m;
    spec[l * per_l + f] = v;
  }
}

// Single pass for T == 1. Shared memory (floats): d[H*W] | ar, ai, br, bi [H*WH each] |
// cos/sin tables of W and H. Direct DFT sums: every output of a stage is one thread's loop over
// the summed axis, twiddle index advanced incrementally (no modulo in the loop).
template <typename T>
__global__ void slice_kernel(const T* __restrict__ x, const T* __restrict__ n, T* __restrict__ out,
                             const double* __restrict__ tab, int H, int W, int filter, float coef, float order) {
  extern __shared__ float smem[];
  const int WH = W / 2 + 1;
  float* d = smem;
  float* ar = d + H * W;
  float* ai = ar + H * WH;
  float* br = ai + H * WH;
  float* bi = br + H * WH;
  float* cw = bi + H * WH;
  float* sw = cw + W;
  float* chh = sw + W;
  float* shh = chh + H;
  const int64_t base = (int64_t)blockIdx.x * H * W;
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int i = tid; i < W; i += nt) {
    double s, c;
    sincospi(2.0 * i / W, &s, &c);
    cw[i] = (float)c;
    sw[i] = (float)s;
  }
  for (int i = tid; i < H; i += nt) {
    double s, c;
    sincospi(2.0 * i / H, &s, &c);
    chh[i] = (float)c;
    shh[i] = (float)s;
  }
  for (int i = tid; i < H * W; i += nt) d[i] = to_f32(x[base + i]) - to_f32(n[base + i]);
  __syncthreads();
  // A[h][kw] = sum_w d[h][w] e^{-2 pi i w kw / W}
  for (int o = tid; o < H * WH; o += nt) {
    const int h = o / WH, kw = o % WH;
    float sr = 0.f, si = 0.f;
    int idx = 0;
    for (int w = 0; w < W; ++w) {
      const float v = d[h * W + w];
      sr += v * cw[idx];
      si -= v * sw[idx];
      idx += kw;
      if (idx >= W) idx -= W;
    }
    ar[o] = sr;
    ai[o] = si;
  }
  __syncthreads();
  // B[kh][kw] = Ms(kh, kw) sum_h e^{-2 pi i h kh / H} A[h][kw]
  for (int o = tid; o < H * WH; o += nt) {
    const int kh = o / WH, kw = o % WH;
    float sr = 0.f, si = 0.f;
    int idx = 0;
    for (int h = 0; h < H; ++h) {
      const float c = chh[idx], s = shh[idx];
      const float vr = ar[h * WH + kw], vi = ai[h * WH + kw];
      sr += c * vr + s * vi;
      si += c * vi - s * vr;
      idx += kh;
      if (idx >= H) idx -= H;
    }
    const float m = lpf_sym(tab, 0, kh, kw, 1, H, W, filter, coef, order);
    br[o] = sr * m;
    bi[o] = si * m;
  }
  __syncthreads();
  // E[h][kw] = sum_kh e^{+2 pi i h kh / H} B[kh][kw]  (into ar/ai)
  for (int o = tid; o < H * WH; o += nt) {
    const int h = o / WH, kw = o % WH;
    float sr = 0.f, si = 0.f;
    int idx = 0;
    for (int kh = 0; kh < H; ++kh) {
      const float c = chh[idx], s = shh[idx];
      const float vr = br[kh * WH + kw], vi = bi[kh * WH + kw];
      sr += c * vr - s * vi;
      si += c * vi + s * vr;
      idx += h;
      if (idx >= H) idx -= H;
    }
    ar[o] = sr;
    ai[o] = si;
  }
  __syncthreads();
  // y[h][w] = (1 / (H W)) sum_kw alpha_kw Re(E[h][kw] e^{+2 pi i kw w / W}), alpha 1 at 0 and W/2.
  const float inv = 1.f / ((float)H * (float)W);
  for (int o = tid; o < H * W; o += nt) {
    const int h = o / W, w = o % W;
    float acc = 0.f;
    int idx = 0;
    for (int kw = 0; kw < WH; ++kw) {
      const float alpha = (kw == 0 || 2 * kw == W) ? 1.f : 2.f;
      acc += alpha * (ar[h * WH + kw] * cw[idx] - ai[h * WH + kw] * sw[idx]);
      idx += w;
      if (idx >= W) idx -= W;
    }
    out[base + o] = from_f32<T>(to_f32(n[base + o]) + acc * inv);
  }
}

int blocks_for(int64_t numel, int threads) {
  int64_t b = (numel + threads - 1) / threads;
  return (int)(b < 65535 * 16 ? (b > 0 ? b : 1) : 65535 * 16);
}

}  // namespace

extern "C" {

// Shared memory bytes of the single-pass kernel for an (H, W) slice.
int64_t longvideo_lowfreq_mix_slice_smem_bytes(int H, int W) {
  const int64_t WH = W / 2 + 1;
  return 4 * ((int64_t)H * W + 4 * (int64_t)H * WH + 2 * (int64_t)W + 2 * (int64_t)H);
}

int longvideo_lowfreq_mix_slice_launch(const void* x, const void* n, void* out, const double* tab, int64_t n_slices,
                                       int H, int W, int filter, float coef, float order, int dtype, void* stream) {
  if (n_slices == 0) return 0;
  const cudaStream_t st = (cudaStream_t)stream;
  const int64_t smem = longvideo_lowfreq_mix_slice_smem_bytes(H, W);
  const int threads = 256;
  cudaError_t err = cudaSuccess;
#define LV_SLICE(TYPE)                                                                                          \
  do {                                                                                                          \
    err = cudaFuncSetAttribute(slice_kernel<TYPE>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);     \
    if (err != cudaSuccess) return (int)err;                                                                    \
    slice_kernel<TYPE><<<(unsigned)n_slices, threads, smem, st>>>((const TYPE*)x, (const TYPE*)n, (TYPE*)out,   \
                                                                   tab, H, W, filter, coef, order);              \
  } while (0)
  if (dtype == kF32) LV_SLICE(float);
  else if (dtype == kF16) LV_SLICE(__half);
  else if (dtype == kBF16) LV_SLICE(__nv_bfloat16);
  else return (int)cudaErrorInvalidValue;
#undef LV_SLICE
  return (int)cudaGetLastError();
}

int longvideo_lowfreq_mix_diff_launch(const void* x, const void* n, float* d, int64_t numel, int dtype, void* stream) {
  if (numel == 0) return 0;
  const cudaStream_t st = (cudaStream_t)stream;
  const int threads = 256, blocks = blocks_for(numel, threads);
  if (dtype == kF32) diff_kernel<float><<<blocks, threads, 0, st>>>((const float*)x, (const float*)n, d, numel);
  else if (dtype == kF16) diff_kernel<__half><<<blocks, threads, 0, st>>>((const __half*)x, (const __half*)n, d, numel);
  else if (dtype == kBF16)
    diff_kernel<__nv_bfloat16><<<blocks, threads, 0, st>>>((const __nv_bfloat16*)x, (const __nv_bfloat16*)n, d, numel);
  else return (int)cudaErrorInvalidValue;
  return (int)cudaGetLastError();
}

int longvideo_lowfreq_mix_add_launch(const void* n, const float* y, void* out, int64_t numel, int dtype, void* stream) {
  if (numel == 0) return 0;
  const cudaStream_t st = (cudaStream_t)stream;
  const int threads = 256, blocks = blocks_for(numel, threads);
  if (dtype == kF32) add_kernel<float><<<blocks, threads, 0, st>>>((const float*)n, y, (float*)out, numel);
  else if (dtype == kF16) add_kernel<__half><<<blocks, threads, 0, st>>>((const __half*)n, y, (__half*)out, numel);
  else if (dtype == kBF16)
    add_kernel<__nv_bfloat16><<<blocks, threads, 0, st>>>((const __nv_bfloat16*)n, y, (__nv_bfloat16*)out, numel);
  else return (int)cudaErrorInvalidValue;
  return (int)cudaGetLastError();
}

int longvideo_lowfreq_mix_filter_launch(void* spec, const double* tab, int64_t L, int T, int H, int W, int filter,
                                        float coef, float order, void* stream) {
  const int WH = W / 2 + 1;
  const int64_t per_l = (int64_t)T * H * WH;
  if (per_l == 0 || L == 0) return 0;
  const int threads = 256;
  const int l_chunk = 4;  // one filter evaluation per frequency serves 4 leading slices
  dim3 grid((unsigned)((per_l + threads - 1) / threads), (unsigned)((L + l_chunk - 1) / l_chunk));
  filter_kernel<<<grid, threads, 0, (cudaStream_t)stream>>>((float2*)spec, tab, L, T, H, W, WH, filter, coef, order,
                                                             l_chunk);
  return (int)cudaGetLastError();
}

}  // extern "C"
