/* Fused CPU kernels for the Gradient Concealment Module, float32:
 *
 *   gcm_forward:  out = x + eps * sin(v)            with v = fl32(x * w)
 *   gcm_backward: gin = g + ((g * eps) * cos(v)) * w
 *   gcm_sine:     out = sin(v + quarter * pi/2)     (quarter 0: sine, 1: cosine; for tests)
 *
 * The float32 operations and their order are those of PyTorch's `x + eps * torch.sin(x * w)` and
 * its autograd backward, so only the sine itself is computed differently.  With w = 1e20, v is
 * around 1e19, where a library sine needs a slow multi-word range reduction (Payne-Hanek).  Here
 * the reduction is exact and branch-free: v = m * 2^e with an integer |m| < 2^24, so
 *   v / (2 pi) mod 1 = m * F(e) mod 1,   F(e) = frac(2^e / (2 pi)),
 * and F(e) is tabulated per float32 exponent as three doubles F1 + F2 + F3, the first two with
 * at most 28 significant bits so that m * F1 and m * F2 are exact in double precision.  The
 * reduced angle (in turns, |r| <= 1/2, absolute error ~2^-60) goes through a quadrant split and
 * Taylor polynomials on [-pi/4, pi/4] in double precision; the float32 result is within 0.501
 * ulp of the exact sine for every finite float32 v (checked against a float64 reference in
 * tests/test_gcm_kernel.py).  The table (3 x 256 doubles) is built by gcm_kernel.py.
 *
 * Compile with -ffp-contract=off (the float32 steps must round like PyTorch's) and without
 * -ffast-math (round_nearest relies on IEEE rounding).  The loops vectorise (gathers for the
 * table) under -O3 -march=native.
 */
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <string.h>

#define TABLE_PLANE 256
#define ROUND_MAGIC 6755399441055744.0 /* 1.5 * 2^52: (t + M) - M rounds |t| < 2^51 to nearest */
#define CHUNK_ALIGN 64                 /* elements; keeps the threads' slices vector-aligned */

static inline double round_nearest(double t) { return (t + ROUND_MAGIC) - ROUND_MAGIC; }

/* v / (2 pi) reduced to [-1/2, 1/2] turns; NaN for inf and NaN (their table entries are NaN). */
static inline double reduce_turns(float v, const double *table) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    uint32_t exponent = (bits >> 23) & 0xffu;
    /* the implicit leading bit is absent for zero and subnormals (exponent field 0) */
    int32_t m = (int32_t)((bits & 0x7fffffu) | ((uint32_t)(exponent != 0) << 23));
    double md = (double)m;
    md = (bits >> 31) ? -md : md; /* negating the double keeps sin(-0) = -0 */
    double p1 = md * table[exponent];
    double p2 = md * table[TABLE_PLANE + exponent];
    double p3 = md * table[2 * TABLE_PLANE + exponent];
    double r = (p1 - round_nearest(p1)) + p2;
    r += p3;
    return r - round_nearest(r);
}

/* sin(2 pi r + quarter pi/2) for |r| <= 1/2 */
static inline double sine_of_turns(double r, int64_t quarter) {
    double t = 4.0 * r;
    double q = round_nearest(t);
    double a = (t - q) * 1.5707963267948966; /* |a| <= pi/4 */
    double a2 = a * a;
    double s = a * (1.0 + a2 * (-1.6666666666666666e-01 + a2 * (8.3333333333333332e-03
               + a2 * (-1.9841269841269841e-04 + a2 * (2.7557319223985893e-06
               + a2 * -2.5052108385441720e-08)))));
    double c = 1.0 + a2 * (-0.5 + a2 * (4.1666666666666664e-02 + a2 * (-1.3888888888888889e-03
               + a2 * (2.4801587301587302e-05 + a2 * (-2.7557319223985888e-07
               + a2 * 2.0876756987868100e-09)))));
    int64_t k = (int64_t)q + quarter;
    double value = (k & 1) ? c : s;
    return (k & 2) ? -value : value;
}

/* sin(v + quarter pi/2) rounded to float32 */
static inline float sine_f32(float v, const double *table, int64_t quarter) {
    return (float)sine_of_turns(reduce_turns(v, table), quarter);
}

enum op { OP_FORWARD, OP_BACKWARD, OP_SINE };

struct job {
    enum op op;
    const float *x;
    const float *g;
    float *out;
    int64_t begin, end;
    float w, eps;
    int64_t quarter;
    const double *table;
};

static void run_forward(const struct job *j) {
    const float *x = j->x;
    float *out = j->out;
    const double *table = j->table;
    const float w = j->w, eps = j->eps;
    for (int64_t i = j->begin; i < j->end; i++) {
        float s = sine_f32(x[i] * w, table, 0);
        float e = eps * s;
        out[i] = x[i] + e;
    }
}

static void run_backward(const struct job *j) {
    const float *x = j->x, *g = j->g;
    float *out = j->out;
    const double *table = j->table;
    const float w = j->w, eps = j->eps;
    for (int64_t i = j->begin; i < j->end; i++) {
        float c = sine_f32(x[i] * w, table, 1);
        float t = g[i] * eps;
        t = t * c;
        t = t * w;
        out[i] = g[i] + t;
    }
}

static void run_sine(const struct job *j) {
    const float *v = j->x;
    float *out = j->out;
    const double *table = j->table;
    const int64_t quarter = j->quarter;
    for (int64_t i = j->begin; i < j->end; i++)
        out[i] = sine_f32(v[i], table, quarter);
}

static void run_job(const struct job *j) {
    if (j->op == OP_FORWARD) run_forward(j);
    else if (j->op == OP_BACKWARD) run_backward(j);
    else run_sine(j);
}

/* Split [0, n) into `threads` aligned slices, one per OpenMP thread.  Loaded into a PyTorch
   process, this library binds to the libgomp PyTorch already loaded, so its threads are
   PyTorch's own intra-op threads (a second pool would compete with theirs, which spin for a
   while after each PyTorch operation).  Built without OpenMP, one thread runs every slice. */
static void run_parallel(struct job base, int64_t n, int threads) {
    if (threads < 1) threads = 1;
    int64_t per = (n + threads - 1) / threads;
    per = (per + CHUNK_ALIGN - 1) / CHUNK_ALIGN * CHUNK_ALIGN;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
        struct job slice = base;
#ifdef _OPENMP
        int64_t t = omp_get_thread_num(), workers = omp_get_num_threads();
#else
        int64_t t = 0, workers = 1;
#endif
        /* fewer threads than asked (nested region, limits): each takes every workers-th slice */
        for (int64_t k = t; k < threads; k += workers) {
            slice.begin = k * per;
            slice.end = slice.begin + per < n ? slice.begin + per : n;
            if (slice.begin < slice.end) run_job(&slice);
        }
    }
}

void gcm_forward(const float *x, float *out, int64_t n, float w, float eps, const double *table,
                int threads) {
    struct job j = {OP_FORWARD, x, NULL, out, 0, 0, w, eps, 0, table};
    run_parallel(j, n, threads);
}

void gcm_backward(const float *x, const float *g, float *gin, int64_t n, float w, float eps,
                 const double *table, int threads) {
    struct job j = {OP_BACKWARD, x, g, gin, 0, 0, w, eps, 0, table};
    run_parallel(j, n, threads);
}

void gcm_sine(const float *v, float *out, int64_t n, int64_t quarter, const double *table,
             int threads) {
    struct job j = {OP_SINE, v, NULL, out, 0, 0, 0.0f, 0.0f, quarter, table};
    run_parallel(j, n, threads);
}
