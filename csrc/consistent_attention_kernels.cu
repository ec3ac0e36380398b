// Consistent self-attention forward (StoryDiffusion; Ouroboros' SACFA), tensor-core kernel.
//
// Row b of q (B, H, N, D) attends with ONE online softmax over a virtual key sequence
//   t in [0, N)                : its own tokens k[b, h, t]
//   t in [N, N + S_b)          : the sampled tokens of the other images of its group/window,
//                                gathered in place: sample_idx[j] -> (src, pos) = divmod(idx, N),
//                                j walking the two runs [lo1, hi1) and [lo2, hi2) of the segment
//                                table (built on the device by torch.searchsorted)
//   t in [N + S_b, N + S_b + E): bank rows (group stride 0 for a shared bank)
// and the concatenation is never materialised: every key tile resolves its rows' addresses on the
// fly and streams them into shared memory with cp.async (16-byte chunks, zero-fill past the end
// and past D).
//
// Tiling (FlashAttention-2's): one CTA = 4 warps x MT m16 row tiles of queries of one (b, h): MT = 2
// (32 rows per warp, 128 queries per CTA) for padded head dims <= 128, so every K / V fragment
// fetched from shared memory feeds two MMAs; MT = 1 (16 rows, 64 queries) above, where two row
// tiles' accumulators do not fit the registers. Key tiles of BN rows (launch_dp), double-buffered
// in shared memory with cp.async (tile t + 1 streams in while tile t is multiplied); S = Q K^T and
// O += P V with mma.sync.m16n8k16 (fp16/bf16 in, fp32 accumulate), operands fetched with ldmatrix
// (.trans for V); Q fragments stay in registers with MT = 1, else are ldmatrix'd from shared
// memory per key tile; softmax statistics (running max, sum) in fp32 registers per row,
// exp2 with the scale folded into log2 units; the lse (natural log) is written for the backward.
// Every row's arithmetic is the same whatever MT: MT only changes which warp holds the row.
//
// Only CUDA headers here (compiled by nvcc without torch); the torch glue is consistent_attention.cpp.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace lv_ca {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;

struct Params {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;
  const void* sidx;
  const int* seg;
  const void* bank_k;
  const void* bank_v;
  int64_t sq[4], sk[4], sv[4], so[4], sbk[4], sbv[4];  // element strides; bank: (group, h, e, d)
  int B, H, N, D, E, group_size, has_samples, sidx_is64;
  float scale_log2;  // softmax scale * log2(e)
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

template <typename T> struct Mma;
template <> struct Mma<__half> {
  __device__ __forceinline__ static void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float x, float y) {
    __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float x, float y) {
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// Row segments of the virtual key sequence of one (b, h).
struct RowKeys {
  int b, h, g, lo1, len1, lo2, nsamp;
};

// Element offsets of virtual key t of a row inside k/v (or the bank); false past the end.
template <typename T>
__device__ __forceinline__ bool key_row(const Params& p, const RowKeys& rk, int t, const T*& kp, const T*& vp) {
  if (t < p.N) {
    kp = static_cast<const T*>(p.k) + rk.b * p.sk[0] + rk.h * p.sk[1] + t * p.sk[2];
    vp = static_cast<const T*>(p.v) + rk.b * p.sv[0] + rk.h * p.sv[1] + t * p.sv[2];
    return true;
  }
  t -= p.N;
  if (t < rk.nsamp) {
    const int j = t < rk.len1 ? rk.lo1 + t : rk.lo2 + (t - rk.len1);
    int64_t src, pos;
    if (p.sidx_is64) {
      const int64_t idx = static_cast<const int64_t*>(p.sidx)[j];
      src = idx / p.N;
      pos = idx - src * p.N;
    } else {  // 32-bit division when the flat index fits (the common case)
      const int idx = static_cast<const int*>(p.sidx)[j];
      const int s = idx / p.N;
      src = s;
      pos = idx - s * p.N;
    }
    kp = static_cast<const T*>(p.k) + src * p.sk[0] + rk.h * p.sk[1] + pos * p.sk[2];
    vp = static_cast<const T*>(p.v) + src * p.sv[0] + rk.h * p.sv[1] + pos * p.sv[2];
    return true;
  }
  t -= rk.nsamp;
  if (t < p.E) {
    kp = static_cast<const T*>(p.bank_k) + rk.g * p.sbk[0] + rk.h * p.sbk[1] + t * p.sbk[2];
    vp = static_cast<const T*>(p.bank_v) + rk.g * p.sbv[0] + rk.h * p.sbv[1] + t * p.sbv[2];
    return true;
  }
  return false;
}

template <typename T, int DP, int BN, int MT>
__global__ void __launch_bounds__(kThreads) consistent_attention_fwd_kernel(const Params p) {
  constexpr int BM = kWarps * 16 * MT;  // queries per CTA
  constexpr int LD = DP + 8;       // padded smem row (halves): breaks ldmatrix bank conflicts
  constexpr int CH = DP / 8;       // 16-byte chunks per row
  constexpr int NT = BN / 8;       // n8 tiles of S per warp
  constexpr int DT = DP / 8;       // n8 tiles of O per warp
  // Q fragments in registers only with one row tile per warp (DP <= 128): with two, the registers
  // go to the second tile's accumulators and Q is re-read with ldmatrix per key tile (ptxas -v:
  // keeping them spilled 8-16 B at DP 32 / 64).
  constexpr bool kQInRegs = MT == 1 && DP <= 128;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * LD;            // [2][BN][LD]
  T* sV = sK + 2 * BN * LD;        // [2][BN][LD]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = blockIdx.x * BM;
  RowKeys rk;
  rk.b = blockIdx.y / p.H;
  rk.h = blockIdx.y % p.H;
  rk.g = rk.b / p.group_size;
  rk.lo1 = rk.len1 = rk.lo2 = rk.nsamp = 0;
  if (p.has_samples) {
    const int* s = p.seg + 4 * rk.b;
    rk.lo1 = s[0];
    rk.len1 = s[1] - s[0];
    rk.lo2 = s[2];
    rk.nsamp = rk.len1 + (s[3] - s[2]);
  }
  const int total = p.N + rk.nsamp + p.E;
  const int n_tiles = (total + BN - 1) / BN;

  // Q tile -> smem (rows past N and columns past D zero-filled)
  {
    constexpr int TPR = kThreads / BM;
    const int r = tid / TPR;
    const int row = m0 + r;
    const T* qrow = static_cast<const T*>(p.q) + rk.b * p.sq[0] + rk.h * p.sq[1] + int64_t(row < p.N ? row : 0) * p.sq[2];
    for (int cc = tid % TPR; cc < CH; cc += TPR) {
      const bool ok = row < p.N && cc * 8 < p.D;
      cp_async16(sQ + r * LD + cc * 8, ok ? qrow + cc * 8 : qrow, ok ? 16 : 0);
    }
  }
  auto load_kv = [&](int stage, int tile) {
    constexpr int TPR = kThreads / BN;  // threads per key row: one address resolution per thread
    const int r = tid / TPR;
    const T *kp, *vp;
    const bool valid = key_row<T>(p, rk, tile * BN + r, kp, vp);
    if (!valid) {
      kp = static_cast<const T*>(p.k);
      vp = static_cast<const T*>(p.v);
    }
    T* dk = sK + (stage * BN + r) * LD;
    T* dv = sV + (stage * BN + r) * LD;
    for (int cc = tid % TPR; cc < CH; cc += TPR) {
      const bool ok = valid && cc * 8 < p.D;
      cp_async16(dk + cc * 8, ok ? kp + cc * 8 : kp, ok ? 16 : 0);
      cp_async16(dv + cc * 8, ok ? vp + cc * 8 : vp, ok ? 16 : 0);
    }
  };
  load_kv(0, 0);
  cp_async_commit();

  const int g8 = lane / 4, c4 = lane % 4;
  const int wrow = warp * 16 * MT;  // first query row of this warp inside the CTA's tile
  float acc[MT][DT][4];
  float row_max[MT][2], row_sum[MT][2];  // row_sum: per-thread partial sums, reduced over the quad at the end
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < DT; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }
  uint32_t qf[kQInRegs ? MT : 1][kQInRegs ? DP / 16 : 1][4];
  auto q_frag_addr = [&](int mt, int kk) {
    return sQ + (wrow + mt * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * LD + kk * 16 + (lane / 16) * 8;
  };

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < n_tiles) {
      load_kv(stage ^ 1, tile + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* cK = sK + stage * BN * LD;
    const T* cV = sV + stage * BN * LD;
    if (kQInRegs && tile == 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) ldmatrix_x4(qf[kQInRegs ? mt : 0][kQInRegs ? kk : 0], q_frag_addr(mt, kk));
    }

    // S = Q K^T (16 MT x BN per warp): each K fragment feeds the MT row tiles
    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < NT; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if (kQInRegs) {
#pragma unroll
          for (int x = 0; x < 4; ++x) a[mt][x] = qf[kQInRegs ? mt : 0][kQInRegs ? kk : 0][x];
        } else {
          ldmatrix_x4(a[mt], q_frag_addr(mt, kk));
        }
      }
#pragma unroll
      for (int nb = 0; nb < BN / 16; ++nb) {
        uint32_t bfr[4];
        ldmatrix_x4(bfr, cK + (nb * 16 + (lane % 8) + (lane / 16) * 8) * LD + kk * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma<T>::run(s[mt][2 * nb], a[mt], bfr[0], bfr[1]);
          Mma<T>::run(s[mt][2 * nb + 1], a[mt], bfr[2], bfr[3]);
        }
      }
    }

    // online softmax (log2 domain) per row tile; columns past the end of the virtual sequence are -inf
    const int valid = total - tile * BN;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float mnew[2] = {row_max[mt][0], row_max[mt][1]};
#pragma unroll
      for (int i = 0; i < NT; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = i * 8 + 2 * c4 + (e & 1);
          s[mt][i][e] = col < valid ? s[mt][i][e] * p.scale_log2 : -INFINITY;
          mnew[e / 2] = fmaxf(mnew[e / 2], s[mt][i][e]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mnew[r] = fmaxf(mnew[r], __shfl_xor_sync(0xffffffff, mnew[r], 1));
        mnew[r] = fmaxf(mnew[r], __shfl_xor_sync(0xffffffff, mnew[r], 2));
      }
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        alpha[r] = exp2f(row_max[mt][r] - mnew[r]);  // 0 on the first tile (row_max = -inf)
        row_max[mt][r] = mnew[r];
        row_sum[mt][r] *= alpha[r];
      }
#pragma unroll
      for (int i = 0; i < NT; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][i][e] = exp2f(s[mt][i][e] - mnew[e / 2]);
          row_sum[mt][e / 2] += s[mt][i][e];
        }
      }
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        acc[mt][i][0] *= alpha[0];
        acc[mt][i][1] *= alpha[0];
        acc[mt][i][2] *= alpha[1];
        acc[mt][i][3] *= alpha[1];
      }
    }

    // O += P V: the S accumulators of two n8 tiles are the A fragment of one k16 step; each V
    // fragment feeds the MT row tiles
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = Mma<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = Mma<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = Mma<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = Mma<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dn = 0; dn < DP / 16; ++dn) {
        uint32_t bfr[4];
        ldmatrix_x4_trans(bfr, cV + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * LD + dn * 16 + (lane / 16) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma<T>::run(acc[mt][2 * dn], a[mt], bfr[0], bfr[1]);
          Mma<T>::run(acc[mt][2 * dn + 1], a[mt], bfr[2], bfr[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // epilogue: normalise, store O (pairs of columns) and the natural-log lse
  T* obase = static_cast<T*>(p.o) + rk.b * p.so[0] + rk.h * p.so[1];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_sum[mt][r] += __shfl_xor_sync(0xffffffff, row_sum[mt][r], 1);
      row_sum[mt][r] += __shfl_xor_sync(0xffffffff, row_sum[mt][r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + wrow + mt * 16 + g8 + r * 8;
      if (row >= p.N) continue;
      const float inv = 1.f / row_sum[mt][r];
      T* orow = obase + int64_t(row) * p.so[2];
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        const int col = i * 8 + 2 * c4;
        if (col < p.D) {  // D % 8 == 0: both columns of the pair are valid together
          *reinterpret_cast<uint32_t*>(orow + col) =
              Mma<T>::pack(acc[mt][i][2 * r] * inv, acc[mt][i][2 * r + 1] * inv);
        }
      }
      if (c4 == 0)
        p.lse[(int64_t(rk.b) * p.H + rk.h) * p.N + row] = (row_max[mt][r] + log2f(row_sum[mt][r])) * 0.6931471805599453f;
    }
  }
}

template <typename T, int DP>
cudaError_t launch_dp(const Params& p, cudaStream_t stream) {
  // MT row tiles of 16 per warp and BN keys per tile, chosen by ptxas -v for sm_90 (no spills,
  // < 255 registers; the numbers are in docs/perf_notes.md): 32 rows per warp up to DP 128.
  // MT = 2, BN = 64 spills 52 B at DP 96 (BN 32: 241 registers); DP 160 / 256 keep MT = 1, BN = 32.
  constexpr int MT = DP <= 128 ? 2 : 1;
  constexpr int BN = (DP <= 128 && DP != 96) ? 64 : 32;
  constexpr int BM = kWarps * 16 * MT;
  constexpr int LD = DP + 8;
  const int smem = (BM * LD + 4 * BN * LD) * int(sizeof(T));
  auto kernel = consistent_attention_fwd_kernel<T, DP, BN, MT>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  dim3 grid((p.N + BM - 1) / BM, p.B * p.H);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const Params& p, cudaStream_t stream) {
  // padded head dims: the kernel zero-fills columns D..DP-1 (D % 8 == 0)
  if (p.D <= 32) return launch_dp<T, 32>(p, stream);
  if (p.D <= 48) return launch_dp<T, 48>(p, stream);
  if (p.D <= 64) return launch_dp<T, 64>(p, stream);
  if (p.D <= 80) return launch_dp<T, 80>(p, stream);
  if (p.D <= 96) return launch_dp<T, 96>(p, stream);
  if (p.D <= 128) return launch_dp<T, 128>(p, stream);
  if (p.D <= 160) return launch_dp<T, 160>(p, stream);
  if (p.D <= 256) return launch_dp<T, 256>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace lv_ca

// C ABI used by consistent_attention.cpp. strides: 24 int64 element strides in the order
// q(4) k(4) v(4) out(4) bank_k(4: group, h, e, d; group 0 when shared) bank_v(4).
// dtype: 0 = float16, 1 = bfloat16. Returns a cudaError_t.
extern "C" int longvideo_consistent_attention_launch(
    const void* q, const void* k, const void* v, void* out, float* lse, const void* sample_idx, int sidx_is64,
    const int* seg, const void* bank_k, const void* bank_v, const int64_t* strides, int B, int H, int N, int D,
    int E, int group_size, int has_samples, float scale, int dtype, void* stream) {
  if (D % 8 != 0 || D < 8 || D > 256 || N <= 0 || B <= 0 || H <= 0 || B * H > 65535 || group_size <= 0)
    return static_cast<int>(cudaErrorInvalidValue);
  lv_ca::Params p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.o = out;
  p.lse = lse;
  p.sidx = sample_idx;
  p.seg = seg;
  p.bank_k = bank_k;
  p.bank_v = bank_v;
  for (int i = 0; i < 4; ++i) {
    p.sq[i] = strides[i];
    p.sk[i] = strides[4 + i];
    p.sv[i] = strides[8 + i];
    p.so[i] = strides[12 + i];
    p.sbk[i] = strides[16 + i];
    p.sbv[i] = strides[20 + i];
  }
  p.B = B;
  p.H = H;
  p.N = N;
  p.D = D;
  p.E = bank_k ? E : 0;
  p.group_size = group_size;
  p.has_samples = has_samples;
  p.sidx_is64 = sidx_is64;
  p.scale_log2 = scale * 1.4426950408889634f;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err = dtype == 0 ? lv_ca::launch_dtype<__half>(p, s)
                  : dtype == 1 ? lv_ca::launch_dtype<__nv_bfloat16>(p, s)
                               : cudaErrorInvalidValue;
  return static_cast<int>(err);
}
