// Kernels of the virtual accelerator's CUDA backend. Compiled once per
// process by NVRTC (see ffi.rs) with --fmad=false: no multiply-add is
// contracted unless written as fmaf, so the arithmetic follows the CPU
// backend (Rust never contracts) operation for operation where it can.
//
// Layouts (all row-major, as the CPU backend):
//   Q4_1 block, 20 bytes: f16 d, f16 m, 16 bytes of nibbles (low: 0..16, high: 16..32)
//   Q8_0 block, 34 bytes: f16 d, 32 int8
//   quantized activations: int8 q[rows*k], float d[rows*kb] (f16-rounded), float s[rows*kb]
// Every kernel bounds-checks its indices against the lengths it is given.

// No headers: NVRTC compiles this without a CUDA include directory.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned int u32;
typedef unsigned long long u64;

#define DT_F32 0
#define DT_F16 1
#define DT_Q4_1 2
#define DT_Q8_0 3

#define INFINITY __int_as_float(0x7f800000)

#ifndef CINFER_CUDA_EMU
__device__ __forceinline__ float h2f(unsigned short b) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
}
// Round to nearest even, as half::f16::from_f32.
__device__ __forceinline__ unsigned short f2h(float x) {
    unsigned short b;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(x));
    return b;
}
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif
// (Under CINFER_CUDA_EMU, the CPU emulator of the tests, cuda/emu/, provides
// h2f, f2h and DYNAMIC_SHARED instead; nothing else differs.)
__device__ __forceinline__ float round_f16(float x) { return h2f(f2h(x)); }
__device__ __forceinline__ bool is_nan(float x) { return x != x; }

// e^x by the CPU kernels' formula (accel/src/simd.rs `EXP`, `portable::exp`),
// operation for operation, so silu and softmax give the CPU's numbers (libm's
// or CUDA's expf differ from it in the last bit on a few percent of inputs).
// NaN becomes the low clamp, as in the CPU's max(x, lo).
__device__ __forceinline__ float kexp(float x) {
    x = fminf(fmaxf(x, -87.33654f), 88.0f);
    float fx = floorf(fmaf(x, 1.44269504088896340736f, 0.5f));
    float r = fmaf(fx, -0.6933594f, x);
    r = fmaf(fx, 2.1219444e-4f, r);
    float y = 1.9875691e-4f;
    y = fmaf(y, r, 1.3981999e-3f);
    y = fmaf(y, r, 8.333452e-3f);
    y = fmaf(y, r, 4.1665796e-2f);
    y = fmaf(y, r, 1.6666665e-1f);
    y = fmaf(y, r, 0.5f);
    y = fmaf(y, r * r, r + 1.0f);
    // 2^fx: fx lies in -126..=127 after the clamp, a normal exponent.
    return y * __int_as_float(((int)fx + 127) << 23);
}
__device__ __forceinline__ unsigned short ld_u16(const u8* p) {
    return (unsigned short)p[0] | ((unsigned short)p[1] << 8);
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ int warp_sum_i(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Block-wide reductions (blockDim.x a multiple of 32, at most 1024).
__device__ float block_max(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    float r = -INFINITY;
    for (int i = 0; i < nw; i++) r = fmaxf(r, sh[i]);
    __syncthreads();
    return r;
}
__device__ double block_sum_d(double v, double* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    double r = 0.0;
    for (int i = 0; i < nw; i++) r += sh[i];
    __syncthreads();
    return r;
}
__device__ u64 block_max_u64(u64 v, u64* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        u64 t = __shfl_xor_sync(0xffffffffu, v, o);
        v = t > v ? t : v;
    }
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    u64 r = 0;
    for (int i = 0; i < nw; i++) r = sh[i] > r ? sh[i] : r;
    __syncthreads();
    return r;
}

// ---------------------------------------------------------------- activations

// One warp per 32-block of x: q = round_ties_even(x * 127/amax), d = f16(amax/127),
// s = f16(amax/127 * sum q), exactly as quant::quantize_q8_1 / quantize_q8_0.
// (blockDim.x is a multiple of 32, so the early return is warp-uniform.)
// The warp's 32-block (lane = element, value v) quantized: q[lane], and lane 0
// writes *d and *s.
__device__ __forceinline__ void quantize_block(float v, int lane, i8* q, float* d, float* s) {
    // Starting from 0 as the CPU's fold: fmaxf drops NaN, so an all-NaN block
    // gets amax 0 (d = s = 0), not NaN.
    float amax = warp_max(fmaxf(0.0f, fabsf(v)));
    float dd = amax / 127.0f;
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    float r = rintf(v * id);
    int qi = is_nan(r) ? 0 : (int)fmaxf(-128.0f, fminf(127.0f, r));
    q[lane] = (i8)qi;
    int sum = warp_sum_i(qi);
    if (lane == 0) {
        *d = round_f16(dd);
        *s = round_f16(dd * (float)sum);
    }
}

// The same quantization of one 32-block by a single thread, in order:
// max and the integer sum do not depend on the order, so q, d and s are
// quantize_block's bit for bit. No warp shuffles: cheap where a block only
// needs a few rows quantized (gemv_qx), and on the CPU emulator.
__device__ void quantize_block_serial(const float* x, i8* q, float* d, float* s) {
    float amax = 0.0f;
    for (int e = 0; e < 32; e++) amax = fmaxf(amax, fabsf(x[e]));
    float dd = amax / 127.0f;
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    for (int e = 0; e < 32; e++) {
        float r = rintf(x[e] * id);
        int qi = is_nan(r) ? 0 : (int)fmaxf(-128.0f, fminf(127.0f, r));
        q[e] = (i8)qi;
        sum += qi;
    }
    *d = round_f16(dd);
    *s = round_f16(dd * (float)sum);
}

extern "C" __global__ void quantize_act(const float* x, i8* q, float* d, float* s, u32 blocks) {
    u64 b = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (b >= blocks) return;
    quantize_block(x[b * 32 + lane], lane, q + b * 32, d + b, s + b);
}

// x' = d * q (exact in f32), and for Q4_1 the block sums s in extra columns
// k..k+kb: the GEMM then computes the CPU's Σ_b (wd·xd)·Σq + wm·s up to f32 summation order.
extern "C" __global__ void dequant_act(const i8* q, const float* d, const float* s, float* out,
                                       u32 rows, u32 k, u32 with_s) {
    u32 kb = k / 32;
    u32 ld = with_s ? k + kb : k;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * ld) return;
    u32 r = (u32)(i / ld), c = (u32)(i % ld);
    if (c < k) out[i] = d[(u64)r * kb + c / 32] * (float)q[(u64)r * k + c];
    else out[i] = s[(u64)r * kb + (c - k)];
}

extern "C" __global__ void round_f16_f32(const float* x, float* out, u32 n) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = round_f16(x[i]);
}

// ---------------------------------------------------------------- matmul

// Decode GEMV: one warp per weight row j and activation row i (blockIdx.y).
// Lanes compute per-block terms; lane 0 folds them in block order with the
// CPU's fused multiply-adds, so the sum is the CPU's dot_q4_1_q8_1 /
// dot_q8_0_q8_0 bit for bit. `xr`, `xd`, `xs` are activation row i's
// quantized values and block scales and sums; `sh` this warp's 128 floats of
// shared memory. Lane 0 gets the dot product.
__device__ float gemv_dot(const u8* w, u32 dtype, bool active, u32 j, const i8* xr,
                          const float* xd, const float* xs, u32 kb, float* sh) {
    float* scales = sh;
    float* sums = sh + 32;
    float* wmins = sh + 64;
    float* xsums = sh + 96;
    int lane = threadIdx.x & 31;
    u32 bsz = dtype == DT_Q4_1 ? 20 : 34;
    const u8* row = w + (u64)(active ? j : 0) * kb * bsz;
    float acc = 0.0f, mins = 0.0f;
    for (u32 c = 0; c < kb; c += 32) {
        u32 b = c + lane;
        float sc = 0.0f, si = 0.0f, mw = 0.0f, sx = 0.0f;
        if (active && b < kb) {
            const u8* blk = row + (u64)b * bsz;
            const i8* xb = xr + (u64)b * 32;
            int sumi = 0;
            if (dtype == DT_Q4_1) {
                for (int e = 0; e < 16; e++) {
                    u8 byte = blk[4 + e];
                    sumi += (int)(byte & 0x0f) * (int)xb[e] + (int)(byte >> 4) * (int)xb[e + 16];
                }
                mw = h2f(ld_u16(blk + 2));
                sx = xs[b];
            } else {
                const i8* wq = (const i8*)(blk + 2);
                for (int e = 0; e < 32; e++) sumi += (int)wq[e] * (int)xb[e];
            }
            sc = h2f(ld_u16(blk)) * xd[b];
            si = (float)sumi;
        }
        scales[lane] = sc;
        sums[lane] = si;
        wmins[lane] = mw;
        xsums[lane] = sx;
        __syncwarp();
        if (lane == 0) {
            u32 lim = kb - c < 32 ? kb - c : 32;
            for (u32 e = 0; e < lim; e++) {
                acc = fmaf(scales[e], sums[e], acc);
                mins = fmaf(wmins[e], xsums[e], mins);
            }
        }
        __syncwarp();
    }
    return dtype == DT_Q4_1 ? acc + mins : acc;
}

extern "C" __global__ void gemv_q(const u8* w, u32 dtype, const i8* xq, const float* xd,
                                  const float* xs, float* out, u32 n, u32 kb) {
    __shared__ float sh[8][128];
    int lane = threadIdx.x & 31, wi = threadIdx.x >> 5;
    u32 j = blockIdx.x * 8 + wi;
    u32 i = blockIdx.y;
    bool active = j < n;
    float r = gemv_dot(w, dtype, active, j, xq + (u64)i * kb * 32, xd + (u64)i * kb,
                       xs + (u64)i * kb, kb, sh[wi]);
    if (active && lane == 0) out[(u64)i * n + j] = r;
}

// gemv_q with the activation's quantization fused in (one launch instead of
// two): each thread block stages activation row i (f32, kb*32 values) in
// dynamic shared memory with coalesced loads (33 floats a 32-block, so the
// next step's threads read different banks), quantizes it there with
// quantize_act's formula, one thread a 32-block, then runs gemv_q on it.
// Dynamic shared memory: kb floats d, kb floats s, kb*33 floats staged,
// kb*32 int8 q (172 bytes a 32-block; Kernels::gemv_qx_shared_bytes).
extern "C" __global__ void gemv_qx(const u8* w, u32 dtype, const float* x, float* out, u32 n,
                                   u32 kb) {
    __shared__ float sh[8][128];
    DYNAMIC_SHARED(float, act);
    float* xd = act;
    float* xs = act + kb;
    float* xf = act + 2 * kb;
    i8* xq = (i8*)(xf + kb * 33);
    int lane = threadIdx.x & 31, wi = threadIdx.x >> 5;
    u32 i = blockIdx.y;
    const float* xr = x + (u64)i * kb * 32;
    for (u32 e = threadIdx.x; e < kb * 32; e += blockDim.x) xf[(e >> 5) * 33 + (e & 31)] = xr[e];
    __syncthreads();
    for (u32 b = threadIdx.x; b < kb; b += blockDim.x) {
        quantize_block_serial(xf + b * 33, xq + b * 32, xd + b, xs + b);
    }
    __syncthreads();
    u32 j = blockIdx.x * 8 + wi;
    bool active = j < n;
    float r = gemv_dot(w, dtype, active, j, xq, xd, xs, kb, sh[wi]);
    if (active && lane == 0) out[(u64)i * n + j] = r;
}

// Weight tile for the prompt GEMM: rows row0..row0+rows of w as f32 [rows, ld].
// Q4_1: d·q in columns 0..k and m per block in columns k..k+kb; Q8_0: d·q; F16: the value.
extern "C" __global__ void dequant_tile(const u8* w, u32 dtype, float* out, u32 row0, u32 rows,
                                        u32 k) {
    u32 kb = k / 32;
    u32 ld = dtype == DT_Q4_1 ? k + kb : k;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * ld) return;
    u64 r = row0 + i / ld;
    u32 c = (u32)(i % ld);
    float v;
    if (dtype == DT_F16) {
        v = h2f(((const unsigned short*)w)[r * k + c]);
    } else if (dtype == DT_Q4_1) {
        if (c < k) {
            const u8* blk = w + (r * kb + c / 32) * 20;
            u32 e = c % 32;
            u8 byte = blk[4 + (e & 15)];
            u32 qv = e < 16 ? (byte & 0x0f) : (byte >> 4);
            v = h2f(ld_u16(blk)) * (float)qv;
        } else {
            v = h2f(ld_u16(w + (r * kb + (c - k)) * 20 + 2));
        }
    } else {
        const u8* blk = w + (r * kb + c / 32) * 34;
        v = h2f(ld_u16(blk)) * (float)(i8)blk[2 + c % 32];
    }
    out[i] = v;
}

// ---------------------------------------------------------------- elementwise

// Rows `ids` of a table [.., d] of any dtype as f32 (quant::dequant_*: q·d + m).
extern "C" __global__ void embedding(const u8* table, u32 dtype, const u32* ids, float* out,
                                     u32 n_ids, u32 d) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)n_ids * d) return;
    u64 r = ids[i / d];
    u32 c = (u32)(i % d);
    u64 e = r * d + c;
    float v;
    if (dtype == DT_F32) v = ((const float*)table)[e];
    else if (dtype == DT_F16) v = h2f(((const unsigned short*)table)[e]);
    else if (dtype == DT_Q4_1) {
        const u8* blk = table + (e / 32) * 20;
        u32 j = (u32)(e % 32);
        u8 byte = blk[4 + (j & 15)];
        float qv = (float)(j < 16 ? (byte & 0x0f) : (byte >> 4));
        v = qv * h2f(ld_u16(blk)) + h2f(ld_u16(blk + 2));
    } else {
        const u8* blk = table + (e / 32) * 34;
        v = (float)(i8)blk[2 + e % 32] * h2f(ld_u16(blk));
    }
    out[i] = v;
}

// out = a op b[i % bn] (op 0: add, 1: mul).
extern "C" __global__ void binary(const float* a, const float* b, float* out, u32 n, u32 bn,
                                  u32 op) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = a[i], y = b[i % bn];
    out[i] = op == 0 ? x + y : x * y;
}

extern "C" __global__ void silu(const float* x, float* out, u32 n) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    out[i] = v / (1.0f + kexp(-v));
}

// One block per row: sum of squares in f64 (as ggml), scale = 1/sqrt(mean + eps).
extern "C" __global__ void rmsnorm(const float* x, const float* w, float* out, u32 cols,
                                   float eps) {
    __shared__ double sh[32];
    const float* xr = x + (u64)blockIdx.x * cols;
    float* o = out + (u64)blockIdx.x * cols;
    double acc = 0.0;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) acc += (double)xr[c] * (double)xr[c];
    double sum = block_sum_d(acc, sh);
    float mean = (float)(sum / (double)cols);
    float scale = 1.0f / sqrtf(mean + eps);
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) o[c] = (xr[c] * scale) * w[c];
}

// Softmax of `row` in place (cols elements), as cpu::softmax_in_place: f64 sum.
__device__ void softmax_row(float* row, u32 cols, float* shf, double* shd) {
    float mx = -INFINITY;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) mx = fmaxf(mx, row[c]);
    mx = block_max(mx, shf);
    double acc = 0.0;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        float e = kexp(row[c] - mx);
        row[c] = e;
        acc += (double)e;
    }
    double sum = block_sum_d(acc, shd);
    float inv = (float)(1.0 / sum);
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) row[c] *= inv;
    __syncthreads();
}

extern "C" __global__ void softmax(const float* x, float* out, u32 cols) {
    __shared__ float shf[32];
    __shared__ double shd[32];
    const float* xr = x + (u64)blockIdx.x * cols;
    float* o = out + (u64)blockIdx.x * cols;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) o[c] = xr[c];
    __syncthreads();
    softmax_row(o, cols, shf, shd);
}

// One thread per rotated pair. theta_i = p · scale^i by repeated f32
// multiplication, as the CPU backend (and ggml).
extern "C" __global__ void rope(const float* x, float* out, u32 seq, u32 heads, u32 hd, u32 pos,
                                float theta_scale) {
    u32 half_d = hd / 2;
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (u64)seq * heads * half_d) return;
    u32 pi = (u32)(t % half_d);
    u64 sh = t / half_d;
    u32 s = (u32)(sh / heads);
    float th = (float)pos + (float)s;
    for (u32 i = 0; i < pi; i++) th *= theta_scale;
    float c = cosf(th), sn = sinf(th);
    u64 base = sh * hd + 2 * pi;
    float a = x[base], b = x[base + 1];
    out[base] = a * c - b * sn;
    out[base + 1] = a * sn + b * c;
}

// ---------------------------------------------------------------- attention

extern "C" __global__ void kv_append(const float* src, void* cache, u32 f16, u64 start, u32 n) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (f16) ((unsigned short*)cache)[start + i] = f2h(src[i]);
    else ((float*)cache)[start + i] = src[i];
}

__device__ __forceinline__ float cache_at(const void* c, u32 f16, u64 i) {
    return f16 ? h2f(((const unsigned short*)c)[i]) : ((const float*)c)[i];
}

// cpu::dot: eight fused accumulators over chunks of 8, a fixed combine, then
// the remainder unfused.
__device__ float cpu_dot(const float* a, const void* kc, u32 f16, u64 off, u32 n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    u32 full = n / 8 * 8;
    for (u32 c = 0; c < full; c += 8)
        for (int e = 0; e < 8; e++) acc[e] = fmaf(a[c + e], cache_at(kc, f16, off + c + e), acc[e]);
    float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (u32 c = full; c < n; c++) sum += a[c] * cache_at(kc, f16, off + c);
    return sum;
}

// One block per (query row i, head h); scores live in `scratch` [seq*heads, pos+seq].
// q is f16-rounded and so are the probabilities with an f16 cache (llama.cpp).
extern "C" __global__ void attention(const float* q, const void* kc, const void* vc, u32 f16,
                                     float* out, float* scratch, u32 seq, u32 heads, u32 kv_heads,
                                     u32 hd, u32 pos, float scale) {
    DYNAMIC_SHARED(float, qs);
    __shared__ float shf[32];
    __shared__ double shd[32];
    u32 task = blockIdx.x;
    u32 i = task / heads, h = task % heads;
    u32 kvh = h / (heads / kv_heads);
    u32 row = kv_heads * hd;
    u32 total = pos + seq;
    u32 visible = pos + i + 1;
    float* sc = scratch + (u64)task * total;
    for (u32 c = threadIdx.x; c < hd; c += blockDim.x) {
        float v = q[((u64)i * heads + h) * hd + c];
        qs[c] = f16 ? round_f16(v) : v;
    }
    __syncthreads();
    for (u32 t = threadIdx.x; t < visible; t += blockDim.x)
        sc[t] = cpu_dot(qs, kc, f16, (u64)t * row + (u64)kvh * hd, hd) * scale;
    __syncthreads();
    softmax_row(sc, visible, shf, shd);
    if (f16) {
        for (u32 t = threadIdx.x; t < visible; t += blockDim.x) sc[t] = round_f16(sc[t]);
        __syncthreads();
    }
    for (u32 c = threadIdx.x; c < hd; c += blockDim.x) {
        float o = 0.0f;
        for (u32 t = 0; t < visible; t++)
            o = fmaf(sc[t], cache_at(vc, f16, (u64)t * row + (u64)kvh * hd + c), o);
        out[((u64)i * heads + h) * hd + c] = o;
    }
}

// ---------------------------------------------------------------- selection

// f32 bits to a u32 whose unsigned order is f32::total_cmp's order.
__device__ __forceinline__ u32 total_key(float v) {
    u32 b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// One block per row: the first index of the largest value; NaN never wins
// (keyed as -inf), -0 equals +0, all -inf/NaN gives 0: cpu argmax.
extern "C" __global__ void argmax_rows(const float* x, u32* out, u32 cols) {
    __shared__ u64 sh[32];
    const float* xr = x + (u64)blockIdx.x * cols;
    u64 best = 0;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = xr[c];
        if (is_nan(v)) v = -INFINITY;
        if (v == 0.0f) v = 0.0f;
        u64 p = ((u64)total_key(v) << 32) | (u64)(0xffffffffu - c);
        best = p > best ? p : best;
    }
    best = block_max_u64(best, sh);
    if (threadIdx.x == 0) out[blockIdx.x] = 0xffffffffu - (u32)(best & 0xffffffffu);
}

// One block: the k largest non-NaN entries of `row` by (total order desc, index asc),
// k rounds of a max below the previous winner. out_n gets how many were found.
extern "C" __global__ void __launch_bounds__(1024) top_k(const float* row, u32 cols, u32 k, u32* out_idx, float* out_val,
                                 u32* out_n) {
    __shared__ u64 sh[32];
    u64 last = ~0ull;
    u32 found = 0;
    for (u32 r = 0; r < k; r++) {
        u64 best = 0;
        for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
            float v = row[c];
            if (is_nan(v)) continue;
            u64 p = ((u64)total_key(v) << 32) | (u64)(0xffffffffu - c);
            if (p < last && p > best) best = p;
        }
        best = block_max_u64(best, sh);
        if (best == 0) break;
        u32 idx = 0xffffffffu - (u32)(best & 0xffffffffu);
        if (threadIdx.x == 0) {
            out_idx[r] = idx;
            out_val[r] = row[idx];
        }
        last = best;
        found++;
    }
    if (threadIdx.x == 0) *out_n = found;
}
