/* The CPU path's negatives' pass in one loop: focal_triton.cpu._negatives (built by pip when a C compiler is
 * there; focal_triton/cpu/native.py loads it and falls back to the torch form of cpu/math.py without it).
 *
 * Every element x of a range is taken as a negative (t = 0, alpha_t = c0 applied by the caller, BCE target ts):
 *
 *     e = exp(-|x|),  r = 1 / (1 + e),  p = x >= 0 ? r : e r,  q = x >= 0 ? e r : r,  L = log(1 + e) = e r P(e)
 *     bce = L + max(x, 0) - ts x,  m = p**gamma
 *     loss = m bce,   grad = k m (p - ts + gamma q bce)        (k: the caller's factor, c0 times the image's scale)
 *
 * in float32: the kernels' degree-7 P(e) for log(1 + e) (1 + e) / e (kernels/math.py), exp by Cody and Waite's
 * reduction with a degree-6 polynomial of 2**f and an exact power of two, an IEEE division for r. Integer gamma up
 * to 4 by multiplication; any other gamma as m = 2**(gamma log2 p), log2 p = -(L + max(-x, 0)) log2 e in double
 * (no cancellation). Elements listed in a task's sorted skip offsets (positives, ignored anchors: fixed up
 * by the caller) add nothing and get a zero gradient. Each task's loss sum is accumulated in double and written to
 * its slot: repeatable whatever the number of threads. A non-finite logit (inf, NaN) makes its task's sum
 * non-finite; the caller then takes the general form.
 *
 * Logits float32 or bfloat16; the gradient in the logits' dtype (bfloat16: rounded to nearest even).
 * Threads: the tasks are taken in turn by `threads` POSIX threads (the caller's one among them), with the GIL
 * released. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int64_t x;      /* address of the range's storage element 0 (float32 or bfloat16) */
    int64_t grad;   /* address of the gradient's element 0 (same dtype and indexing), 0: no gradient */
    int64_t start;  /* the range [start, end) in elements */
    int64_t end;
    int64_t skip;   /* address of sorted int64 element indices in [start, end) to skip, or 0 */
    int64_t nskip;
} task_t;

typedef struct {
    const task_t *tasks;
    const double *factors;  /* per task: k of the gradient */
    double *sums;           /* per task: the sum of m bce over the elements not skipped */
    int64_t ntasks;
    int bf16;
    int int_gamma;          /* 0..4, or -1: gamma as given */
    float gamma;
    float ts;
    int64_t next;           /* the next task to take (atomic) */
} job_t;

#define LOG2E 1.4426950408889634f

/* P(e) ~ log(1 + e) (1 + e) / e on [0, 1] (kernels/math.py's _P0.._P7). */
static inline __attribute__((always_inline)) float log1p_poly(float e) {
    float p = 0.0017386733088642359f * e - 0.009295516647398472f;
    p = p * e + 0.02446727082133293f;
    p = p * e - 0.04662107303738594f;
    p = p * e + 0.08259351551532745f;
    p = p * e - 0.1665850430727005f;
    p = p * e + 0.499996542930603f;
    return p * e + 1.0f;
}

static inline __attribute__((always_inline)) float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* 2**(n + f) for an integer n in [-200, 0] and f in [-1/2, 1/2]: a degree-6 fit of 2**f (relative error 2e-9
 * before rounding), times 2**(n/2) 2**(n - n/2) (both normal: gradual underflow below 2**-126, 0 below ~2**-150). */
static inline __attribute__((always_inline)) float exp2_parts(float n, float f) {
    float p = 0.0001534581242594868f * f + 0.0013399930903688073f;
    p = p * f + 0.009618489071726799f;
    p = p * f + 0.05550328642129898f;
    p = p * f + 0.24022646248340607f;
    p = p * f + 0.6931471824645996f;
    p = p * f + 1.0f;
    int32_t i = (int32_t)n;
    uint32_t i1 = (uint32_t)(i / 2 + 127), i2 = (uint32_t)(i - i / 2 + 127);
    return p * bits_to_float(i1 << 23) * bits_to_float(i2 << 23);
}

/* exp(-a) for a >= 0 (NaN stays NaN): n = round(-a log2 e), r = -a - n ln 2 (Cody and Waite: ln 2 in two parts,
 * n ln2_hi exact), exp(-a) = 2**n 2**(r log2 e). Relative error ~2 float32 ulps for every a (the product a log2 e
 * alone would lose |a log2 e| / 2**24 absolute in the exponent). */
static inline __attribute__((always_inline)) float exp_neg(float a) {
    a = a > 138.0f ? 138.0f : a;                         /* exp(-138) ~ 2**-199: 0 after rounding */
    float n = (-a * LOG2E + 12582912.0f) - 12582912.0f; /* round to nearest (1.5 * 2**23) */
    float r = (-a - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    return exp2_parts(n, r * LOG2E);
}

/* 2**y for a double y <= 0. */
static inline __attribute__((always_inline)) float exp2_neg_d(double y) {
    y = y < -200.0 ? -200.0 : y;
    double n = (y + 6755399441055744.0) - 6755399441055744.0; /* 1.5 * 2**52 */
    return exp2_parts((float)n, (float)(y - n));
}

static inline __attribute__((always_inline)) float load(const void *x, int64_t i, const int bf16) {
    if (bf16) {
        uint32_t u = ((const uint16_t *)x)[i];
        return bits_to_float(u << 16);
    }
    return ((const float *)x)[i];
}

static inline __attribute__((always_inline)) void store(void *g, int64_t i, float v, const int bf16) {
    if (bf16) {
        uint32_t u;
        memcpy(&u, &v, sizeof u);
        u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even (a NaN never reaches here: its task falls back) */
        ((uint16_t *)g)[i] = (uint16_t)(u >> 16);
    } else {
        ((float *)g)[i] = v;
    }
}

/* The loss sum of elements [a, b) and, with GRAD, their gradient. G: the integer gamma, or -1. */
static inline __attribute__((always_inline)) double run(const void *x, void *g, int64_t a, int64_t b, float k,
                                                        float gamma, float ts, const int G, const int GRAD,
                                                        const int TS, const int bf16) {
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = a; i < b; i++) {
        float v = load(x, i, bf16);
        float av = v < 0.0f ? -v : v; /* NaN stays NaN */
        float e = exp_neg(av);
        float r = 1.0f / (1.0f + e);
        float er = e * r;
        int nonneg = v >= 0.0f;
        float p = nonneg ? r : er;
        float q = nonneg ? er : r;
        float L = er * log1p_poly(e);
        float bce = L + (nonneg ? v : 0.0f);
        if (TS)
            bce -= ts * v; /* (without smoothing no linear term: x = -inf gives 0, not 0 * inf) */
        float m;
        if (G == 0) {
            m = 1.0f;
        } else if (G == 1) {
            m = p;
        } else if (G == 2) {
            m = p * p;
        } else if (G == 3) {
            m = p * p * p;
        } else if (G == 4) {
            float p2 = p * p;
            m = p2 * p2;
        } else { /* log2 p = -(L + max(-x, 0)) log2 e */
            m = exp2_neg_d(-(double)gamma * 1.4426950408889634 * ((double)L + (double)(nonneg ? 0.0f : -v)));
        }
        acc += (double)(m * bce);
        if (GRAD) {
            float d = G == 0 ? p : p + gamma * q * bce;
            if (TS)
                d -= ts;
            store(g, i, k * m * d, bf16);
        }
    }
    return acc;
}

/* One copy of the dispatch and its loops per instruction set, chosen at load time (GCC on x86-64). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define CLONES
#endif

/* Dispatch on (G, GRAD, TS, dtype) to a specialized copy of `run`. */
CLONES static double run_any(const void *x, void *g, int64_t a, int64_t b, float k, float gamma, float ts, int G,
                             int bf16) {
#define RUN(GV, GRAD, TS, BF16) run(x, g, a, b, k, gamma, ts, GV, GRAD, TS, BF16)
#define BY_DTYPE(GV, GRAD, TS) (bf16 ? RUN(GV, GRAD, TS, 1) : RUN(GV, GRAD, TS, 0))
#define CASE(GV)                                                                                  \
    if (G == GV) {                                                                              \
        if (ts != 0.0f)                                                                         \
            return g ? BY_DTYPE(GV, 1, 1) : BY_DTYPE(GV, 0, 1);                                 \
        return g ? BY_DTYPE(GV, 1, 0) : BY_DTYPE(GV, 0, 0);                                     \
    }
    CASE(0) CASE(1) CASE(2) CASE(3) CASE(4) CASE(-1)
#undef CASE
#undef BY_DTYPE
#undef RUN
    return 0.0;
}

static void run_task(const job_t *job, int64_t t) {
    const task_t *task = &job->tasks[t];
    const void *x = (const void *)(intptr_t)task->x;
    void *g = (void *)(intptr_t)task->grad;
    const int64_t *skip = (const int64_t *)(intptr_t)task->skip;
    float k = (float)job->factors[t];
    int bf16 = job->bf16;
    double sum = 0.0;
    int64_t a = task->start;
    for (int64_t j = 0; j <= task->nskip; j++) {
        int64_t b = j < task->nskip ? skip[j] : task->end;
        if (b < a || b > task->end) /* not sorted or outside the range: a caller's bug, never written */
            continue;
        if (b > a)
            sum += run_any(x, g, a, b, k, job->gamma, job->ts, job->int_gamma, bf16);
        if (j < task->nskip) {
            if (g && b < task->end)
                store(g, b, 0.0f, bf16);
            a = b + 1;
        }
    }
    job->sums[t] = sum;
}

static void *worker(void *arg) {
    job_t *job = (job_t *)arg;
    for (;;) {
        int64_t t = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (t >= job->ntasks)
            break;
        run_task(job, t);
    }
    return NULL;
}

#define MAX_THREADS 256

/* negatives(tasks, factors, sums, ntasks, bf16, int_gamma, gamma, ts, threads): tasks the address of ntasks
 * rows of 6 int64 (task_t), factors / sums of ntasks doubles. */
static PyObject *negatives(PyObject *self, PyObject *args) {
    long long tasks, factors, sums, ntasks;
    int bf16, int_gamma, threads;
    double gamma, ts;
    if (!PyArg_ParseTuple(args, "LLLLiiddi", &tasks, &factors, &sums, &ntasks, &bf16, &int_gamma, &gamma, &ts,
                          &threads))
        return NULL;
    if (int_gamma < -1 || int_gamma > 4) {
        PyErr_SetString(PyExc_ValueError, "int_gamma must be in -1..4");
        return NULL;
    }
    job_t job = {(const task_t *)(intptr_t)tasks, (const double *)(intptr_t)factors, (double *)(intptr_t)sums,
                 ntasks, bf16, int_gamma, (float)gamma, (float)ts, 0};
    if (threads < 1)
        threads = 1;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads > ntasks)
        threads = ntasks > 0 ? (int)ntasks : 1;
    pthread_t ids[MAX_THREADS];
    int started = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int i = 1; i < threads; i++) {
        if (pthread_create(&ids[started], NULL, worker, &job) == 0)
            started++;
    }
    worker(&job);
    for (int i = 0; i < started; i++)
        pthread_join(ids[i], NULL);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"negatives", negatives, METH_VARARGS, "The negatives' pass over a table of tasks (see negatives.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_negatives", NULL, -1, methods};

PyMODINIT_FUNC PyInit__negatives(void) { return PyModule_Create(&module); }
