// What kernels.cu needs from CUDA C++, for compiling it as ordinary C++ on
// the CPU (the test emulator in this folder; never part of the loader).
//
// Every CUDA thread of a block is a fiber (its own stack) on one OS thread:
// threads run one at a time between synchronisation points, so
// __syncthreads, __syncwarp and warp shuffles are real rendezvous, and a
// thread that skips one the others reach is reported as a divergence.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#undef INFINITY  // kernels.cu defines its own

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time (launches are serialised), so a function-scope
// static is exactly one block's shared memory.
#define __shared__ static

struct uint3 {
    unsigned int x, y, z;
};

namespace emu {
// The running thread's index, and the launch's block index and shapes.
const uint3& thread_idx();
extern uint3 block_idx, block_dim, grid_dim;
void* dynamic_shared();
void syncthreads();
void syncwarp();
// Lane exchange through the warp's slots (two rendezvous).
uint64_t shfl_xor_bits(uint64_t bits, int lane_mask);
}  // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 64 bits");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = emu::shfl_xor_bits(bits, lane_mask);
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}

// IEEE binary16 conversions (round to nearest even), as PTX cvt.f32.f16 and
// cvt.rn.f16.f32.
inline float h2f(unsigned short b) {
    _Float16 h;
    std::memcpy(&h, &b, 2);
    return (float)h;
}
inline unsigned short f2h(float x) {
    _Float16 h = (_Float16)x;
    unsigned short b;
    std::memcpy(&b, &h, 2);
    return b;
}

#define DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(emu::dynamic_shared())
