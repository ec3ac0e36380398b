// Tiered sparse attention forward (FreeLOC TSA + VRPR), CUDA tensor-core kernels.
//
// Two kernels walk the block schedule (built on the device by longvideo/ops and passed in as
// tensors; each CTA its row: first the "full" key blocks, no element mask, then the "partial" ones,
// element mask of the tiers, sink edge, sequence end), with S = Q K^T and O += P V on
// mma.sync.m16n8k16 (fp32 accumulators) and an online softmax (fp32 row statistics, exp2):
//  - tsa_fwd_pipelined_kernel (the default, further below): FlashAttention-2's tiling, 4 warps x 32
//    query rows = 128 queries per CTA, K/V tiles double-buffered with cp.async, and the op's NaN
//    rule for masked v rows;
//  - tsa_fwd_legacy_kernel (LONGVIDEO_TSA_CUDA=legacy, kept for side-by-side benchmarks): 4 warps
//    x 16 query rows, tiles staged synchronously through registers; inside a partial block a
//    NaN/inf in a masked v row reaches the block's queries (0 * NaN).
//
// Temporal RoPE (optional): channels [0, 2R) of q and k are unrotated temporal pairs. The legacy
// kernel rotates them while a tile is staged into shared memory (the pipelined one after the copy),
// with the position "variant" of the pair's band (tables cos/sin: (5, F, 2R) float,
// channel-indexed as built by rope_tables()). A block pair
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
//
// The legacy kernel first; the pipelined kernel's own comment is above tsa_fwd_pipelined_kernel's helpers.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace {

constexpr int BM = 64;       // query rows per CTA of the legacy kernel
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

// Is the pair (row, col) attended (col < S checked by the caller)? fq, pq / fk, pk: the frame and
// spatial index of row / col (unclamped).
__device__ __forceinline__ bool attended_at(int row, int fq, int pq, int col, int fk, int pk, const Params& p) {
  const int dp = pq > pk ? pq - pk : pk - pq;
  const int t = row - col, at = t < 0 ? -t : t;
  if (p.layout == 2)
    return at <= p.te0 || (at <= p.te1 && (dp < p.stripe_width || col < p.te2)) || (col < p.te2 && t > p.te1) ||
           (col > p.te3 && -t > p.te1);
  const int dist = fq > fk ? fq - fk : fk - fq;
  const bool keep = dist < p.local_frames || fk < p.sink_frames || (dist < p.stripe_frames && dp < p.stripe_width);
  return keep && (p.layout != 1 || at <= p.te0 || at >= p.te1);
}

__device__ __forceinline__ bool attended(int row, int col, const Params& p) {
  const int fq = row / p.frame_tokens, pq = row % p.frame_tokens;
  const int fk = col / p.frame_tokens, pk = col % p.frame_tokens;
  return attended_at(row, fq, pq, col, fk, pk, p);
}

template <typename T, int D, bool PARTIAL>
__device__ __forceinline__ void legacy_visit(int kb, int combo_bits, const Params& p, T* Qs, T* Ks, T* Vs,
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
__global__ void __launch_bounds__(NTHREADS) tsa_fwd_legacy_kernel(const Params p) {
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
    legacy_visit<T, D, false>(p.full_idx[(int64_t)qb * p.full_w + e], p.full_combo[(int64_t)qb * p.full_w + e], p,
                              Qs, Ks, Vs, qh, kh, vh, q0, cur_qv, o, m, l, warp, lane);
  const int np = p.part_cnt[qb];
  for (int e = 0; e < np; ++e)
    legacy_visit<T, D, true>(p.part_idx[(int64_t)qb * p.part_w + e], p.part_combo[(int64_t)qb * p.part_w + e], p,
                             Qs, Ks, Vs, qh, kh, vh, q0, cur_qv, o, m, l, warp, lane);

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
  cudaError_t err =
      cudaFuncSetAttribute(tsa_fwd_legacy_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return (int)err;
  dim3 grid(num_q_blocks, batch_heads);
  tsa_fwd_legacy_kernel<T, D><<<grid, NTHREADS, smem, stream>>>(p);
  return (int)cudaGetLastError();
}

// =============================================================================================
// Pipelined kernel (the default; LONGVIDEO_TSA_CUDA=legacy selects the kernel above):
// FlashAttention-2's tiling. A CTA is 4 warps x MT m16 row tiles: MT = 2 gives 32 query rows per
// warp and 128 queries per CTA (the schedule is built with block_m = 128), so every K and V
// fragment read from shared memory with ldmatrix feeds MT MMAs; each 64-key block is multiplied
// as two 32-key sub-tiles (BKH). K/V tiles of the schedule's 64-key blocks are double-buffered in
// shared memory and filled with cp.async: the next entry's tile streams in while the current one
// is multiplied. Q is staged once (rotated with variant 0) and its fragments are re-read from
// shared memory per sub-tile (the registers hold the MT tiles' accumulators instead).
//
// Temporal RoPE: K lands unrotated (cp.async cannot transform); after the wait each thread
// rotates, in place, the 16-byte chunks of [0, 2R) it copied itself (cp.async.wait_group makes a
// thread's own copies visible to it), before the barrier that publishes the tile. Q is re-rotated
// from global memory (its [0, 2R) chunks only) when an entry needs another q variant. A block pair
// spanning band edges computes its first combo's logit tile at full speed, then per further combo
// re-rotates K's chunks from global memory and computes that combo's logits 16 rows x 16 keys at
// a time, selecting per element by the pair's combo (combo_at).
//
// NaN rule (docs/ops.md): a masked key/value row never reaches a query. Logits of masked pairs are
// -inf (so masked k rows cannot), and p = 0 for them; but 0 * NaN = NaN in O += P V. Each thread
// checks the V chunks it copied of a partial entry and the barrier ORs the flags; a flagged entry
// (inf/NaN values in its V tile: rare) multiplies V with those values zeroed (in the fragments,
// registers only), then sets out[i, c] = NaN key by key where query i attends a key whose v[., c]
// is non-finite (pl_nonfinite_v_rule, the element mask recomputed).
// Unflagged and full entries run the plain P V.
// =============================================================================================

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
// 16-byte global -> shared copy; src_bytes = 0 zero-fills the destination (rows past S)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// exponent mask of a 16-bit float, for bit tests on packed pairs
template <typename T> struct Bits16;
template <> struct Bits16<__half> { static constexpr uint32_t EXP = 0x7c00u; };
template <> struct Bits16<__nv_bfloat16> { static constexpr uint32_t EXP = 0x7f80u; };

// 0xffff over each half of the packed pair w that is inf or NaN (exponent all ones), else 0
template <typename T>
__device__ __forceinline__ uint32_t nonfinite_halves(uint32_t w) {
  constexpr uint32_t E = Bits16<T>::EXP;
  return ((w & E) == E ? 0x0000ffffu : 0u) | (((w >> 16) & E) == E ? 0xffff0000u : 0u);
}

// The combo c's K variant (COMBO_Q_VARIANT / COMBO_K_VARIANT in longvideo/ops/plan/tiered.py):
// q is rotated with variant c, k with the mirrored one.
__device__ __forceinline__ int k_variant(int c) { return c == 0 ? 0 : ((c & 1) ? c + 1 : c - 1); }

// Rotate the temporal pairs of one 16-byte chunk (channels [c8, c8 + 8)) by the positions of
// `frame` under `variant` (pairs at channels >= 2R are left as they are).
template <typename T>
__device__ __forceinline__ uint4 rotate_chunk(uint4 val, int c8, int frame, int variant, const Params& p) {
  const float* cs = p.cos_t + ((int64_t)variant * p.F + frame) * (2 * p.rope_pairs);
  const float* sn = p.sin_t + ((int64_t)variant * p.F + frame) * (2 * p.rope_pairs);
  uint32_t* w = reinterpret_cast<uint32_t*>(&val);
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const int ch = c8 + 2 * t;
    if (ch < 2 * p.rope_pairs) {
      const float2 x = Vec<T>::to_f2(w[t]);
      const float co = cs[ch], si = sn[ch + 1];  // sin table holds +sin on the odd channel
      w[t] = Vec<T>::from_f2(x.x * co - x.y * si, x.x * si + x.y * co);
    }
  }
  return val;
}

// Chunk ownership of a BN-row K/V tile: thread t copies key row t / 2, chunks 2 * it + t % 2
// (it < D / 16). A thread pair covers 32 contiguous bytes of a row (whole sectors), every thread
// the same number of chunks of [0, 2R).
static_assert(NTHREADS == 2 * BN, "the K/V chunk ownership assumes two threads per key row");

// Keys per compute sub-tile: a 64-key block is multiplied as two 32-key halves, so that the logits
// (MT x 4 n8 tiles) and the MT x D/8 output tiles leave registers for the element mask, the combo
// selection and the NaN rule (with 64-key logits, D 128 and MT 2 the plain loop alone takes 254
// registers; ptxas -v, docs/perf_notes.md).
constexpr int BKH = 32;

template <typename T, int D>
__device__ __forceinline__ void pl_load_kv(T* Kst, T* Vst, const T* kh, const T* vh, int k0, const Params& p) {
  constexpr int PITCH = D + 8;
  const int r = threadIdx.x / 2, tok = k0 + r;
  const bool ok = tok < p.S;
  const T* ks = kh + (int64_t)(ok ? tok : 0) * p.skn;
  const T* vs = vh + (int64_t)(ok ? tok : 0) * p.svn;
#pragma unroll
  for (int it = 0; it < D / 16; ++it) {
    const int c8 = (2 * it + (threadIdx.x & 1)) * 8;
    cp_async16(Kst + r * PITCH + c8, ks + c8, ok ? 16 : 0);
    cp_async16(Vst + r * PITCH + c8, vs + c8, ok ? 16 : 0);
  }
}

// Rotate this thread's own chunks of [0, 2R) of the K tile in place (from_global: re-read them
// from k first, for a further combo of a band-edge block; any thread may then write any chunk, the
// caller has synchronised).
template <typename T, int D>
__device__ __forceinline__ void pl_rotate_k(T* Kst, const T* kh, int k0, int variant, bool from_global,
                                            const Params& p) {
  constexpr int PITCH = D + 8;
  const int r = threadIdx.x / 2, tok = k0 + r;
  if (tok >= p.S) return;  // zero-filled rows stay zero
  const int frame = tok / p.frame_tokens;
#pragma unroll 1  // rolled: a few registers while the logits and output tiles are live
  for (int it = 0; it < D / 16; ++it) {
    const int c8 = (2 * it + (threadIdx.x & 1)) * 8;
    if (c8 < 2 * p.rope_pairs) {
      uint4* dst = reinterpret_cast<uint4*>(Kst + r * PITCH + c8);
      const uint4 raw = from_global ? *reinterpret_cast<const uint4*>(kh + (int64_t)tok * p.skn + c8) : *dst;
      *dst = rotate_chunk<T>(raw, c8, frame, variant, p);
    }
  }
}

// Does any of this thread's own chunks of the V tile hold an inf or NaN?
template <typename T, int D>
__device__ __forceinline__ int pl_own_v_nonfinite(const T* Vst) {
  constexpr int PITCH = D + 8;
  const int r = threadIdx.x / 2;
  uint32_t any = 0;
#pragma unroll
  for (int it = 0; it < D / 16; ++it) {
    const int c8 = (2 * it + (threadIdx.x & 1)) * 8;
    const uint4 x = *reinterpret_cast<const uint4*>(Vst + r * PITCH + c8);
    any |= nonfinite_halves<T>(x.x) | nonfinite_halves<T>(x.y) | nonfinite_halves<T>(x.z) | nonfinite_halves<T>(x.w);
  }
  return any != 0u;
}

// Stage Q rows [q0, q0 + ROWS) synchronously (pitch D + 8), rotated with `variant` (< 0: not
// rotated); rope_only: only the chunks of [0, 2R) (the rest is already staged; rows past S stay
// zero), else every chunk, zero past S.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void pl_stage_q(T* Qs, const T* qh, int q0, int variant, bool rope_only,
                                           const Params& p) {
  constexpr int PITCH = D + 8;
  const int nch = rope_only ? (2 * p.rope_pairs + 7) / 8 : D / 8;
  for (int i = threadIdx.x; i < ROWS * nch; i += NTHREADS) {
    const int r = i / nch, c8 = (i % nch) * 8;
    const int tok = q0 + r;
    if (rope_only && tok >= p.S) continue;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (tok < p.S) {
      val = *reinterpret_cast<const uint4*>(qh + (int64_t)tok * p.sqn + c8);
      if (variant >= 0 && c8 < 2 * p.rope_pairs) val = rotate_chunk<T>(val, c8, tok / p.frame_tokens, variant, p);
    }
    *reinterpret_cast<uint4*>(Qs + r * PITCH + c8) = val;
  }
}

// A fragments of the warp's MT row tiles (16 rows each, starting at wrow) for channels
// [kk * 16, kk * 16 + 16): ldmatrix.x4 matrices 0-3 = (rows 0-7, k 0-7), (rows 8-15, k 0-7),
// (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a0..a3 of mma.m16n8k16.
template <typename T, int D>
__device__ __forceinline__ void pl_q_frag(uint32_t* a, const T* Qs, int row0, int kk, int lane) {
  ldmatrix_x4(a, Qs + (row0 + (lane % 16)) * (D + 8) + kk * 16 + (lane / 16) * 8);
}
// B fragments of keys [n16 * 16, n16 * 16 + 16) for channels [kk * 16, kk * 16 + 16): matrices
// (keys 0-7, k 0-7), (keys 0-7, k 8-15), (keys 8-15, k 0-7), (keys 8-15, k 8-15): b[0..1] for the
// first n8 tile, b[2..3] for the second.
template <typename T, int D>
__device__ __forceinline__ void pl_k_frag(uint32_t* b, const T* Kst, int n16, int kk, int lane) {
  const int mi = lane / 8;
  ldmatrix_x4(b, Kst + (n16 * 16 + (mi / 2) * 8 + (lane % 8)) * (D + 8) + kk * 16 + (mi % 2) * 8);
}
// B fragments of O += P V for keys [kk * 16, kk * 16 + 16) and channels [dn * 16, dn * 16 + 16)
// (V row-major in shared memory, hence .trans): b[0..1] channels 0-7, b[2..3] channels 8-15.
template <typename T, int D>
__device__ __forceinline__ void pl_v_frag(uint32_t* b, const T* Vst, int kk, int dn, int lane) {
  const int mi = lane / 8;
  ldmatrix_x4_trans(b, Vst + (kk * 16 + (mi % 2) * 8 + (lane % 8)) * (D + 8) + dn * 16 + (mi / 2) * 8);
}

// s[mt][j][.] = Q(row tile mt) . K(keys 8 j .. 8 j + 7 of the sub-tile)^T over all D channels, fp32;
// every K fragment feeds the MT row tiles.
template <typename T, int D, int MT>
__device__ __forceinline__ void pl_qk(float (*s)[BKH / 8][4], const T* Qs, const T* Kst, int wrow, int lane) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < BKH / 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) pl_q_frag<T, D>(a[mt], Qs, wrow + mt * 16, kk, lane);
#pragma unroll
    for (int n16 = 0; n16 < BKH / 16; ++n16) {
      uint32_t b[4];
      pl_k_frag<T, D>(b, Kst, n16, kk, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma16816<T>(s[mt][2 * n16], a[mt], b);
        mma16816<T>(s[mt][2 * n16 + 1], a[mt], b + 2);
      }
    }
  }
}

// A further combo c of a band-edge block pair: which of the thread's logits have combo c (bit
// 4 j + x of sel[mt] for s[mt][j][x], found by a rolled loop: few registers while s and the
// output tiles are live), then that combo's logits 16 rows x 16 keys at a time (two n8 tiles beside
// s; Q and K fragments re-read per tile: a rare path), kept where selected.
template <typename T, int D, int MT>
__device__ __forceinline__ void pl_qk_combo(float (*s)[BKH / 8][4], const T* Qs, const T* Kst, int wrow, int lane,
                                            int c, int q0, int k0, const Params& p) {
  const int g = lane / 4, t4 = lane % 4;
  uint32_t sel[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    sel[mt] = 0u;
#pragma unroll 1
    for (int i = 0; i < BKH / 2; ++i) {
      const int row = q0 + wrow + mt * 16 + g + 8 * ((i >> 1) & 1);
      const int col = k0 + (i >> 2) * 8 + 2 * t4 + (i & 1);
      const int fq = min(row / p.frame_tokens, p.F - 1), fk = min(col / p.frame_tokens, p.F - 1);
      if (combo_at(row, col, fq, fk, p) == c) sel[mt] |= 1u << i;
    }
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int n16 = 0; n16 < BKH / 16; ++n16) {
      float t[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      // rolled at D 128: unrolled, the fragments of all D / 16 steps were loaded at once (ptxas -v:
      // 100+ B of spills); unrolled at D 64 (rolled, 32 B of spills)
#pragma unroll(D > 64 ? 1 : D / 16)
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4], b[4];
        pl_q_frag<T, D>(a, Qs, wrow + mt * 16, kk, lane);
        pl_k_frag<T, D>(b, Kst, n16, kk, lane);
        mma16816<T>(t[0], a, b);
        mma16816<T>(t[1], a, b + 2);
      }
#pragma unroll
      for (int jj = 0; jj < 2; ++jj)
#pragma unroll
        for (int x = 0; x < 4; ++x)
          if ((sel[mt] >> ((2 * n16 + jj) * 4 + x)) & 1u) s[mt][2 * n16 + jj][x] = t[jj][x];
    }
}

// The NaN rule for an entry whose V tile holds inf/NaN values (rare; P V ran with them zeroed):
// out[i, c] = NaN where query i attends a key j of the tile (the element mask, as the logits were
// masked) with a non-finite v[j, c]. Key by key, element by element: slow, and cheap in registers.
template <typename T, int D, int MT>
__device__ __forceinline__ void pl_nonfinite_v_rule(float (*o)[D / 8][4], const T* Vst, int row0, int k0, int lane,
                                                 const Params& p) {
  const int g = lane / 4, t4 = lane % 4;
#pragma unroll 1
  for (int j = 0; j < BKH; ++j) {
    const int col = k0 + j;
    if (col >= p.S) break;
    const int fk = col / p.frame_tokens, pk = col - fk * p.frame_tokens;
    bool att[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = row0 + mt * 16 + g + 8 * hh;
        const int fq = row / p.frame_tokens, pq = row - fq * p.frame_tokens;
        att[mt][hh] = attended_at(row, fq, pq, col, fk, pk, p);
      }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const uint32_t bad = nonfinite_halves<T>(*reinterpret_cast<const uint32_t*>(Vst + j * (D + 8) + dt * 8 + 2 * t4));
      if (bad == 0u) continue;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
          if (att[mt][hh]) {
            if (bad & 0x0000ffffu) o[mt][dt][2 * hh] = __int_as_float(0x7fc00000);
            if (bad & 0xffff0000u) o[mt][dt][2 * hh + 1] = __int_as_float(0x7fc00000);
          }
    }
  }
}

template <typename T, int D, int MT>
__global__ void __launch_bounds__(NTHREADS) tsa_fwd_pipelined_kernel(const Params p) {
  constexpr int PBM = 16 * MT * NWARPS;  // queries per CTA
  constexpr int PITCH = D + 8;
  constexpr int NT = BKH / 8;  // n8 tiles of S per row tile and sub-tile
  constexpr int DT = D / 8;   // n8 tiles of O per row tile
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);  // [PBM][PITCH]
  T* Ks = Qs + PBM * PITCH;                // [2][BN][PITCH]
  T* Vs = Ks + 2 * BN * PITCH;             // [2][BN][PITCH]
  const int qb = blockIdx.x, bh = blockIdx.y;
  const int b = bh / p.H, h = bh % p.H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t4 = lane % 4;
  const T* qh = static_cast<const T*>(p.q) + b * p.sqb + h * p.sqh;
  const T* kh = static_cast<const T*>(p.k) + b * p.skb + h * p.skh;
  const T* vh = static_cast<const T*>(p.v) + b * p.svb + h * p.svh;
  T* oh = static_cast<T*>(p.o) + b * p.sob + h * p.soh;
  const int q0 = qb * PBM;
  const int wrow = warp * 16 * MT;  // the warp's first row inside the CTA's tile
  const bool rope = p.rope_pairs > 0;

  // the schedule row: full entries first, then partial ones
  const int nf = p.full_cnt[qb], n = nf + p.part_cnt[qb];
  const int* fidx = p.full_idx + (int64_t)qb * p.full_w;
  const int* fcmb = p.full_combo + (int64_t)qb * p.full_w;
  const int* pidx = p.part_idx + (int64_t)qb * p.part_w;
  const int* pcmb = p.part_combo + (int64_t)qb * p.part_w;

  if (n > 0) pl_load_kv<T, D>(Ks, Vs, kh, vh, (nf > 0 ? fidx[0] : pidx[0]) * BN, p);
  cp_async_commit();
  int cur_qv = 0;  // the variant Qs is rotated with (no rope: unrotated)
  pl_stage_q<T, D, PBM>(Qs, qh, q0, rope ? 0 : -1, false, p);

  float o[MT][DT][4];
  float m[MT][2], l[MT][2];  // l: this thread's partial row sums, reduced over the quad at the end
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < DT; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
    m[mt][0] = m[mt][1] = -1e30f;  // finite: a row with every key of a block masked keeps alpha = 1
    l[mt][0] = l[mt][1] = 0.f;
  }

#pragma unroll 1
  for (int e = 0; e < n; ++e) {
    const int stage = e & 1;
    T* Kst = Ks + stage * BN * PITCH;
    const T* Vst = Vs + stage * BN * PITCH;
    const bool partial = e >= nf;
    const int k0 = (partial ? pidx[e - nf] : fidx[e]) * BN;
    int bits = partial ? pcmb[e - nf] : fcmb[e];
    if (bits == 0) bits = 1;
    if (e + 1 < n) {  // the next entry's tile streams into the other stage meanwhile
      const int kn = (e + 1 < nf) ? fidx[e + 1] : pidx[e + 1 - nf];
      pl_load_kv<T, D>(Ks + (stage ^ 1) * BN * PITCH, Vs + (stage ^ 1) * BN * PITCH, kh, vh, kn * BN, p);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    const int c0 = __ffs(bits) - 1;
    if (rope) {
      pl_rotate_k<T, D>(Kst, kh, k0, k_variant(c0), false, p);
      if (c0 != cur_qv) {
        pl_stage_q<T, D, PBM>(Qs, qh, q0, c0, true, p);
        cur_qv = c0;
      }
    }
    // publishes the tile (and Q); ORs the flags "a V value of this partial entry is inf/NaN"
    const bool v_nonfinite = __syncthreads_or(partial ? pl_own_v_nonfinite<T, D>(Vst) : 0) != 0;

    const bool multi = bits != (1 << c0);  // a block pair spanning band edges
    // the 64-key block as two 32-key sub-tiles (BKH): logits, mask, online softmax, P V each
#pragma unroll 1
    for (int half = 0; half < BN / BKH; ++half) {
      const int kh0 = k0 + half * BKH;
      const T* Kh = Kst + half * BKH * PITCH;
      const T* Vh = Vst + half * BKH * PITCH;
      if (multi && half > 0) {  // K (and maybe Q) hold the last combo's rotation: back to c0's
        __syncthreads();
        pl_rotate_k<T, D>(Kst, kh, k0, k_variant(c0), true, p);
        if (c0 != cur_qv) {
          pl_stage_q<T, D, PBM>(Qs, qh, q0, c0, true, p);
          cur_qv = c0;
        }
        __syncthreads();
      }
      float s[MT][NT][4];
      pl_qk<T, D, MT>(s, Qs, Kh, wrow, lane);
      if (multi) {  // the further combos' logits
#pragma unroll 1
        for (int c = c0 + 1; c < 5; ++c) {
          if (!((bits >> c) & 1)) continue;
          __syncthreads();  // every warp is done with the previous combo's rotated tiles
          pl_rotate_k<T, D>(Kst, kh, k0, k_variant(c), true, p);
          if (c != cur_qv) {
            pl_stage_q<T, D, PBM>(Qs, qh, q0, c, true, p);
            cur_qv = c;
          }
          __syncthreads();
          pl_qk_combo<T, D, MT>(s, Qs, Kh, wrow, lane, c, q0, kh0, p);
        }
      }

      // scale (log2 units), element mask of partial entries
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int x = 0; x < 4; ++x) s[mt][j][x] *= p.qk_scale_log2;
      if (partial) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int row = q0 + wrow + mt * 16 + g + 8 * hh;
            const int fq = row / p.frame_tokens, pq = row - fq * p.frame_tokens;
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
              for (int c01 = 0; c01 < 2; ++c01) {
                const int col = kh0 + j * 8 + 2 * t4 + c01;
                const int fk = col / p.frame_tokens, pk = col - fk * p.frame_tokens;
                if (!(col < p.S && attended_at(row, fq, pq, col, fk, pk, p))) s[mt][j][2 * hh + c01] = -INFINITY;
              }
          }
      }

      // online softmax per row tile (rows g -> x = 0, 1; g + 8 -> x = 2, 3)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float mx[2] = {m[mt][0], m[mt][1]};
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int x = 0; x < 4; ++x) mx[x / 2] = fmaxf(mx[x / 2], s[mt][j][x]);
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
          mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
        }
        float alpha[2];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          alpha[hh] = exp2f(m[mt][hh] - mx[hh]);
          m[mt][hh] = mx[hh];
          l[mt][hh] *= alpha[hh];
        }
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            const float pe = exp2f(s[mt][j][x] - mx[x / 2]);
            s[mt][j][x] = pe;
            l[mt][x / 2] += pe;
          }
#pragma unroll
        for (int j = 0; j < DT; ++j) {
          o[mt][j][0] *= alpha[0]; o[mt][j][1] *= alpha[0];
          o[mt][j][2] *= alpha[1]; o[mt][j][3] *= alpha[1];
        }
      }

      // O += P V: P's accumulator layout is the A-fragment layout of the next mma (16 keys per step).
      // A flagged entry multiplies V with its non-finite values zeroed and then applies the NaN rule
      // element by element (pl_nonfinite_v_rule).
#pragma unroll
      for (int kk = 0; kk < BKH / 16; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          a[mt][0] = Vec<T>::from_f2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          a[mt][1] = Vec<T>::from_f2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          a[mt][2] = Vec<T>::from_f2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          a[mt][3] = Vec<T>::from_f2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
        if (!v_nonfinite) {
#pragma unroll
          for (int dn = 0; dn < D / 16; ++dn) {
            uint32_t bv[4];
            pl_v_frag<T, D>(bv, Vh, kk, dn, lane);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              mma16816<T>(o[mt][2 * dn], a[mt], bv);
              mma16816<T>(o[mt][2 * dn + 1], a[mt], bv + 2);
            }
          }
        } else {
#pragma unroll
          for (int dn = 0; dn < D / 16; ++dn) {
            uint32_t bv[4];
            pl_v_frag<T, D>(bv, Vh, kk, dn, lane);
#pragma unroll
            for (int x = 0; x < 4; ++x) bv[x] &= ~nonfinite_halves<T>(bv[x]);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              mma16816<T>(o[mt][2 * dn], a[mt], bv);
              mma16816<T>(o[mt][2 * dn + 1], a[mt], bv + 2);
            }
          }
        }
      }
      if (v_nonfinite) pl_nonfinite_v_rule<T, D, MT>(o, Vh, q0 + wrow, kh0, lane, p);
    }
    __syncthreads();  // every warp is done with this stage (and Qs) before they are refilled
  }

  // epilogue: reduce the row sums over the quad, normalise, store
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float sum = l[mt][hh];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      const int row = q0 + wrow + mt * 16 + g + 8 * hh;
      if (row >= p.S) continue;
#pragma unroll
      for (int j = 0; j < DT; ++j) {
        const uint32_t w = Vec<T>::from_f2(o[mt][j][2 * hh] * inv, o[mt][j][2 * hh + 1] * inv);
        *reinterpret_cast<uint32_t*>(oh + (int64_t)row * p.son + j * 8 + 2 * t4) = w;
      }
    }
}

template <typename T, int D, int MT>
int launch_pipelined(const Params& p, int num_q_blocks, int batch_heads, cudaStream_t stream) {
  const size_t smem = size_t(16 * MT * NWARPS + 4 * BN) * (D + 8) * sizeof(T);
  cudaError_t err =
      cudaFuncSetAttribute(tsa_fwd_pipelined_kernel<T, D, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return (int)err;
  dim3 grid(num_q_blocks, batch_heads);
  tsa_fwd_pipelined_kernel<T, D, MT><<<grid, NTHREADS, smem, stream>>>(p);
  return (int)cudaGetLastError();
}

}  // namespace

// dtype: 0 = float16, 1 = bfloat16. head_dim: 64 or 128. Strides in elements, last dim contiguous.
// kernel: 0 = the legacy kernel (block_m 64), 1 = the pipelined kernel (block_m 128: 32 query rows
// per warp); block_m is the schedule's query block. Returns a cudaError_t (0 on success); -1 for
// an unsupported dtype / head_dim / kernel / block_m.
extern "C" int longvideo_tsa_launch(
    const void* q, const void* k, const void* v, void* o,
    const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides, const int64_t* o_strides,
    const int* full_idx, const int* full_cnt, const int* full_combo,
    const int* part_idx, const int* part_cnt, const int* part_combo, int full_w, int part_w, int num_q_blocks,
    const float* cos_t, const float* sin_t, int B, int H, int S, int head_dim, int frame_tokens,
    int local_frames, int stripe_frames, int stripe_width, int sink_frames, int rope_pairs, int w1, int w2,
    int layout, int te0, int te1, int te2, int te3, float scale, int dtype, int kernel, int block_m,
    void* stream) {
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
  if (kernel == 0 && block_m == BM) {
    if (dtype == 0 && head_dim == 64) return launch<__half, 64>(p, num_q_blocks, bh, st);
    if (dtype == 0 && head_dim == 128) return launch<__half, 128>(p, num_q_blocks, bh, st);
    if (dtype == 1 && head_dim == 64) return launch<__nv_bfloat16, 64>(p, num_q_blocks, bh, st);
    if (dtype == 1 && head_dim == 128) return launch<__nv_bfloat16, 128>(p, num_q_blocks, bh, st);
  }
  if (kernel == 1 && block_m == 32 * NWARPS) {  // MT = 2
    if (dtype == 0 && head_dim == 64) return launch_pipelined<__half, 64, 2>(p, num_q_blocks, bh, st);
    if (dtype == 0 && head_dim == 128) return launch_pipelined<__half, 128, 2>(p, num_q_blocks, bh, st);
    if (dtype == 1 && head_dim == 64) return launch_pipelined<__nv_bfloat16, 64, 2>(p, num_q_blocks, bh, st);
    if (dtype == 1 && head_dim == 128) return launch_pipelined<__nv_bfloat16, 128, 2>(p, num_q_blocks, bh, st);
  }
  return -1;
}
