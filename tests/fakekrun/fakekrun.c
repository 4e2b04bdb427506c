/*
 * libfakekrun.so: a TEST DOUBLE of libkrun's C ABI, for msbd's tests only.
 *
 * It is not a VMM and never a fallback of msbd: it exports the libkrun
 * functions msbd's worker uses (LIBKRUN-ABI.md, same names, same signatures),
 * records every call as one JSON line, and in krun_start_enter runs the
 * configured program inside the configured root as a child process that dies
 * with its parent, the way a guest dies with its VMM. See README.md.
 *
 * Environment:
 *   FAKEKRUN_LOG=path           append one JSON line per call (O_APPEND, one
 *                               write per line); unset: record nothing.
 *   FAKEKRUN_FAIL=sym:errno,... make `sym` return -errno (after recording).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define MAX_CTX 64
#define MAX_FDS 1024

extern char **environ;

/* ---- a growable buffer for one JSON line ------------------------------- */

struct jbuf {
    char *p;
    size_t len, cap;
};

static void jb_reserve(struct jbuf *b, size_t more)
{
    if (b->len + more + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (p == NULL)
        abort();
    b->p = p;
    b->cap = cap;
}

static void jb_raw(struct jbuf *b, const char *s, size_t n)
{
    jb_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void jb_puts(struct jbuf *b, const char *s) { jb_raw(b, s, strlen(s)); }

static void jb_int(struct jbuf *b, long long v)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, "%lld", v);
    jb_raw(b, tmp, (size_t)n);
}

/* A JSON string with proper escaping, or null. */
static void jb_str(struct jbuf *b, const char *s)
{
    if (s == NULL) {
        jb_puts(b, "null");
        return;
    }
    jb_raw(b, "\"", 1);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        char esc[8];
        switch (*c) {
        case '"': jb_raw(b, "\\\"", 2); break;
        case '\\': jb_raw(b, "\\\\", 2); break;
        case '\n': jb_raw(b, "\\n", 2); break;
        case '\r': jb_raw(b, "\\r", 2); break;
        case '\t': jb_raw(b, "\\t", 2); break;
        default:
            if (*c < 0x20) {
                snprintf(esc, sizeof esc, "\\u%04x", *c);
                jb_raw(b, esc, 6);
            } else {
                jb_raw(b, (const char *)c, 1);
            }
        }
    }
    jb_raw(b, "\"", 1);
}

/* A NULL-terminated string array as a JSON list, or null for a NULL array. */
static void jb_strv(struct jbuf *b, const char *const *v)
{
    if (v == NULL) {
        jb_puts(b, "null");
        return;
    }
    jb_raw(b, "[", 1);
    for (size_t i = 0; v[i] != NULL; i++) {
        if (i)
            jb_raw(b, ",", 1);
        jb_str(b, v[i]);
    }
    jb_raw(b, "]", 1);
}

static void jb_key(struct jbuf *b, const char *key)
{
    jb_raw(b, ",", 1);
    jb_str(b, key);
    jb_raw(b, ":", 1);
}

static void jb_begin(struct jbuf *b, const char *fn)
{
    b->p = NULL;
    b->len = b->cap = 0;
    jb_puts(b, "{\"fn\":");
    jb_str(b, fn);
}

static void log_write(const char *line, size_t len)
{
    const char *path = getenv("FAKEKRUN_LOG");
    if (path == NULL || *path == '\0')
        return;
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    ssize_t n = write(fd, line, len); /* one write per line: O_APPEND keeps lines whole */
    (void)n;
    close(fd);
}

/* Finish the record with "ret", write it as one line, and return `ret`. */
static int32_t jb_end(struct jbuf *b, int32_t ret)
{
    jb_key(b, "ret");
    jb_int(b, ret);
    jb_puts(b, "}\n");
    log_write(b->p, b->len);
    free(b->p);
    return ret;
}

/* ---- FAKEKRUN_FAIL: "sym:errno[,sym:errno...]" -------------------------- */

static int injected_errno(const char *fn)
{
    const char *spec = getenv("FAKEKRUN_FAIL");
    size_t fnlen = strlen(fn);
    while (spec != NULL && *spec) {
        const char *end = strchr(spec, ',');
        size_t len = end ? (size_t)(end - spec) : strlen(spec);
        const char *colon = memchr(spec, ':', len);
        if (colon != NULL && (size_t)(colon - spec) == fnlen && memcmp(spec, fn, fnlen) == 0) {
            int e = atoi(colon + 1);
            return e > 0 ? e : EINVAL;
        }
        spec = end ? end + 1 : NULL;
    }
    return 0;
}

/* ---- contexts ----------------------------------------------------------- */

struct ctx {
    bool used;
    char *root;
    char *workdir;
    char *exec_path;
    char **argv; /* arguments after the program name */
    char **envp;
    int shutdown_fd;
    long uid, gid; /* -1: keep the caller's (krun_setuid/krun_setgid not called) */
};

static struct ctx contexts[MAX_CTX];
static pthread_mutex_t ctx_lock = PTHREAD_MUTEX_INITIALIZER; /* never held across fork */
static uint32_t next_ctx; /* ids start at 0, like libkrun's */

static struct ctx *find_ctx(uint32_t id)
{
    return id < MAX_CTX && contexts[id].used ? &contexts[id] : NULL;
}

static char **dup_strv(const char *const *v)
{
    size_t n = 0;
    while (v[n] != NULL)
        n++;
    char **out = calloc(n + 1, sizeof *out);
    if (out == NULL)
        abort();
    for (size_t i = 0; i < n; i++)
        out[i] = strdup(v[i]);
    return out;
}

static void free_strv(char **v)
{
    for (size_t i = 0; v != NULL && v[i] != NULL; i++)
        free(v[i]);
    free(v);
}

/* Common prologue: the record, injected failures, the context lookup. */
#define BEGIN(b, name, ctx_id)                                   \
    struct jbuf b;                                               \
    jb_begin(&b, name);                                          \
    jb_key(&b, "ctx");                                           \
    jb_int(&b, ctx_id)

#define CHECK(b, name, ctx_id, c)                                \
    do {                                                         \
        int e_ = injected_errno(name);                           \
        if (e_)                                                  \
            return jb_end(&b, -e_);                              \
        c = find_ctx(ctx_id);                                    \
        if (c == NULL)                                           \
            return jb_end(&b, -ENOENT);                          \
    } while (0)

/* ---- the libkrun functions ---------------------------------------------- */

/* Not libkrun: lets `python -m msbd.vm doctor` say it found the test double. */
EXPORT int fakekrun_test_double(void) { return 1; }

EXPORT int32_t krun_set_log_level(uint32_t level)
{
    struct jbuf b;
    jb_begin(&b, "krun_set_log_level");
    jb_key(&b, "level");
    jb_int(&b, level);
    int e = injected_errno("krun_set_log_level");
    if (e)
        return jb_end(&b, -e);
    return jb_end(&b, level > 5 ? -EINVAL : 0);
}

EXPORT int32_t krun_create_ctx(void)
{
    struct jbuf b;
    jb_begin(&b, "krun_create_ctx");
    int e = injected_errno("krun_create_ctx");
    if (e)
        return jb_end(&b, -e);
    pthread_mutex_lock(&ctx_lock);
    uint32_t id = next_ctx;
    if (id >= MAX_CTX) {
        pthread_mutex_unlock(&ctx_lock);
        return jb_end(&b, -ENOMEM);
    }
    next_ctx++;
    memset(&contexts[id], 0, sizeof contexts[id]);
    contexts[id].used = true;
    contexts[id].shutdown_fd = -1;
    contexts[id].uid = -1;
    contexts[id].gid = -1;
    pthread_mutex_unlock(&ctx_lock);
    return jb_end(&b, (int32_t)id);
}

EXPORT int32_t krun_free_ctx(uint32_t ctx_id)
{
    struct ctx *c;
    BEGIN(b, "krun_free_ctx", ctx_id);
    CHECK(b, "krun_free_ctx", ctx_id, c);
    free(c->root);
    free(c->workdir);
    free(c->exec_path);
    free_strv(c->argv);
    free_strv(c->envp);
    if (c->shutdown_fd >= 0)
        close(c->shutdown_fd);
    memset(c, 0, sizeof *c);
    return jb_end(&b, 0);
}

EXPORT int32_t krun_set_vm_config(uint32_t ctx_id, uint8_t num_vcpus, uint32_t ram_mib)
{
    struct ctx *c;
    BEGIN(b, "krun_set_vm_config", ctx_id);
    jb_key(&b, "num_vcpus");
    jb_int(&b, num_vcpus);
    jb_key(&b, "ram_mib");
    jb_int(&b, ram_mib);
    CHECK(b, "krun_set_vm_config", ctx_id, c);
    (void)c;
    return jb_end(&b, num_vcpus == 0 || ram_mib == 0 ? -EINVAL : 0);
}

EXPORT int32_t krun_set_root(uint32_t ctx_id, const char *root_path)
{
    struct ctx *c;
    BEGIN(b, "krun_set_root", ctx_id);
    jb_key(&b, "root_path");
    jb_str(&b, root_path);
    CHECK(b, "krun_set_root", ctx_id, c);
    if (root_path == NULL)
        return jb_end(&b, -EINVAL);
    free(c->root);
    c->root = strdup(root_path);
    return jb_end(&b, 0);
}

EXPORT int32_t krun_add_disk(uint32_t ctx_id, const char *block_id, const char *disk_path,
                             bool read_only)
{
    struct ctx *c;
    BEGIN(b, "krun_add_disk", ctx_id);
    jb_key(&b, "block_id");
    jb_str(&b, block_id);
    jb_key(&b, "disk_path");
    jb_str(&b, disk_path);
    jb_key(&b, "read_only");
    jb_puts(&b, read_only ? "true" : "false");
    CHECK(b, "krun_add_disk", ctx_id, c);
    (void)c;
    return jb_end(&b, block_id == NULL || disk_path == NULL ? -EINVAL : 0);
}

EXPORT int32_t krun_add_disk2(uint32_t ctx_id, const char *block_id, const char *disk_path,
                              uint32_t disk_format, bool read_only)
{
    struct ctx *c;
    BEGIN(b, "krun_add_disk2", ctx_id);
    jb_key(&b, "block_id");
    jb_str(&b, block_id);
    jb_key(&b, "disk_path");
    jb_str(&b, disk_path);
    jb_key(&b, "disk_format");
    jb_int(&b, disk_format);
    jb_key(&b, "read_only");
    jb_puts(&b, read_only ? "true" : "false");
    CHECK(b, "krun_add_disk2", ctx_id, c);
    (void)c;
    if (block_id == NULL || disk_path == NULL || disk_format > 2)
        return jb_end(&b, -EINVAL);
    return jb_end(&b, 0);
}

EXPORT int32_t krun_add_virtiofs(uint32_t ctx_id, const char *c_tag, const char *c_path)
{
    struct ctx *c;
    BEGIN(b, "krun_add_virtiofs", ctx_id);
    jb_key(&b, "tag");
    jb_str(&b, c_tag);
    jb_key(&b, "path");
    jb_str(&b, c_path);
    CHECK(b, "krun_add_virtiofs", ctx_id, c);
    (void)c;
    return jb_end(&b, c_tag == NULL || c_path == NULL ? -EINVAL : 0);
}

/* Newer libkrun (not in LIBKRUN-ABI.md's table): the only way to share read-only. */
EXPORT int32_t krun_add_virtiofs3(uint32_t ctx_id, const char *c_tag, const char *c_path,
                                  uint64_t shm_size, bool read_only)
{
    struct ctx *c;
    BEGIN(b, "krun_add_virtiofs3", ctx_id);
    jb_key(&b, "tag");
    jb_str(&b, c_tag);
    jb_key(&b, "path");
    jb_str(&b, c_path);
    jb_key(&b, "shm_size");
    jb_int(&b, (long long)shm_size);
    jb_key(&b, "read_only");
    jb_puts(&b, read_only ? "true" : "false");
    CHECK(b, "krun_add_virtiofs3", ctx_id, c);
    (void)c;
    return jb_end(&b, c_tag == NULL ? -EINVAL : 0);
}

EXPORT int32_t krun_set_workdir(uint32_t ctx_id, const char *workdir_path)
{
    struct ctx *c;
    BEGIN(b, "krun_set_workdir", ctx_id);
    jb_key(&b, "workdir");
    jb_str(&b, workdir_path);
    CHECK(b, "krun_set_workdir", ctx_id, c);
    if (workdir_path == NULL)
        return jb_end(&b, -EINVAL);
    free(c->workdir);
    c->workdir = strdup(workdir_path);
    return jb_end(&b, 0);
}

EXPORT int32_t krun_set_exec(uint32_t ctx_id, const char *exec_path, const char *const argv[],
                             const char *const envp[])
{
    struct ctx *c;
    BEGIN(b, "krun_set_exec", ctx_id);
    jb_key(&b, "exec_path");
    jb_str(&b, exec_path);
    jb_key(&b, "argv");
    jb_strv(&b, argv);
    jb_key(&b, "envp");
    jb_strv(&b, envp);
    CHECK(b, "krun_set_exec", ctx_id, c);
    if (exec_path == NULL)
        return jb_end(&b, -EINVAL);
    free(c->exec_path);
    free_strv(c->argv);
    free_strv(c->envp);
    c->exec_path = strdup(exec_path);
    static const char *const none[] = {NULL};
    c->argv = dup_strv(argv ? argv : none);
    /* Like libkrun: a NULL envp copies the caller's environment into the guest. */
    c->envp = dup_strv(envp ? envp : (const char *const *)environ);
    return jb_end(&b, 0);
}

EXPORT int32_t krun_set_env(uint32_t ctx_id, const char *const envp[])
{
    struct ctx *c;
    BEGIN(b, "krun_set_env", ctx_id);
    jb_key(&b, "envp");
    jb_strv(&b, envp);
    CHECK(b, "krun_set_env", ctx_id, c);
    free_strv(c->envp);
    c->envp = dup_strv(envp ? envp : (const char *const *)environ);
    return jb_end(&b, 0);
}

EXPORT int32_t krun_set_rlimits(uint32_t ctx_id, const char *const rlimits[])
{
    struct ctx *c;
    BEGIN(b, "krun_set_rlimits", ctx_id);
    jb_key(&b, "rlimits");
    jb_strv(&b, rlimits);
    CHECK(b, "krun_set_rlimits", ctx_id, c);
    (void)c;
    return jb_end(&b, rlimits == NULL ? -EINVAL : 0);
}

EXPORT int32_t krun_set_port_map(uint32_t ctx_id, const char *const port_map[])
{
    struct ctx *c;
    BEGIN(b, "krun_set_port_map", ctx_id);
    jb_key(&b, "port_map");
    jb_strv(&b, port_map);
    CHECK(b, "krun_set_port_map", ctx_id, c);
    (void)c;
    return jb_end(&b, 0);
}

EXPORT int32_t krun_add_vsock_port(uint32_t ctx_id, uint32_t port, const char *c_filepath)
{
    struct ctx *c;
    BEGIN(b, "krun_add_vsock_port", ctx_id);
    jb_key(&b, "port");
    jb_int(&b, port);
    jb_key(&b, "filepath");
    jb_str(&b, c_filepath);
    CHECK(b, "krun_add_vsock_port", ctx_id, c);
    (void)c;
    return jb_end(&b, c_filepath == NULL ? -EINVAL : 0);
}

EXPORT int32_t krun_set_console_output(uint32_t ctx_id, const char *c_filepath)
{
    struct ctx *c;
    BEGIN(b, "krun_set_console_output", ctx_id);
    jb_key(&b, "filepath");
    jb_str(&b, c_filepath);
    CHECK(b, "krun_set_console_output", ctx_id, c);
    (void)c;
    return jb_end(&b, c_filepath == NULL ? -EINVAL : 0);
}

EXPORT int32_t krun_setuid(uint32_t ctx_id, uid_t uid)
{
    struct ctx *c;
    BEGIN(b, "krun_setuid", ctx_id);
    jb_key(&b, "uid");
    jb_int(&b, uid);
    CHECK(b, "krun_setuid", ctx_id, c);
    c->uid = (long)uid;
    return jb_end(&b, 0);
}

EXPORT int32_t krun_setgid(uint32_t ctx_id, gid_t gid)
{
    struct ctx *c;
    BEGIN(b, "krun_setgid", ctx_id);
    jb_key(&b, "gid");
    jb_int(&b, gid);
    CHECK(b, "krun_setgid", ctx_id, c);
    c->gid = (long)gid;
    return jb_end(&b, 0);
}

EXPORT int32_t krun_get_shutdown_eventfd(uint32_t ctx_id)
{
    struct ctx *c;
    BEGIN(b, "krun_get_shutdown_eventfd", ctx_id);
    CHECK(b, "krun_get_shutdown_eventfd", ctx_id, c);
    if (c->shutdown_fd < 0) {
        c->shutdown_fd = eventfd(0, EFD_CLOEXEC);
        if (c->shutdown_fd < 0)
            return jb_end(&b, -errno);
    }
    return jb_end(&b, c->shutdown_fd);
}

/* ---- krun_start_enter: run the workload as a child that dies with us ---- */

/* The open fds of this process, by getdents64 on an open /proc/self/fd:
 * no malloc, so it is safe in the child of a multi-threaded parent. */
static size_t list_fds(int dirfd, int *out, size_t max, int skip1, int skip2)
{
    char buf[4096];
    size_t n = 0;
    if (lseek(dirfd, 0, SEEK_SET) < 0)
        return 0;
    for (;;) {
        long got = syscall(SYS_getdents64, dirfd, buf, sizeof buf);
        if (got <= 0)
            break;
        for (long off = 0; off < got;) {
            struct dirent64 *d = (struct dirent64 *)(buf + off);
            off += d->d_reclen;
            if (d->d_name[0] < '0' || d->d_name[0] > '9')
                continue;
            int fd = 0;
            for (const char *p = d->d_name; *p; p++)
                fd = fd * 10 + (*p - '0');
            if (fd != dirfd && fd != skip1 && fd != skip2 && n < max)
                out[n++] = fd;
        }
    }
    return n;
}

/* Append ,"key":[fds] to a fixed buffer without malloc. */
static size_t put_fds(char *buf, size_t pos, size_t cap, const char *key, const int *fds, size_t n)
{
    char num[16];
    pos += (size_t)snprintf(buf + pos, cap - pos, ",\"%s\":[", key);
    for (size_t i = 0; i < n && pos + 16 < cap; i++) {
        int v = fds[i], len = 0;
        char rev[16];
        do {
            rev[len++] = (char)('0' + v % 10);
            v /= 10;
        } while (v);
        for (int k = 0; k < len; k++)
            num[k] = rev[len - 1 - k];
        if (i)
            buf[pos++] = ',';
        memcpy(buf + pos, num, (size_t)len);
        pos += (size_t)len;
    }
    buf[pos++] = ']';
    return pos;
}

struct watch {
    int eventfd;
    pid_t child;
};

/* The orderly-shutdown path: the eventfd was written, so ask the "guest" to stop. */
static void *watch_shutdown(void *arg)
{
    struct watch *w = arg;
    struct pollfd p = {.fd = w->eventfd, .events = POLLIN};
    for (;;) {
        int r = poll(&p, 1, -1);
        if (r > 0) {
            uint64_t v;
            ssize_t n = read(w->eventfd, &v, sizeof v);
            (void)n;
            kill(w->child, SIGTERM);
        } else if (r < 0 && errno != EINTR) {
            return NULL;
        }
    }
}

static _Noreturn void child_fail(int status, const char *what, const char *path, int err)
{
    char msg[512];
    int n = snprintf(msg, sizeof msg, "fakekrun (test double): %s %s: errno %d\n", what, path, err);
    ssize_t w = write(2, msg, (size_t)(n > 0 && n < (int)sizeof msg ? n : 0));
    (void)w;
    _exit(status);
}

EXPORT int32_t krun_start_enter(uint32_t ctx_id)
{
    struct ctx *c;
    BEGIN(b, "krun_start_enter", ctx_id);
    int dirfd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int fds[MAX_FDS];
    size_t nfds = dirfd >= 0 ? list_fds(dirfd, fds, MAX_FDS, -1, -1) : 0;
    if (dirfd >= 0)
        close(dirfd);
    jb_key(&b, "fds");
    jb_raw(&b, "[", 1);
    for (size_t i = 0; i < nfds; i++) {
        if (i)
            jb_raw(&b, ",", 1);
        jb_int(&b, fds[i]);
    }
    jb_raw(&b, "]", 1);
    CHECK(b, "krun_start_enter", ctx_id, c);
    if (c->exec_path == NULL)
        return jb_end(&b, -EINVAL);
    if (c->root == NULL) /* a root_disk: this test double cannot boot a disk image */
        return jb_end(&b, -ENOTSUP);

    /* Everything the child needs is prepared here: after fork it only makes syscalls. */
    bool do_chroot = geteuid() == 0;
    const char *workdir = c->workdir ? c->workdir : "/";
    struct jbuf host_exec = {0}, host_cwd = {0};
    if (!do_chroot) { /* not root: no chroot; paths resolve under the root directory */
        jb_puts(&host_exec, c->root);
        jb_puts(&host_exec, c->exec_path);
        jb_puts(&host_cwd, c->root);
        jb_puts(&host_cwd, workdir);
    }
    const char *exec_at = do_chroot ? c->exec_path : host_exec.p;
    const char *cwd_at = do_chroot ? workdir : host_cwd.p;
    size_t argc = 0;
    while (c->argv[argc] != NULL)
        argc++;
    char **argv = calloc(argc + 2, sizeof *argv);
    if (argv == NULL)
        abort();
    argv[0] = c->exec_path; /* argv[0] is the guest path, as libkrun's init does */
    memcpy(argv + 1, c->argv, argc * sizeof *argv);
    const char *log_path = getenv("FAKEKRUN_LOG");

    struct jbuf child_rec;
    jb_begin(&child_rec, "child");
    jb_key(&child_rec, "chroot");
    jb_puts(&child_rec, do_chroot ? "true" : "false");
    jb_key(&child_rec, "exec");
    jb_str(&child_rec, exec_at);
    jb_key(&child_rec, "cwd");
    jb_str(&child_rec, cwd_at);
    jb_reserve(&child_rec, 8 * MAX_FDS + 64);

    jb_key(&b, "ret");
    jb_puts(&b, "null}\n"); /* null: it does not return */
    log_write(b.p, b.len);
    free(b.p);

    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        /* The "guest": dies with its VMM, starts with clean signals and only fds 0-2. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(125);
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        for (int s = 1; s < NSIG; s++)
            sigaction(s, &dfl, NULL); /* SIGKILL/SIGSTOP and libc-reserved ones just fail */
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        if (syscall(SYS_close_range, 3U, ~0U, 0U) != 0)
            for (int fd = 3; fd < MAX_FDS * 64; fd++)
                close(fd);
        /* Instrumentation only, both close-on-exec and closed before exec. */
        int logfd = log_path ? open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644) : -1;
        int procfd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (do_chroot && chroot(c->root) != 0)
            child_fail(125, "cannot chroot into", c->root, errno);
        /* Like libkrun: the identity is dropped right before the "guest" starts
         * (uid and gid only; supplementary groups are the worker's business). */
        if (c->gid >= 0 && setgid((gid_t)c->gid) != 0)
            child_fail(125, "cannot set gid for", c->root, errno);
        if (c->uid >= 0 && setuid((uid_t)c->uid) != 0)
            child_fail(125, "cannot set uid for", c->root, errno);
        if (chdir(cwd_at) != 0)
            child_fail(125, "cannot chdir to", cwd_at, errno);
        int seen[MAX_FDS];
        size_t nseen = procfd >= 0 ? list_fds(procfd, seen, MAX_FDS, logfd, -1) : 0;
        if (logfd >= 0) {
            size_t pos = child_rec.len;
            char *rec = child_rec.p;
            pos += (size_t)snprintf(rec + pos, child_rec.cap - pos, ",\"pid\":%d", (int)getpid());
            pos = put_fds(rec, pos, child_rec.cap - 4, "fds", seen, nseen);
            rec[pos++] = '}';
            rec[pos++] = '\n';
            ssize_t w = write(logfd, rec, pos);
            (void)w;
            close(logfd);
        }
        if (procfd >= 0)
            close(procfd);
        execve(exec_at, argv, c->envp);
        int err = errno;
        child_fail(err == ENOENT || err == ENOTDIR ? 127 : 126, "cannot execute", exec_at, err);
    }

    if (c->shutdown_fd >= 0) {
        static struct watch w;
        w.eventfd = c->shutdown_fd;
        w.child = pid;
        pthread_t tid;
        if (pthread_create(&tid, NULL, watch_shutdown, &w) == 0)
            pthread_detach(tid);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) {
            status = 0;
            break;
        }
    }
    int code = WIFEXITED(status) ? WEXITSTATUS(status)
             : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 255;
    struct jbuf e;
    jb_begin(&e, "exit");
    jb_key(&e, "status");
    jb_int(&e, code);
    jb_puts(&e, "}\n");
    log_write(e.p, e.len);
    _exit(code);
}
