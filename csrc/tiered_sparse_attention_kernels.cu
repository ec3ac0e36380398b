// Tiered sparse attention forward (FreeLOC TSA + VRPR), CUDA tensor-core kernel.
//
// One CTA of 4 warps per (64-row query block, batch*head); each warp owns 16 query rows. The CTA
// walks its row of the block schedule (built on the device by longvideo/ops and passed in as
// tensors): first the "full" key blocks (no element mask), then the "partial" ones (element mask
// of the tiers, sink edge, sequence end). S = Q K^T and O += P V run on mma.sync.m16n8k16 with
// fp32 accumulators; softmax is online (flash attention) with fp32 row statistics and exp2.
//
// Temporal RoPE (optional): channels [0, 2R) of q and k are unrotated temporal pairs. They are
// rotated while a tile is staged into shared memory, with the position "variant" of the pair's
// band (tables cos/sin: (5, F, 2R) float, channel-indexed as built by rope_tables()). A block pair
// whose frame distances fall in one VRPR band stages each tile once; a block pair spanning a band
// edge computes one logit tile per band present (re-staging the rotated tiles) and selects per
// element by the band of the pair.
//
// Layouts (p.layout): 0 frame tiers and frame-distance VRPR bands; 1 frame tiers with VRPR bands
// by token distance t = i - j (te0..te2 = [E, B1, B2]; E < |t| < B1 is the band gap, masked);
// 2 token tiers (te0..te3 = [L, St, K, J]; combos 0 plain, 1 far sink, 2 late keys), FreeLOC's
// released code (longvideo/ops/tiered_sparse_attention.py has the contract).
//
// Only CUDA headers here (compiled by nvcc without torch); the torch glue is
// tiered_sparse_attention.cpp, which calls longvideo_tsa_launch().
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace {

constexpr int BM = 64;       // query rows per CTA
constexpr int BN = 64;       // keys per block of the schedule
constexpr int NWARPS = 4;
constexpr int NTHREADS = NWARPS * 32;
constexpr float LOG2E = 1.4426950408889634f;

struct Params {
  const void* q; const void* k; const void* v; void* o;
  int64_t sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son;
  const int* full_idx; const int* full_cnt; const int* full_combo;
  const int* part_idx; const int* part_cnt; const int* part_combo;
  int full_w, part_w;
  const float* cos_t; const float* sin_t;  // (5, F, 2R) or null
  int H, S, F, frame_tokens, local_frames, stripe_frames, stripe_width, sink_frames;
  int rope_pairs, w1, w2;
  int layout, te0, te1, te2, te3;
  float qk_scale_log2;
};

template <typename T> struct Vec;
template <> struct Vec<__half> {
  static __device__ __forceinline__ float2 to_f2(uint32_t x) { return __half22float2(*reinterpret_cast<__half2*>(&x)); }
  static __device__ __forceinline__ uint32_t from_f2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b); return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct Vec<__nv_bfloat16> {
  static __device__ __forceinline__ float2 to_f2(uint32_t x) { return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x)); }
  static __device__ __forceinline__ uint32_t from_f2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b); return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b);
template <>
__device__ __forceinline__ void mma16816<__half>(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* smem) {
  uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* smem) {
  uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// Stage rows [row0, row0 + 64) of a (S, D) head into shared memory (pitch D + 8), zero past S.
// With rope (variant >= 0) the temporal pairs of channels [0, 2R) are rotated by the position of
// the row's frame under `variant`: each thread moves 8 consecutive channels = 4 whole pairs.
template <typename T, int D>
__device__ __forceinline__ void stage_tile(T* dst, const T* src, int64_t row_stride, int row0, const Params& p,
                                           int variant) {
  constexpr int CHUNKS = D / 8;
  constexpr int PITCH = D + 8;
  for (int i = threadIdx.x; i < BM * CHUNKS; i += NTHREADS) {
    const int r = i / CHUNKS, c8 = (i % CHUNKS) * 8;
    const int tok = row0 + r;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (tok < p.S) {
      val = *reinterpret_cast<const uint4*>(src + (int64_t)tok * row_stride + c8);
      if (variant >= 0 && c8 < 2 * p.rope_pairs) {
        const int frame = tok / p.frame_tokens;
        const float* cs = p.cos_t + ((int64_t)variant * p.F + frame) * (2 * p.rope_pairs);
        const float* sn = p.sin_t + ((int64_t)variant * p.F + frame) * (2 * p.rope_pairs);
        uint32_t* w = reinterpret_cast<uint32_t*>(&val);
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          const int ch = c8 + 2 * t;
          if (ch < 2 * p.rope_pairs) {
            float2 x = Vec<T>::to_f2(w[t]);
            const float co = cs[ch], si = sn[ch + 1];  // sin table holds +sin on the odd channel
            w[t] = Vec<T>::from_f2(x.x * co - x.y * si, x.x * si + x.y * co);
          }
        }
      }
    }
    *reinterpret_cast<uint4*>(dst + r * PITCH + c8) = val;
  }
}

// s[j][.] = Q(warp rows) . K(keys j*8 .. j*8+7)^T over all D channels, fp32.
template <typename T, int D>
__device__ __forceinline__ void qk_tile(float (*s)[4], const T* Qs, const T* Ks, int warp, int lane) {
  constexpr int PITCH = D + 8;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, Qs + (warp * 16 + (lane % 16)) * PITCH + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int j2 = 0; j2 < BN / 16; ++j2) {
      uint32_t b[4];
      const int m = lane / 8;
      ldmatrix_x4(b, Ks + (j2 * 16 + (m / 2) * 8 + (lane % 8)) * PITCH + kk * 16 + (m % 2) * 8);
      mma16816<T>(s[2 * j2], a, b);
      mma16816<T>(s[2 * j2 + 1], a, b + 2);
    }
  }
}

__device__ __forceinline__ int combo_of(int fq, int fk, int w1, int w2) {
  const int d = fq - fk, ad = d < 0 ? -d : d;
  return ad < w1 ? 0 : (ad < w2 ? (d > 0 ? 1 : 2) : (d > 0 ? 3 : 4));
}

// The combo of the pair (row, col) in any layout (fq, fk: their frames, clamped to F - 1).
__device__ __forceinline__ int combo_at(int row, int col, int fq, int fk, const Params& p) {
  if (p.layout == 0) return combo_of(fq, fk, p.w1, p.w2);
  const int t = row - col, at = t < 0 ? -t : t;
  if (p.layout == 1) return at <= p.te0 ? 0 : (at < p.te2 ? (t > 0 ? 1 : 2) : (t > 0 ? 3 : 4));
  if (col < p.te2 && t > p.te1) return 1;
  return (col > p.te3 && -t > p.te1) ? 2 : 0;
}

// Is the pair (row, col) attended (col < S checked by the caller)?
__device__ __forceinline__ bool attended(int row, int col, const Params& p) {
  const int fq = row / p.frame_tokens, pq = row % p.frame_tokens;
  const int fk = col / p.frame_tokens, pk = col % p.frame_tokens;
  const int dp = pq > pk ? pq - pk : pk - pq;
  const int t = row - col, at = t < 0 ? -t : t;
  if (p.layout == 2)
    return at <= p.te0 || (at <= p.te1 && (dp < p.stripe_width || col < p.te2)) || (col < p.te2 && t > p.te1) ||
           (col > p.te3 && -t > p.te1);
  const int dist = fq > fk ? fq - fk : fk - fq;
  const bool keep = dist < p.local_frames || fk < p.sink_frames || (dist < p.stripe_frames && dp < p.stripe_width);
  return keep && (p.layout != 1 || at <= p.te0 || at >= p.te1);
}

template <typename T, int D, bool PARTIAL>
__device__ __forceinline__ void visit(int kb, int combo_bits, const Params& p, T* Qs, T* Ks, T* Vs,
                                      const T* qh, const T* kh, const T* vh, int q0, int& cur_qv,
                                      float (*o)[4], float* m, float* l, int warp, int lane) {
  constexpr int PITCH = D + 8;
  const int k0 = kb * BN;
  const bool rope = p.rope_pairs > 0;
  __syncthreads();  // every warp is done with the previous K/V tiles
  stage_tile<T, D>(Vs, vh, p.svn, k0, p, -1);
  const int g = lane / 4, t4 = lane % 4;
  const int row_a = q0 + warp * 16 + g, row_b = row_a + 8;
  const int fqa = min(row_a / p.frame_tokens, p.F - 1), fqb = min(row_b / p.frame_tokens, p.F - 1);

  float s[BN / 8][4];
  const bool single = (combo_bits & (combo_bits - 1)) == 0;
  bool first = true;
#pragma unroll 1
  for (int c = 0; c < 5; ++c) {
    if (!((combo_bits >> c) & 1)) continue;
    if (!first) __syncthreads();  // the previous combo's rotated tiles are still being read
    const int qv = c, kv = (c == 0) ? 0 : ((c & 1) ? c + 1 : c - 1);
    if (rope && qv != cur_qv) {
      stage_tile<T, D>(Qs, qh, p.sqn, q0, p, qv);
      cur_qv = qv;
    }
    stage_tile<T, D>(Ks, kh, p.skn, k0, p, rope ? kv : -1);
    __syncthreads();
    if (single) {
      qk_tile<T, D>(s, Qs, Ks, warp, lane);
    } else {
      float sc[BN / 8][4];
      qk_tile<T, D>(sc, Qs, Ks, warp, lane);
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = k0 + j * 8 + 2 * t4 + (e & 1);
          const int fk = min(col / p.frame_tokens, p.F - 1);
          const int cid = combo_at(e < 2 ? row_a : row_b, col, e < 2 ? fqa : fqb, fk, p);
          if (first || cid == c) s[j][e] = sc[j][e];
        }
    }
    first = false;
  }

  // scale, element mask, online softmax (rows row_a -> e = 0,1 and row_b -> e = 2,3)
  float mx[2] = {m[0], m[1]};
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = s[j][e] * p.qk_scale_log2;
      if (PARTIAL) {
        const int col = k0 + j * 8 + 2 * t4 + (e & 1);
        const int row = e < 2 ? row_a : row_b;
        if (!(col < p.S && attended(row, col, p))) x = -INFINITY;
      }
      s[j][e] = x;
      mx[e / 2] = fmaxf(mx[e / 2], x);
    }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
  }
  float alpha[2], rs[2] = {0.f, 0.f};
#pragma unroll
  for (int h = 0; h < 2; ++h) alpha[h] = exp2f(m[h] - mx[h]);
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float pe = exp2f(s[j][e] - mx[e / 2]);
      s[j][e] = pe;
      rs[e / 2] += pe;
    }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    rs[h] += __shfl_xor_sync(0xffffffffu, rs[h], 1);
    rs[h] += __shfl_xor_sync(0xffffffffu, rs[h], 2);
    l[h] = l[h] * alpha[h] + rs[h];
    m[h] = mx[h];
  }
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    o[j][0] *= alpha[0]; o[j][1] *= alpha[0];
    o[j][2] *= alpha[1]; o[j][3] *= alpha[1];
  }
  // O += P V: P's accumulator layout is the A-fragment layout of the next mma (16 keys per step).
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    uint32_t a[4];
    a[0] = Vec<T>::from_f2(s[2 * kk][0], s[2 * kk][1]);
    a[1] = Vec<T>::from_f2(s[2 * kk][2], s[2 * kk][3]);
    a[2] = Vec<T>::from_f2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = Vec<T>::from_f2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
    for (int n2 = 0; n2 < D / 16; ++n2) {
      uint32_t b[4];
      const int mm = lane / 8;
      ldmatrix_x4_trans(b, Vs + (kk * 16 + (mm % 2) * 8 + (lane % 8)) * PITCH + n2 * 16 + (mm / 2) * 8);
      mma16816<T>(o[2 * n2], a, b);
      mma16816<T>(o[2 * n2 + 1], a, b + 2);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(NTHREADS) tsa_fwd_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int PITCH = D + 8;
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + BM * PITCH;
  T* Vs = Ks + BN * PITCH;
  const int qb = blockIdx.x, bh = blockIdx.y;
  const int b = bh / p.H, h = bh % p.H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* qh = static_cast<const T*>(p.q) + b * p.sqb + h * p.sqh;
  const T* kh = static_cast<const T*>(p.k) + b * p.skb + h * p.skh;
  const T* vh = static_cast<const T*>(p.v) + b * p.svb + h * p.svh;
  T* oh = static_cast<T*>(p.o) + b * p.sob + h * p.soh;
  const int q0 = qb * BM;

  int cur_qv = 0;  // the variant Qs is rotated with (no rope: unrotated, never restaged)
  stage_tile<T, D>(Qs, qh, p.sqn, q0, p, p.rope_pairs > 0 ? 0 : -1);

  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m[2] = {-1e30f, -1e30f}, l[2] = {0.f, 0.f};

  const int nf = p.full_cnt[qb];
  for (int e = 0; e < nf; ++e)
    visit<T, D, false>(p.full_idx[(int64_t)qb * p.full_w + e], p.full_combo[(int64_t)qb * p.full_w + e], p, Qs, Ks,
                       Vs, qh, kh, vh, q0, cur_qv, o, m, l, warp, lane);
  const int np = p.part_cnt[qb];
  for (int e = 0; e < np; ++e)
    visit<T, D, true>(p.part_idx[(int64_t)qb * p.part_w + e], p.part_combo[(int64_t)qb * p.part_w + e], p, Qs, Ks,
                      Vs, qh, kh, vh, q0, cur_qv, o, m, l, warp, lane);

  const int g = lane / 4, t4 = lane % 4;
  const float inv[2] = {l[0] > 0.f ? 1.f / l[0] : 0.f, l[1] > 0.f ? 1.f / l[1] : 0.f};
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = q0 + warp * 16 + g + hh * 8;
    if (row >= p.S) continue;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const uint32_t w = Vec<T>::from_f2(o[j][2 * hh] * inv[hh], o[j][2 * hh + 1] * inv[hh]);
      *reinterpret_cast<uint32_t*>(oh + (int64_t)row * p.son + j * 8 + 2 * t4) = w;
    }
  }
}

template <typename T, int D>
int launch(const Params& p, int num_q_blocks, int batch_heads, cudaStream_t stream) {
  const size_t smem = size_t(BM + 2 * BN) * (D + 8) * sizeof(T);
  cudaError_t err = cudaFuncSetAttribute(tsa_fwd_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return (int)err;
  dim3 grid(num_q_blocks, batch_heads);
  tsa_fwd_kernel<T, D><<<grid, NTHREADS, smem, stream>>>(p);
  return (int)cudaGetLastError();
}

}  // namespace

// dtype: 0 = float16, 1 = bfloat16. head_dim: 64 or 128. Strides in elements, last dim contiguous.
// Returns a cudaError_t (0 on success); -1 for an unsupported dtype/head_dim.
extern "C" int longvideo_tsa_launch(
    const void* q, const void* k, const void* v, void* o,
    const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides, const int64_t* o_strides,
    const int* full_idx, const int* full_cnt, const int* full_combo,
    const int* part_idx, const int* part_cnt, const int* part_combo, int full_w, int part_w, int num_q_blocks,
    const float* cos_t, const float* sin_t, int B, int H, int S, int head_dim, int frame_tokens,
    int local_frames, int stripe_frames, int stripe_width, int sink_frames, int rope_pairs, int w1, int w2,
    int layout, int te0, int te1, int te2, int te3, float scale, int dtype, void* stream) {
  Params p;
  p.q = q; p.k = k; p.v = v; p.o = o;
  p.sqb = q_strides[0]; p.sqh = q_strides[1]; p.sqn = q_strides[2];
  p.skb = k_strides[0]; p.skh = k_strides[1]; p.skn = k_strides[2];
  p.svb = v_strides[0]; p.svh = v_strides[1]; p.svn = v_strides[2];
  p.sob = o_strides[0]; p.soh = o_strides[1]; p.son = o_strides[2];
  p.full_idx = full_idx; p.full_cnt = full_cnt; p.full_combo = full_combo;
  p.part_idx = part_idx; p.part_cnt = part_cnt; p.part_combo = part_combo;
  p.full_w = full_w; p.part_w = part_w;
  p.cos_t = cos_t; p.sin_t = sin_t;
  p.H = H; p.S = S; p.F = S / frame_tokens; p.frame_tokens = frame_tokens;
  p.local_frames = local_frames; p.stripe_frames = stripe_frames; p.stripe_width = stripe_width;
  p.sink_frames = sink_frames; p.rope_pairs = rope_pairs; p.w1 = w1; p.w2 = w2;
  p.layout = layout; p.te0 = te0; p.te1 = te1; p.te2 = te2; p.te3 = te3;
  p.qk_scale_log2 = scale * LOG2E;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int bh = B * H;
  if (dtype == 0 && head_dim == 64) return launch<__half, 64>(p, num_q_blocks, bh, st);
  if (dtype == 0 && head_dim == 128) return launch<__half, 128>(p, num_q_blocks, bh, st);
  if (dtype == 1 && head_dim == 64) return launch<__nv_bfloat16, 64>(p, num_q_blocks, bh, st);
  if (dtype == 1 && head_dim == 128) return launch<__nv_bfloat16, 128>(p, num_q_blocks, bh, st);
  return -1;
}
