// A CPU emulator of the part of the CUDA driver API the CUDA backend uses,
// built as libcuda.so by scripts/build-cuda-emu for the tests only.
//
// With it first on LD_LIBRARY_PATH, cinfer-cuda runs unchanged: the real
// NVRTC compiles kernels.cu to PTX (cuModuleLoadData checks every kernel is
// in it), and launches run the same kernels.cu compiled here as C++, every
// CUDA thread a fiber, on the host. Device memory is host memory with a
// PROT_NONE page right after each allocation, so a kernel that reads or
// writes past the end of a buffer stops the process with the kernel's name.
// Launch shapes are checked as the driver does (no empty grid, ≤ 1024
// threads per block, grid y/z ≤ 65535, ≤ 48 KiB of shared memory).
//
// What it shows: the kernels' arithmetic, indexing and synchronisation, and
// the Rust side's launch shapes, argument order and buffer sizes, against
// the CPU backend (host/tests/cuda_parity.rs). What it cannot show: anything
// of the hardware (PTX-to-SASS code generation, the memory model between
// blocks, timing, real cuBLAS numerics, pinned-memory behaviour).

#include "cuda_emu.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#define CINFER_CUDA_EMU 1
#include "../src/cuda/kernels.cu"

#define API extern "C" __attribute__((visibility("default")))

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUmodule;
typedef void* CUfunction;

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_LAUNCH_FAILED = 719,
};

// ------------------------------------------------------------------ fibers

#if !defined(__x86_64__)
#error "the CUDA emulator's fiber switch is written for x86-64"
#endif

// Saves the callee-saved registers on the current stack, stores the stack
// pointer in *save, and resumes the fiber whose stack pointer is `next`
// (System V x86-64; no signal mask or FPU state changes hands: one OS
// thread runs every fiber). ucontext's swapcontext makes a system call per
// switch, which made the emulator ten times slower.
extern "C" void cinfer_emu_switch(void** save, void* next);
asm(R"(
    .text
    .p2align 4
    .type cinfer_emu_switch,@function
cinfer_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cinfer_emu_switch, .-cinfer_emu_switch
)");

namespace emu {
uint3 block_idx, block_dim, grid_dim;

namespace {
enum class St { Runnable, WaitBlock, WaitWarp, Done };

struct Fiber {
    void* sp;
    uint3 tid;
    St st;
};

constexpr size_t STACK = 64 * 1024;
constexpr size_t MAX_THREADS = 1024;

std::vector<Fiber> fibers(MAX_THREADS);
char* stacks = nullptr;
void* sched_sp = nullptr;
Fiber* cur = nullptr;
std::function<void()> body;
std::vector<uint64_t> slots(MAX_THREADS);
std::vector<unsigned char> dyn_shared;
bool reverse_order = false;
const char* running_kernel = "";

void yield(St st) {
    cur->st = st;
    cinfer_emu_switch(&cur->sp, sched_sp);
}

// A fiber's first frame: runs the kernel for its thread, then hands back to
// the scheduler for good (the stack is reused by the next block).
[[noreturn]] void entry() {
    body();
    cur->st = St::Done;
    void* dead;
    cinfer_emu_switch(&dead, sched_sp);
    __builtin_unreachable();
}

// A new fiber's stack: six zeroed callee-saved registers, then `entry` as
// the return address of the switch, then a fake return address so that
// `entry` starts with the stack aligned as after a call.
void* fresh_stack(char* base, size_t size) {
    uintptr_t top = (uintptr_t(base) + size) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(&entry);
    for (int i = 0; i < 6; i++) *--sp = nullptr;
    return sp;
}

size_t lane_of(size_t linear) { return linear % 32; }

// Runs one block: every thread to completion, releasing a warp when all its
// threads wait at a warp rendezvous and the block when all its running
// threads wait at __syncthreads. Returns an error message, or "".
std::string run_block(size_t n) {
    for (size_t t = 0; t < n; t++) {
        Fiber& f = fibers[t];
        unsigned bx = block_dim.x, by = block_dim.y;
        f.tid = uint3{unsigned(t % bx), unsigned(t / bx % by), unsigned(t / (bx * by))};
        f.st = St::Runnable;
        f.sp = fresh_stack(stacks + t * STACK, STACK);
    }
    for (;;) {
        for (size_t k = 0; k < n; k++) {
            Fiber& f = fibers[reverse_order ? n - 1 - k : k];
            if (f.st != St::Runnable) continue;
            cur = &f;
            cinfer_emu_switch(&sched_sp, f.sp);
        }
        bool all_done = true, released = false;
        for (size_t w = 0; w < n; w += 32) {
            size_t end = std::min(n, w + 32);
            size_t waiting = 0, done = 0;
            for (size_t t = w; t < end; t++) {
                waiting += fibers[t].st == St::WaitWarp;
                done += fibers[t].st == St::Done;
            }
            if (done != end - w) all_done = false;
            if (waiting == end - w) {
                for (size_t t = w; t < end; t++) fibers[t].st = St::Runnable;
                released = true;
            } else if (waiting > 0 && done > 0) {
                return "a warp rendezvous (__syncwarp or a shuffle) that some lanes of the warp never reach (they returned)";
            }
        }
        if (all_done) return "";
        if (released) continue;
        size_t live = 0, at_barrier = 0;
        for (size_t t = 0; t < n; t++) {
            live += fibers[t].st != St::Done;
            at_barrier += fibers[t].st == St::WaitBlock;
        }
        if (at_barrier == live) {
            for (size_t t = 0; t < n; t++)
                if (fibers[t].st == St::WaitBlock) fibers[t].st = St::Runnable;
            continue;
        }
        return "threads of one block wait at different barriers (__syncthreads in one, a warp rendezvous in another)";
    }
}
}  // namespace

const uint3& thread_idx() { return cur->tid; }
void* dynamic_shared() { return dyn_shared.data(); }
void syncthreads() { yield(St::WaitBlock); }
void syncwarp() { yield(St::WaitWarp); }

uint64_t shfl_xor_bits(uint64_t bits, int lane_mask) {
    size_t me = size_t(cur - fibers.data());
    size_t base = me - lane_of(me);
    slots[me] = bits;
    syncwarp();
    size_t other = base + (lane_of(me) ^ size_t(lane_mask & 31));
    uint64_t r = slots[other];
    syncwarp();
    return r;
}
}  // namespace emu

// ------------------------------------------------------------------ kernels

namespace {
using Launcher = std::function<void(void**)>;

template <typename... A, size_t... I>
void call_kernel(void (*k)(A...), void** p, std::index_sequence<I...>) {
    // The arguments are copied now: params points at the caller's values.
    std::tuple<std::decay_t<A>...> args{*static_cast<std::decay_t<A>*>(p[I])...};
    emu::body = [k, args] { std::apply(k, args); };
}

template <typename... A>
Launcher launcher(void (*k)(A...)) {
    return [k](void** p) { call_kernel(k, p, std::index_sequence_for<A...>{}); };
}

#define KERNEL(name) {#name, launcher(name)}
const std::map<std::string, Launcher> KERNELS = {
    KERNEL(quantize_act), KERNEL(dequant_act), KERNEL(round_f16_f32), KERNEL(gemv_q),
    KERNEL(gemv_qx),
    KERNEL(dequant_tile), KERNEL(embedding), KERNEL(binary), KERNEL(silu),
    KERNEL(rmsnorm), KERNEL(softmax), KERNEL(rope), KERNEL(kv_append),
    KERNEL(attention), KERNEL(argmax_rows), KERNEL(top_k),
};

struct Function {
    std::string name;
    const Launcher* launch;
    int max_dynamic_shared = 48 * 1024;
};
struct Module {
    std::vector<Function*> functions;
    std::string ptx;
};

std::mutex launch_lock;

// ------------------------------------------------------------------ memory

struct Mapping {
    void* base;
    size_t len;
};
std::mutex mem_lock;
std::map<CUdeviceptr, Mapping> allocations;
const size_t PAGE = size_t(sysconf(_SC_PAGESIZE));

CUresult device_alloc(CUdeviceptr* p, size_t bytes) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    size_t body = (bytes + PAGE - 1) / PAGE * PAGE;
    size_t len = body + PAGE;
    void* base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    char* guard = static_cast<char*>(base) + body;
    mprotect(guard, PAGE, PROT_NONE);
    // The buffer ends where the guard page starts.
    CUdeviceptr ptr = CUdeviceptr(guard - bytes);
    std::lock_guard<std::mutex> g(mem_lock);
    allocations[ptr] = Mapping{base, len};
    *p = ptr;
    return CUDA_SUCCESS;
}

CUresult device_free(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(mem_lock);
    auto it = allocations.find(p);
    if (it == allocations.end()) return CUDA_ERROR_INVALID_VALUE;
    munmap(it->second.base, it->second.len);
    allocations.erase(it);
    return CUDA_SUCCESS;
}

struct sigaction previous_segv;
void on_segv(int, siginfo_t* info, void*) {
    char msg[256];
    int n = snprintf(msg, sizeof msg,
                     "cinfer CUDA emulator: kernel %s touched %p outside device memory "
                     "(past the end of a buffer?) in block (%u,%u,%u)\n",
                     emu::running_kernel, info->si_addr, emu::block_idx.x, emu::block_idx.y,
                     emu::block_idx.z);
    if (n > 0) (void)!write(2, msg, size_t(n));
    _exit(134);
}

int dummy_handle;
char device_name[] = "cinfer CPU emulator of CUDA (tests only)";
}  // namespace

// ------------------------------------------------------------------ driver API

API CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
API CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_VALUE;
    *d = 0;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, size_t(len), "%s", device_name);
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 1: *v = 1024; break;                 // max threads per block
        case 2: case 3: *v = 1024; break;         // max block dim x, y
        case 4: *v = 64; break;                   // max block dim z
        case 5: *v = 2147483647; break;           // max grid dim x
        case 6: case 7: *v = 65535; break;        // max grid dim y, z
        case 8: *v = 48 * 1024; break;            // shared memory per block
        case 10: *v = 32; break;                  // warp size
        case 16: *v = 1; break;                   // multiprocessors
        case 75: *v = 9; break;                   // compute capability major
        case 76: *v = 0; break;                   // ... minor
        case 97: *v = 227 * 1024; break;          // max shared memory per block (opt-in)
        default: *v = 0;                          // e.g. memory pools: not supported
    }
    return CUDA_SUCCESS;
}
API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = size_t(16) << 30;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetUuid(char* uuid, CUdevice) {
    memset(uuid, 0xce, 16);
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetUuid_v2(char* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }
API CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
    *c = &dummy_handle;
    return CUDA_SUCCESS;
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
API CUresult cuCtxSetCurrent(CUcontext) { return CUDA_SUCCESS; }
API CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = &dummy_handle;
    return CUDA_SUCCESS;
}
API CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }
API CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = 0;
    return CUDA_SUCCESS;
}

// Streams and events: every call completes before it returns.
API CUresult cuStreamCreate(CUstream* s, unsigned) {
    *s = new int(0);
    return CUDA_SUCCESS;
}
API CUresult cuStreamCreateWithPriority(CUstream* s, unsigned f, int) { return cuStreamCreate(s, f); }
API CUresult cuStreamDestroy_v2(CUstream s) {
    delete static_cast<int*>(s);
    return CUDA_SUCCESS;
}
API CUresult cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
API CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }
API CUresult cuStreamIsCapturing(CUstream, int* status) {
    *status = 0;
    return CUDA_SUCCESS;
}
API CUresult cuEventCreate(CUevent* e, unsigned) {
    *e = new int(0);
    return CUDA_SUCCESS;
}
API CUresult cuEventDestroy_v2(CUevent e) {
    delete static_cast<int*>(e);
    return CUDA_SUCCESS;
}
API CUresult cuEventRecord(CUevent, CUstream) { return CUDA_SUCCESS; }
API CUresult cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }
API CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }
API CUresult cuEventElapsedTime(float* ms, CUevent, CUevent) {
    *ms = 0.0f;
    return CUDA_SUCCESS;
}
API CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) {
    return cuEventElapsedTime(ms, a, b);
}
API CUresult cuLaunchHostFunc(CUstream, void (*fn)(void*), void* data) {
    fn(data);
    return CUDA_SUCCESS;
}

API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return device_alloc(p, bytes); }
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return device_alloc(p, bytes); }
API CUresult cuMemFree_v2(CUdeviceptr p) { return device_free(p); }
API CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return device_free(p); }
API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    *free_bytes = size_t(8) << 30;
    *total = size_t(16) << 30;
    return CUDA_SUCCESS;
}
API CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    *p = malloc(bytes ? bytes : 1);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
API CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
API CUresult cuMemFreeHost(void* p) {
    free(p);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    memcpy(reinterpret_cast<void*>(dst), src, n);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream) {
    return cuMemcpyHtoD_v2(dst, src, n);
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    memcpy(dst, reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream) {
    return cuMemcpyDtoH_v2(dst, src, n);
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream) {
    return cuMemcpyDtoD_v2(dst, src, n);
}
API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    memset(reinterpret_cast<void*>(dst), v, n);
    return CUDA_SUCCESS;
}
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream) {
    return cuMemsetD8_v2(dst, v, n);
}

API CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    if (!image) return CUDA_ERROR_INVALID_VALUE;
    const char* text = static_cast<const char*>(image);
    if (!strstr(text, ".version") || !strstr(text, ".target")) return CUDA_ERROR_INVALID_IMAGE;
    *m = new Module{{}, std::string(text)};
    return CUDA_SUCCESS;
}
API CUresult cuModuleUnload(CUmodule m) {
    Module* mod = static_cast<Module*>(m);
    for (Function* f : mod->functions) delete f;
    delete mod;
    return CUDA_SUCCESS;
}
API CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    Module* mod = static_cast<Module*>(m);
    auto k = KERNELS.find(name);
    // The kernel must be in the PTX NVRTC made, and in the emulator.
    std::string entry = std::string(".entry ") + name + "(";
    if (k == KERNELS.end() || mod->ptx.find(entry) == std::string::npos) return CUDA_ERROR_NOT_FOUND;
    Function* fn = new Function{name, &k->second};
    mod->functions.push_back(fn);
    *f = fn;
    return CUDA_SUCCESS;
}
API CUresult cuFuncGetAttribute(int* v, int attr, CUfunction f) {
    Function* fn = static_cast<Function*>(f);
    switch (attr) {
        case 0: *v = 1024; break;  // max threads per block
        case 8: *v = fn->max_dynamic_shared; break;
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
API CUresult cuFuncSetAttribute(CUfunction f, int attr, int v) {
    if (attr == 8) static_cast<Function*>(f)->max_dynamic_shared = v;
    return CUDA_SUCCESS;
}

API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                            unsigned by, unsigned bz, unsigned shared, CUstream, void** params,
                            void** extra) {
    Function* fn = static_cast<Function*>(f);
    if (!fn || extra || !params) return CUDA_ERROR_INVALID_VALUE;
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0) {
        fprintf(stderr, "cinfer CUDA emulator: %s launched with an empty grid or block\n", fn->name.c_str());
        return CUDA_ERROR_INVALID_VALUE;
    }
    size_t threads = size_t(bx) * by * bz;
    if (threads > emu::MAX_THREADS || bz > 64 || gy > 65535 || gz > 65535 ||
        shared > unsigned(fn->max_dynamic_shared)) {
        fprintf(stderr, "cinfer CUDA emulator: %s: launch shape beyond the device's limits\n",
                fn->name.c_str());
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::lock_guard<std::mutex> g(launch_lock);
    if (!emu::stacks) {
        void* s = mmap(nullptr, emu::MAX_THREADS * emu::STACK, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (s == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
        emu::stacks = static_cast<char*>(s);
        const char* order = getenv("CINFER_CUDA_EMU_ORDER");
        emu::reverse_order = order && strcmp(order, "reverse") == 0;
    }
    (*fn->launch)(params);
    emu::grid_dim = uint3{gx, gy, gz};
    emu::block_dim = uint3{bx, by, bz};
    emu::dyn_shared.assign(shared ? shared : 1, 0xa5);
    emu::running_kernel = fn->name.c_str();
    struct sigaction sa {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, &previous_segv);
    std::string err;
    for (unsigned z = 0; z < gz && err.empty(); z++)
        for (unsigned y = 0; y < gy && err.empty(); y++)
            for (unsigned x = 0; x < gx && err.empty(); x++) {
                emu::block_idx = uint3{x, y, z};
                err = emu::run_block(threads);
            }
    sigaction(SIGSEGV, &previous_segv, nullptr);
    emu::body = nullptr;
    if (!err.empty()) {
        fprintf(stderr, "cinfer CUDA emulator: kernel %s, block (%u,%u,%u): %s\n", fn->name.c_str(),
                emu::block_idx.x, emu::block_idx.y, emu::block_idx.z, err.c_str());
        return CUDA_ERROR_LAUNCH_FAILED;
    }
    return CUDA_SUCCESS;
}

API CUresult cuGetErrorName(CUresult e, const char** s) {
    static const std::map<int, const char*> names = {
        {0, "CUDA_SUCCESS"},         {1, "CUDA_ERROR_INVALID_VALUE"},
        {2, "CUDA_ERROR_OUT_OF_MEMORY"}, {200, "CUDA_ERROR_INVALID_IMAGE"},
        {400, "CUDA_ERROR_INVALID_HANDLE"}, {500, "CUDA_ERROR_NOT_FOUND"},
        {719, "CUDA_ERROR_LAUNCH_FAILED"},
    };
    auto it = names.find(e);
    *s = it == names.end() ? "CUDA_ERROR_UNKNOWN" : it->second;
    return CUDA_SUCCESS;
}
API CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }
