/* y = x @ w.T (+ bias) for a few rows of x: the linear layers of a decode step on a CPU, fp32 or bf16 weights.
 *
 * w is (N, K) fp32 or bf16, x is (B, K) fp32, y is (B, N) fp32, all row-major; K is a multiple of 16.  With B <= 64
 * rows the product is bound by reading w, which a general GEMM streams at a fraction of the memory bandwidth; here
 * each thread streams its share of w's rows once, R rows at a time, against C rows of x held in registers.  bf16
 * weights are widened to fp32 as they are loaded (exactly: a bf16 is the top half of an fp32), so they are read in
 * half the bytes and computed like fp32 ones.
 *
 * Every output is one dot product computed by one thread in one fixed order: 16 lanes of fused multiply-adds over
 * k (lane i sums k = i, i + 16, ...), then the lanes summed as (0-7 + 8-15), (0-3 + 4-7), (0 + 2) + (1 + 3).  The
 * AVX-512 path (16-lane registers) and the AVX2 path (each 16-lane sum held as two 8-lane halves) run exactly that
 * arithmetic, so both give the same bits, whatever the number of threads and the blocking.  One build holds both
 * (each compiled for its own instruction set); skinny_gemm() runs the one this CPU supports, and skinny_gemm_isa()
 * says which (0: neither, and skinny_gemm() does nothing: the caller keeps torch's matmul).
 */
#include <stdint.h>

#if !defined(__x86_64__)
#error "x86-64 only: its paths are AVX-512 and AVX2"
#endif

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

/* a weight's element type, and 16 (AVX-512) or 8 (AVX2) of its values as fp32 lanes */
#define TYPE_f32 float
#define TYPE_bf16 uint16_t
#define LOAD16_f32(p) (*(const v16 *)(p))
#define LOAD16_bf16(p) ((v16)(__builtin_convertvector(*(const u16x16 *)(p), u32x16) << 16))
#define LOAD8_f32(p) (*(const v8u *)(p))
#define LOAD8_bf16(p) ((v8)(__builtin_convertvector(*(const u16x8 *)(p), u32x8) << 16))

static inline __attribute__((always_inline)) float sum8(v8 h) {
    v4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* AVX-512: 32 vector registers of 16 lanes; blocks of 3 rows of w x 8 rows of x in accumulators */
#define AVX512 __attribute__((target("avx512f,fma")))
#define DEFINE_BLOCK_512(NAME, WT, RR, CC)                                                                         \
    static inline AVX512 __attribute__((always_inline)) void NAME(                                                 \
        const TYPE_##WT *restrict w, const float *restrict x, float *restrict y, const float *restrict bias,       \
        int64_t n0, int64_t b0, int64_t K, int64_t N, int prefetch) {                                              \
        v16 acc[RR][CC];                                                                                           \
        _Pragma("GCC unroll 8") for (int r = 0; r < RR; r++)                                                      \
            _Pragma("GCC unroll 8") for (int c = 0; c < CC; c++) acc[r][c] = (v16){0};                            \
        for (int64_t k = 0; k < K; k += 16) {                                                                      \
            v16 wv[RR];                                                                                            \
            _Pragma("GCC unroll 8") for (int r = 0; r < RR; r++) {                                                \
                wv[r] = LOAD16_##WT(w + (n0 + r) * K + k);                                                         \
                if (prefetch) __builtin_prefetch(w + (n0 + r) * K + k + RR * K, 0, 3);                             \
            }                                                                                                      \
            _Pragma("GCC unroll 8") for (int c = 0; c < CC; c++) {                                                \
                v16 xv = *(const v16 *)(x + (b0 + c) * K + k);                                                     \
                _Pragma("GCC unroll 8") for (int r = 0; r < RR; r++) acc[r][c] += wv[r] * xv;                     \
            }                                                                                                      \
        }                                                                                                          \
        for (int c = 0; c < CC; c++)                                                                               \
            for (int r = 0; r < RR; r++) {                                                                         \
                v16 a = acc[r][c];                                                                                 \
                float s = sum8(__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +                             \
                               __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15));                      \
                y[(b0 + c) * N + n0 + r] = bias ? s + bias[n0 + r] : s;                                            \
            }                                                                                                      \
    }

/* AVX2: 16 vector registers of 8 lanes; each 16-lane sum held as two halves, the low half (lanes 0-7) run over all
 * the block's rows before the high one, so that a block needs 2 R C accumulators, R weights and one row of x */
#define AVX2 __attribute__((target("avx2,fma")))
#define DEFINE_BLOCK_256(NAME, WT, RR, CC)                                                                         \
    static inline AVX2 __attribute__((always_inline)) void NAME(                                                   \
        const TYPE_##WT *restrict w, const float *restrict x, float *restrict y, const float *restrict bias,       \
        int64_t n0, int64_t b0, int64_t K, int64_t N, int prefetch) {                                              \
        v8 acc[2][RR][CC];                                                                                         \
        _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++)                                                       \
            _Pragma("GCC unroll 8") for (int r = 0; r < RR; r++)                                                  \
                _Pragma("GCC unroll 8") for (int c = 0; c < CC; c++) acc[h][r][c] = (v8){0};                      \
        for (int64_t k = 0; k < K; k += 16) {                                                                      \
            if (prefetch)                                                                                          \
                _Pragma("GCC unroll 8") for (int r = 0; r < RR; r++)                                              \
                    __builtin_prefetch(w + (n0 + r) * K + k + RR * K, 0, 3);                                       \
            _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {                                                 \
                v8 wv[RR];                                                                                         \
                _Pragma("GCC unroll 8") for (int r = 0; r < RR; r++) wv[r] = LOAD8_##WT(w + (n0 + r) * K + k + 8 * h); \
                _Pragma("GCC unroll 8") for (int c = 0; c < CC; c++) {                                            \
                    v8 xv = *(const v8u *)(x + (b0 + c) * K + k + 8 * h);                                          \
                    _Pragma("GCC unroll 8") for (int r = 0; r < RR; r++) acc[h][r][c] += wv[r] * xv;              \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        for (int c = 0; c < CC; c++)                                                                               \
            for (int r = 0; r < RR; r++) {                                                                         \
                float s = sum8(acc[0][r][c] + acc[1][r][c]);                                                       \
                y[(b0 + c) * N + n0 + r] = bias ? s + bias[n0 + r] : s;                                            \
            }                                                                                                      \
    }

/* One block of R rows of w (or, for the last index, the N % R rows left) against every row of x: blocks R x C,
 * R x 1 for the rows of x left over, 1 x C and 1 x 1 for the rows of w left over. */
#define DEFINE_PATH(ISA, BLOCK, TARGET, WT, R, C)                                                                      \
    DEFINE_BLOCK_##BLOCK(block_rc_##ISA##_##WT, WT, R, C)                                                            \
    DEFINE_BLOCK_##BLOCK(block_r1_##ISA##_##WT, WT, R, 1)                                                            \
    DEFINE_BLOCK_##BLOCK(block_1c_##ISA##_##WT, WT, 1, C)                                                            \
    DEFINE_BLOCK_##BLOCK(block_11_##ISA##_##WT, WT, 1, 1)                                                            \
    static inline TARGET __attribute__((always_inline)) void rows_of_w_##ISA##_##WT(                               \
        const TYPE_##WT *w, const float *x, float *y, const float *bias, int64_t B, int64_t N, int64_t K,          \
        int64_t i) {                                                                                               \
        int64_t n0 = i * R, b0 = 0;                                                                                \
        if (n0 + R <= N) {                                                                                         \
            for (; b0 + C <= B; b0 += C) block_rc_##ISA##_##WT(w, x, y, bias, n0, b0, K, N, b0 == 0);              \
            for (; b0 < B; b0++) block_r1_##ISA##_##WT(w, x, y, bias, n0, b0, K, N, b0 == 0);                      \
            return;                                                                                                \
        }                                                                                                          \
        for (int64_t n = n0; n < N; n++) {                                                                         \
            for (b0 = 0; b0 + C <= B; b0 += C) block_1c_##ISA##_##WT(w, x, y, bias, n, b0, K, N, 0);               \
            for (; b0 < B; b0++) block_11_##ISA##_##WT(w, x, y, bias, n, b0, K, N, 0);                             \
        }                                                                                                          \
    }                                                                                                              \
    static TARGET void gemm_##ISA##_##WT(const TYPE_##WT *w, const float *x, float *y, const float *bias,          \
                                         int64_t B, int64_t N, int64_t K, int threads) {                           \
        int64_t blocks = (N + R - 1) / R;                                                                          \
        if (threads <= 1) {                                                                                        \
            for (int64_t i = 0; i < blocks; i++) rows_of_w_##ISA##_##WT(w, x, y, bias, B, N, K, i);                \
            return;                                                                                                \
        }                                                                                                          \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                          \
        for (int64_t i = 0; i < blocks; i++) rows_of_w_##ISA##_##WT(w, x, y, bias, B, N, K, i);                    \
    }

DEFINE_PATH(512, 512, AVX512, f32, 3, 8)
DEFINE_PATH(512, 512, AVX512, bf16, 3, 8)

/* AVX2 holds a third of AVX-512's register bytes, so one block shape cannot serve every batch: up to 8 rows of x,
 * blocks of 1 row of w x 8 rows of x (each weight read once, x from L1); above, 4 x 1 (x, which no longer fits
 * L1, read once per 4 weight rows).  Measured on a 2-core Zen 3 over the model's layer shapes (bench/README.md,
 * kernel_blocks.py): 1.3x the former 2 x 2 blocks at 8 rows, 1.2-1.3x at 16-64.  Every block runs the same
 * arithmetic per output. */
DEFINE_PATH(256n, 256, AVX2, f32, 1, 8)
DEFINE_PATH(256w, 256, AVX2, f32, 4, 1)
DEFINE_PATH(256n, 256, AVX2, bf16, 1, 8)
DEFINE_PATH(256w, 256, AVX2, bf16, 4, 1)
#define DEFINE_AVX2(WT)                                                                                            \
    static AVX2 void gemm_256_##WT(const TYPE_##WT *w, const float *x, float *y, const float *bias, int64_t B,     \
                                   int64_t N, int64_t K, int threads) {                                            \
        if (B <= 8) gemm_256n_##WT(w, x, y, bias, B, N, K, threads);                                               \
        else gemm_256w_##WT(w, x, y, bias, B, N, K, threads);                                                      \
    }
DEFINE_AVX2(f32)
DEFINE_AVX2(bf16)

int skinny_gemm_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 256;
    return 0;
}

/* The entry points: fp32 and bf16 weights, on this CPU's path; with the suffix _avx2, the AVX2 path whatever the
 * CPU (a test compares its bits with the AVX-512 path's). */
#define DEFINE_ENTRY(NAME, WT)                                                                                     \
    void NAME(const TYPE_##WT *w, const float *x, float *y, const float *bias, int64_t B, int64_t N, int64_t K,    \
              int threads) {                                                                                       \
        static int isa = -1;                                                                                       \
        if (isa < 0) isa = skinny_gemm_isa();                                                                      \
        if (isa == 512) gemm_512_##WT(w, x, y, bias, B, N, K, threads);                                            \
        else if (isa == 256) gemm_256_##WT(w, x, y, bias, B, N, K, threads);                                       \
    }                                                                                                              \
    void NAME##_avx2(const TYPE_##WT *w, const float *x, float *y, const float *bias, int64_t B, int64_t N,        \
                     int64_t K, int threads) {                                                                     \
        if (skinny_gemm_isa() != 0) gemm_256_##WT(w, x, y, bias, B, N, K, threads);                                \
    }

DEFINE_ENTRY(skinny_gemm, f32)
DEFINE_ENTRY(skinny_gemm_bf16, bf16)
