// A CPU stand-in for the one cuBLAS routine the CUDA backend calls
// (cublasSgemm, column-major, as cuBLAS), built as libcublas.so by
// scripts/build-cuda-emu for the tests only (see driver.cpp). Sums run in
// k order in f32, like the CPU backend's reference matmul; real cuBLAS sums in
// another order, so the parity tests' tolerance for prompt GEMMs stays.
#include <cstddef>
#include <cstdint>

#define API extern "C" __attribute__((visibility("default")))

typedef int cublasStatus_t;
enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7 };
enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };

namespace {
int handle_storage;
}

API cublasStatus_t cublasCreate_v2(void** handle) {
    *handle = &handle_storage;
    return CUBLAS_STATUS_SUCCESS;
}
API cublasStatus_t cublasDestroy_v2(void*) { return CUBLAS_STATUS_SUCCESS; }
API cublasStatus_t cublasSetStream_v2(void*, void*) { return CUBLAS_STATUS_SUCCESS; }

// C[m×n] = alpha · op(A)[m×k] · op(B)[k×n] + beta · C, column-major; C is not
// read when beta is 0 (as cuBLAS: NaN in C does not propagate).
API cublasStatus_t cublasSgemm_v2(void*, int transa, int transb, int m, int n, int k,
                                  const float* alpha, const float* a, int lda, const float* b,
                                  int ldb, const float* beta, float* c, int ldc) {
    if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    int a_rows = transa == CUBLAS_OP_N ? m : k;
    int b_rows = transb == CUBLAS_OP_N ? k : n;
    if (lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) ||
        ldc < (m > 1 ? m : 1))
        return CUBLAS_STATUS_INVALID_VALUE;
    for (int j = 0; j < n; j++) {
        for (int i = 0; i < m; i++) {
            float acc = 0.0f;
            for (int p = 0; p < k; p++) {
                float av = transa == CUBLAS_OP_N ? a[i + (int64_t)p * lda] : a[p + (int64_t)i * lda];
                float bv = transb == CUBLAS_OP_N ? b[p + (int64_t)j * ldb] : b[j + (int64_t)p * ldb];
                acc += av * bv;
            }
            float* out = &c[i + (int64_t)j * ldc];
            *out = *beta == 0.0f ? *alpha * acc : *alpha * acc + *beta * *out;
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}
