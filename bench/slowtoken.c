/*
 * slowtoken: a PKCS#11 module that behaves like a smart-card HSM (Nitrokey HSM 2 class)
 * in front of SoftHSM2, for tests and benchmarks.
 *
 * A smart card runs one command at a time for every application and process that
 * talks to its reader, and an ECDSA or RSA signature takes a sizeable fraction of a
 * second. SoftHSM signs thousands per second on every core at once, so a responder
 * measured on it never meets the limits a real token imposes. This module forwards
 * every call to the real module (dlopen) and
 *
 *   - serialises every call across all threads (a mutex) and all processes (an
 *     exclusive flock on one lock file), as a card reader does;
 *   - sleeps, while holding that lock, SLOWTOKEN_SIGN_MS per signature (C_Sign or
 *     C_SignFinal that returns one, not the length query), SLOWTOKEN_LOGIN_MS per
 *     C_Login and SLOWTOKEN_CALL_MS per any other call (the APDU round trips).
 *
 * Environment (read at C_GetFunctionList, i.e. when the module is loaded):
 *   SLOWTOKEN_MODULE     the real module (default: SoftHSM2's usual paths)
 *   SLOWTOKEN_LOCK       lock file shared by every process (default
 *                        /tmp/slowtoken-<uid>.lock)
 *   SLOWTOKEN_SIGN_MS, SLOWTOKEN_LOGIN_MS, SLOWTOKEN_CALL_MS   latencies (default 0)
 *   SLOWTOKEN_TRACE      if set, a file to which every call appends one line
 *                        "<pid> <function index> <start ns> <end ns>" (CLOCK_MONOTONIC,
 *                        taken inside the lock): tests check from it that no two
 *                        calls ever overlapped.
 *   SLOWTOKEN_TRACE_DATA if "1", a signature's line also carries the signed data in
 *                        hex (with an RSA key that is the tbsResponseData itself), so a
 *                        test can tell which responses the token signed, in which order.
 *
 * How the calls are forwarded: every PKCS#11 v2.40 function takes at most eight
 * arguments, each an integer (CK_ULONG, a handle, a flag word) or a pointer, and
 * returns CK_RV (an unsigned long). So one wrapper per slot of CK_FUNCTION_LIST
 * takes eight machine words and passes them on; a callee reads only the arguments
 * it declares. That holds for the LP64 calling conventions this runs on (x86-64
 * System V: the first six in registers, the rest on the caller's stack, which is
 * always readable; aarch64: all eight in registers). It avoids depending on a
 * pkcs11.h being installed. Built by bench/slowtoken.py with the system compiler.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

typedef unsigned long U; /* CK_ULONG, CK_RV and every pointer: one machine word */
typedef U (*fn8)(U, U, U, U, U, U, U, U);

#define NFUNCS 68            /* CK_FUNCTION_LIST of PKCS#11 v2.40 */
#define IDX_GETFUNCTIONLIST 3
#define IDX_LOGIN 18
#define IDX_SIGN 43          /* C_Sign(hSession, pData, ulDataLen, pSignature, pulSignatureLen) */
#define IDX_SIGNFINAL 45     /* C_SignFinal(hSession, pSignature, pulSignatureLen) */
#define IDX_WAITFORSLOTEVENT 67

#define CKR_OK 0UL
#define CKR_GENERAL_ERROR 5UL
#define CKR_ARGUMENTS_BAD 7UL

struct version { unsigned char major, minor; };
struct function_list {
    struct version version;
    void *fn[NFUNCS];
};

static struct function_list *real;
static struct function_list ours;
static pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t setup = PTHREAD_MUTEX_INITIALIZER;
static int lock_fd = -1;
static pid_t lock_pid;
static char lock_path[4096];
static char trace_path[4096];
static long sign_ms, login_ms, call_ms;
static int trace_data;

static long env_ms(const char *name) {
    const char *v = getenv(name);
    return v && *v ? strtol(v, NULL, 10) : 0;
}

static void sleep_ms(long ms) {
    if (ms <= 0) return;
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* The process-wide lock file, reopened in a forked child (an flock belongs to the
 * open file description, which a fork would share with the parent). */
static int lock_file(void) {
    if (lock_fd >= 0 && lock_pid == getpid()) return lock_fd;
    if (lock_fd >= 0) close(lock_fd);
    lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    lock_pid = getpid();
    return lock_fd;
}

static void trace(int index, uint64_t start, uint64_t end, const unsigned char *data,
                  size_t len) {
    if (!trace_path[0]) return;
    int fd = open(trace_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0) return;
    size_t size = 96 + (data ? 2 * len + 1 : 0);
    char *line = malloc(size);
    if (line) {
        int n = snprintf(line, size, "%d %d %llu %llu", (int)getpid(), index,
                         (unsigned long long)start, (unsigned long long)end);
        if (n > 0 && data) {
            line[n++] = ' ';
            for (size_t i = 0; i < len; i++) n += snprintf(line + n, size - (size_t)n, "%02x", data[i]);
        }
        if (n > 0) {
            line[n++] = '\n';
            ssize_t w = write(fd, line, (size_t)n);
            (void)w;
        }
        free(line);
    }
    close(fd);
}

static U call(int index, U a, U b, U c, U d, U e, U f, U g, U h) {
    fn8 target = (fn8)real->fn[index];
    if (!target) return 0x54UL; /* CKR_FUNCTION_NOT_SUPPORTED */
    if (index == IDX_WAITFORSLOTEVENT) return target(a, b, c, d, e, f, g, h); /* may block */
    pthread_mutex_lock(&mutex);
    int fd = lock_file();
    if (fd < 0 || flock(fd, LOCK_EX) != 0) {
        pthread_mutex_unlock(&mutex);
        return CKR_GENERAL_ERROR;
    }
    uint64_t start = now_ns();
    U rv = target(a, b, c, d, e, f, g, h);
    long ms = call_ms;
    if (index == IDX_LOGIN) ms = login_ms;
    /* A signature, not the length query (pSignature == NULL) nor a buffer too small. */
    else if (index == IDX_SIGN && d != 0 && rv == CKR_OK) ms = sign_ms;
    else if (index == IDX_SIGNFINAL && b != 0 && rv == CKR_OK) ms = sign_ms;
    sleep_ms(ms);
    int signed_data = trace_data && index == IDX_SIGN && d != 0 && rv == CKR_OK && b != 0;
    trace(index, start, now_ns(), signed_data ? (const unsigned char *)b : NULL,
          signed_data ? (size_t)c : 0);
    flock(fd, LOCK_UN);
    pthread_mutex_unlock(&mutex);
    return rv;
}

#define W(n) static U w##n(U a, U b, U c, U d, U e, U f, U g, U h) { \
    return call(n, a, b, c, d, e, f, g, h); }
#define W10(t) W(t##0) W(t##1) W(t##2) W(t##3) W(t##4) W(t##5) W(t##6) W(t##7) W(t##8) W(t##9)
W(0) W(1) W(2) W(3) W(4) W(5) W(6) W(7) W(8) W(9)
W10(1) W10(2) W10(3) W10(4) W10(5)
W(60) W(61) W(62) W(63) W(64) W(65) W(66) W(67)

#define P10(t) (void *)w##t##0, (void *)w##t##1, (void *)w##t##2, (void *)w##t##3, \
    (void *)w##t##4, (void *)w##t##5, (void *)w##t##6, (void *)w##t##7, (void *)w##t##8, \
    (void *)w##t##9
static void *const wrappers[NFUNCS] = {
    (void *)w0, (void *)w1, (void *)w2, (void *)w3, (void *)w4, (void *)w5, (void *)w6,
    (void *)w7, (void *)w8, (void *)w9, P10(1), P10(2), P10(3), P10(4), P10(5),
    (void *)w60, (void *)w61, (void *)w62, (void *)w63, (void *)w64, (void *)w65,
    (void *)w66, (void *)w67,
};

static const char *const softhsm_paths[] = {
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    NULL,
};

U C_GetFunctionList(struct function_list **out);

U C_GetFunctionList(struct function_list **out) {
    if (!out) return CKR_ARGUMENTS_BAD;
    pthread_mutex_lock(&setup);
    if (!real) {
        const char *path = getenv("SLOWTOKEN_MODULE");
        void *lib = NULL;
        if (path && *path) {
            lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        } else {
            for (int i = 0; !lib && softhsm_paths[i]; i++)
                lib = dlopen(softhsm_paths[i], RTLD_NOW | RTLD_LOCAL);
        }
        U (*get)(struct function_list **) = NULL;
        if (lib) *(void **)&get = dlsym(lib, "C_GetFunctionList");
        struct function_list *list = NULL;
        if (!get || get(&list) != CKR_OK || !list) {
            fprintf(stderr, "slowtoken: cannot load the real module %s: %s\n",
                    path && *path ? path : "(SoftHSM2)", lib ? "no C_GetFunctionList" : dlerror());
            pthread_mutex_unlock(&setup);
            return CKR_GENERAL_ERROR;
        }
        const char *lp = getenv("SLOWTOKEN_LOCK");
        if (lp && *lp) snprintf(lock_path, sizeof lock_path, "%s", lp);
        else snprintf(lock_path, sizeof lock_path, "/tmp/slowtoken-%u.lock", (unsigned)getuid());
        const char *tp = getenv("SLOWTOKEN_TRACE");
        if (tp && *tp) snprintf(trace_path, sizeof trace_path, "%s", tp);
        sign_ms = env_ms("SLOWTOKEN_SIGN_MS");
        login_ms = env_ms("SLOWTOKEN_LOGIN_MS");
        call_ms = env_ms("SLOWTOKEN_CALL_MS");
        const char *td = getenv("SLOWTOKEN_TRACE_DATA");
        trace_data = td && strcmp(td, "1") == 0;
        ours.version = list->version;
        for (int i = 0; i < NFUNCS; i++) ours.fn[i] = wrappers[i];
        ours.fn[IDX_GETFUNCTIONLIST] = (void *)C_GetFunctionList;
        real = list;
    }
    pthread_mutex_unlock(&setup);
    *out = &ours;
    return CKR_OK;
}
