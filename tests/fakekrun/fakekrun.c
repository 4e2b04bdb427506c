/*
 * libfakekrun.so: a TEST DOUBLE of libkrun's C ABI, for msbd's tests only.
 *
 * It is not a VMM and never a fallback of msbd: it exports the libkrun
 * functions msbd's worker uses (libkrun 1.19 on Linux: same names, same
 * signatures, and no krun_get_shutdown_eventfd, which Linux builds lack),
 * records every call as one JSON line, and in krun_start_enter opens the
 * disks and shared directories the way libkrun does (same flags, same moment,
 * so as the same identity) and runs the configured program inside the
 * configured root as a child process that dies with its parent, the way a
 * guest dies with its VMM. fakeinit.c plays the guest init's side of msbd's
 * control channel. Built with -DFAKEKRUN_OLD it lacks the calls older
 * libkrun releases lack (krun_add_vsock_port2, krun_set_root_disk_remount).
 * See README.md.
 *
 * Environment:
 *   FAKEKRUN_LOG=path           append one JSON line per call (O_APPEND, one
 *                               write per line); unset: record nothing.
 *   FAKEKRUN_FAIL=sym:errno,... make `sym` return -errno (after recording).
 *   FAKEKRUN_CONTROL, FAKEKRUN_CONTROL_GATE: see fakeinit.c.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fakekrun.h"

#define EXPORT __attribute__((visibility("default")))
#define MAX_CTX 64
#define MAX_FDS 1024
#define MAX_DISKS 64
#define MAX_MOUNTS 64
#define MAX_PORTS 64
#define GUEST_DISK_FD 100 /* the "guest" finds disk i on fd 100 + i */
#define HEAD_BYTES 32     /* how much of each opened disk a record shows */

extern char **environ;

/* ---- a growable buffer for one JSON line ------------------------------- */

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

INTERNAL void jb_puts(struct jbuf *b, const char *s) { jb_raw(b, s, strlen(s)); }

INTERNAL void jb_int(struct jbuf *b, long long v)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, "%lld", v);
    jb_raw(b, tmp, (size_t)n);
}

/* A JSON string with proper escaping, or null. */
INTERNAL void jb_str(struct jbuf *b, const char *s)
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

INTERNAL void jb_key(struct jbuf *b, const char *key)
{
    jb_raw(b, ",", 1);
    jb_str(b, key);
    jb_raw(b, ":", 1);
}

INTERNAL void jb_begin(struct jbuf *b, const char *fn)
{
    b->p = NULL;
    b->len = b->cap = 0;
    jb_puts(b, "{\"fn\":");
    jb_str(b, fn);
}

/* The log is opened when the library is loaded: the worker may become the
 * sandbox owner before its first libkrun call, and that uid need not be able
 * to open the log's path. It is opened again only if FAKEKRUN_LOG changes
 * (in-process tests set it per test). */
static int log_fd = -1;
static char log_at[4096];

static void open_log(const char *path)
{
    if (log_fd >= 0)
        close(log_fd);
    log_fd = -1;
    log_at[0] = '\0';
    if (path == NULL || *path == '\0')
        return;
    log_fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    snprintf(log_at, sizeof log_at, "%s", path);
}

__attribute__((constructor)) static void open_log_at_load(void)
{
    open_log(getenv("FAKEKRUN_LOG"));
}

static void log_write(const char *line, size_t len)
{
    const char *path = getenv("FAKEKRUN_LOG");
    if (strcmp(path ? path : "", log_at) != 0)
        open_log(path);
    if (log_fd < 0)
        return;
    ssize_t n = write(log_fd, line, len); /* one write per line: O_APPEND keeps lines whole */
    (void)n;
}

INTERNAL void jb_finish(struct jbuf *b)
{
    jb_puts(b, "}\n");
    log_write(b->p, b->len);
    free(b->p);
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

struct disk {
    char *id;
    char *path;
    uint32_t format; /* 0 raw, 1 qcow2, 2 vmdk */
    bool read_only;
};

struct mount {
    char *tag;
    char *path;
};

struct ctx {
    bool used;
    char *root;
    struct disk disks[MAX_DISKS]; /* in the order they were added, the root disk too */
    size_t ndisks;
    struct mount mounts[MAX_MOUNTS];
    size_t nmounts;
    char *workdir;
    char *exec_path;
    char **argv; /* arguments after the program name */
    char **envp;
    enum { VSOCK_IMPLICIT, VSOCK_DISABLED, VSOCK_EXPLICIT } vsock;
    struct vsock_port ports[MAX_PORTS]; /* in the order they were mapped */
    size_t nports;
    char *root_device, *root_fstype, *root_options; /* krun_set_root_disk_remount */
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
    for (size_t i = 0; i < c->ndisks; i++) {
        free(c->disks[i].id);
        free(c->disks[i].path);
    }
    for (size_t i = 0; i < c->nmounts; i++) {
        free(c->mounts[i].tag);
        free(c->mounts[i].path);
    }
    free(c->workdir);
    free(c->exec_path);
    free_strv(c->argv);
    free_strv(c->envp);
    for (size_t i = 0; i < c->nports; i++)
        free(c->ports[i].path);
    free(c->root_device);
    free(c->root_fstype);
    free(c->root_options);
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

/* Disks are only remembered here; krun_start_enter opens them, as libkrun does. */
static int32_t add_disk(struct ctx *c, const char *id, const char *path, uint32_t format,
                        bool read_only)
{
    if (c->ndisks == MAX_DISKS)
        return -ENOSPC;
    struct disk *d = &c->disks[c->ndisks++];
    d->id = strdup(id);
    d->path = strdup(path);
    d->format = format;
    d->read_only = read_only;
    return 0;
}

static int32_t add_mount(struct ctx *c, const char *tag, const char *path)
{
    if (c->nmounts == MAX_MOUNTS)
        return -ENOSPC;
    struct mount *m = &c->mounts[c->nmounts++];
    m->tag = strdup(tag);
    m->path = strdup(path);
    return 0;
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
    if (block_id == NULL || disk_path == NULL)
        return jb_end(&b, -EINVAL);
    return jb_end(&b, add_disk(c, block_id, disk_path, 0, read_only));
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
    if (block_id == NULL || disk_path == NULL || disk_format > 2)
        return jb_end(&b, -EINVAL);
    return jb_end(&b, add_disk(c, block_id, disk_path, disk_format, read_only));
}

#ifndef FAKEKRUN_OLD
/* Like libkrun: refused with a root directory set or no disk added yet; "auto"
 * (or NULL) means any file system. Remembered: the double cannot boot it. */
EXPORT int32_t krun_set_root_disk_remount(uint32_t ctx_id, const char *c_device,
                                          const char *c_fstype, const char *c_options)
{
    struct ctx *c;
    BEGIN(b, "krun_set_root_disk_remount", ctx_id);
    jb_key(&b, "device");
    jb_str(&b, c_device);
    jb_key(&b, "fstype");
    jb_str(&b, c_fstype);
    jb_key(&b, "options");
    jb_str(&b, c_options);
    CHECK(b, "krun_set_root_disk_remount", ctx_id, c);
    if (c_device == NULL || c->root != NULL || c->ndisks == 0 || c->root_device != NULL)
        return jb_end(&b, -EINVAL);
    c->root_device = strdup(c_device);
    c->root_fstype = c_fstype && strcmp(c_fstype, "auto") != 0 ? strdup(c_fstype) : NULL;
    c->root_options = c_options ? strdup(c_options) : NULL;
    return jb_end(&b, 0);
}
#endif

EXPORT int32_t krun_add_virtiofs(uint32_t ctx_id, const char *c_tag, const char *c_path)
{
    struct ctx *c;
    BEGIN(b, "krun_add_virtiofs", ctx_id);
    jb_key(&b, "tag");
    jb_str(&b, c_tag);
    jb_key(&b, "path");
    jb_str(&b, c_path);
    CHECK(b, "krun_add_virtiofs", ctx_id, c);
    if (c_tag == NULL || c_path == NULL)
        return jb_end(&b, -EINVAL);
    return jb_end(&b, add_mount(c, c_tag, c_path));
}

/* Newer libkrun: the only call that shares a directory read-only. */
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
    if (c_tag == NULL)
        return jb_end(&b, -EINVAL);
    return jb_end(&b, c_path == NULL ? 0 : add_mount(c, c_tag, c_path));
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

/* Like libkrun 1.19: "host:guest" entries of two u16 numbers, no guest port and no
 * host port twice; refused with -ENODEV while no vsock device is to exist. A NULL
 * array is read as an empty one here (libkrun reads it, the worker never passes it). */
static int32_t check_port_map(const struct ctx *c, const char *const port_map[])
{
    unsigned long hosts[MAX_PORTS], guests[MAX_PORTS];
    size_t n = 0;
    for (size_t i = 0; port_map != NULL && port_map[i] != NULL; i++) {
        unsigned long host, guest;
        int used = -1;
        if (sscanf(port_map[i], "%5lu:%5lu%n", &host, &guest, &used) != 2 ||
            port_map[i][used] != '\0' || !isdigit((unsigned char)port_map[i][0]) ||
            host > 65535 || guest > 65535 || n == MAX_PORTS)
            return -EINVAL;
        for (size_t j = 0; j < n; j++)
            if (hosts[j] == host || guests[j] == guest)
                return -EINVAL;
        hosts[n] = host;
        guests[n++] = guest;
    }
    return c->vsock == VSOCK_DISABLED ? -ENODEV : 0;
}

EXPORT int32_t krun_set_port_map(uint32_t ctx_id, const char *const port_map[])
{
    struct ctx *c;
    BEGIN(b, "krun_set_port_map", ctx_id);
    jb_key(&b, "port_map");
    jb_strv(&b, port_map);
    CHECK(b, "krun_set_port_map", ctx_id, c);
    return jb_end(&b, check_port_map(c, port_map));
}

/* Like libkrun: a port maps once per context (a later mapping replaces it), and
 * only while a vsock device is to exist (not after krun_disable_implicit_vsock
 * without krun_add_vsock). fakeinit.c connects to the path of a listen=false
 * mapping; a listen=true one is only remembered. */
static int32_t map_port(struct ctx *c, uint32_t port, const char *path, bool listen)
{
    if (path == NULL)
        return -EINVAL;
    struct stat st;
    if (listen && stat(path, &st) == 0)
        return -EEXIST;
    if (c->vsock == VSOCK_DISABLED)
        return -ENODEV;
    size_t i = 0;
    while (i < c->nports && c->ports[i].port != port)
        i++;
    if (i == MAX_PORTS)
        return -ENOSPC;
    if (i == c->nports)
        c->nports++;
    else
        free(c->ports[i].path);
    c->ports[i] = (struct vsock_port){.port = port, .path = strdup(path), .listen = listen};
    return 0;
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
    return jb_end(&b, map_port(c, port, c_filepath, false));
}

#ifndef FAKEKRUN_OLD
EXPORT int32_t krun_add_vsock_port2(uint32_t ctx_id, uint32_t port, const char *c_filepath,
                                    bool listen)
{
    struct ctx *c;
    BEGIN(b, "krun_add_vsock_port2", ctx_id);
    jb_key(&b, "port");
    jb_int(&b, port);
    jb_key(&b, "filepath");
    jb_str(&b, c_filepath);
    jb_key(&b, "listen");
    jb_puts(&b, listen ? "true" : "false");
    CHECK(b, "krun_add_vsock_port2", ctx_id, c);
    return jb_end(&b, map_port(c, port, c_filepath, listen));
}
#endif

EXPORT int32_t krun_disable_implicit_vsock(uint32_t ctx_id)
{
    struct ctx *c;
    BEGIN(b, "krun_disable_implicit_vsock", ctx_id);
    CHECK(b, "krun_disable_implicit_vsock", ctx_id, c);
    c->vsock = VSOCK_DISABLED;
    return jb_end(&b, 0);
}

/* Like libkrun: only after krun_disable_implicit_vsock, once; TSI bits 0-1 only. */
EXPORT int32_t krun_add_vsock(uint32_t ctx_id, uint32_t tsi_features)
{
    struct ctx *c;
    BEGIN(b, "krun_add_vsock", ctx_id);
    jb_key(&b, "tsi_features");
    jb_int(&b, tsi_features);
    CHECK(b, "krun_add_vsock", ctx_id, c);
    if (tsi_features & ~3U)
        return jb_end(&b, -EINVAL);
    if (c->vsock != VSOCK_DISABLED)
        return jb_end(&b, -EEXIST);
    c->vsock = VSOCK_EXPLICIT;
    return jb_end(&b, 0);
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

/* ---- krun_start_enter: run the workload as a child that dies with us ---- */

/* The open fds of this process, by getdents64 on an open /proc/self/fd:
 * no malloc, so it is safe in the child of a multi-threaded parent. */
static size_t list_fds(int dirfd, int *out, size_t max, int skip1, int skip2, int skip3)
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
            if (fd != dirfd && fd != skip1 && fd != skip2 && fd != skip3 && n < max)
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

/* In the child: the write end of the exec report pipe (fakeinit.c reads EOF when the
 * exec worked, a byte when it did not). */
static int exec_report_fd = -1;

static _Noreturn void child_fail(int status, const char *what, const char *path, int err)
{
    if (exec_report_fd >= 0) {
        ssize_t r = write(exec_report_fd, "!", 1);
        (void)r;
    }
    char msg[512];
    int n = snprintf(msg, sizeof msg, "fakekrun (test double): %s %s: errno %d\n", what, path, err);
    ssize_t w = write(2, msg, (size_t)(n > 0 && n < (int)sizeof msg ? n : 0));
    (void)w;
    _exit(status);
}

/* ---- opening disks and shared directories the way libkrun does ---------- */

static uint64_t be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Finish an open record: who opened it, how it went, the first bytes read. */
static void record_open(struct jbuf *b, int fd, int err)
{
    static const char hex[] = "0123456789abcdef";
    jb_key(b, "euid");
    jb_int(b, geteuid());
    jb_key(b, "egid");
    jb_int(b, getegid());
    jb_key(b, "ok");
    jb_puts(b, fd >= 0 ? "true" : "false");
    jb_key(b, "errno");
    jb_int(b, err);
    jb_key(b, "head");
    if (fd < 0) {
        jb_puts(b, "null");
    } else {
        unsigned char buf[HEAD_BYTES];
        ssize_t n = pread(fd, buf, sizeof buf, 0);
        jb_raw(b, "\"", 1);
        for (ssize_t i = 0; i < n; i++) {
            char two[2] = {hex[buf[i] >> 4], hex[buf[i] & 15]};
            jb_raw(b, two, 2);
        }
        jb_raw(b, "\"", 1);
    }
    jb_puts(b, "}\n");
    log_write(b->p, b->len);
    free(b->p);
}

/* Like imago (libkrun's image library): a qcow2 header's backing file name,
 * taken relative to the directory of the name the image was opened by,
 * opened read-only. Only this one kind of reference is modelled. */
static void follow_backing(const struct disk *d, int fd)
{
    unsigned char h[20];
    if (pread(fd, h, sizeof h, 0) != (ssize_t)sizeof h || memcmp(h, "QFI\xfb", 4) != 0)
        return;
    uint64_t offset = be64(h + 8);
    uint32_t len = be32(h + 16);
    char name[1024];
    if (offset == 0 || len == 0 || len >= sizeof name
        || pread(fd, name, len, (off_t)offset) != (ssize_t)len)
        return;
    name[len] = '\0';
    struct jbuf path = {0};
    const char *slash = strrchr(d->path, '/');
    if (name[0] != '/' && slash != NULL)
        jb_raw(&path, d->path, (size_t)(slash - d->path) + 1);
    jb_puts(&path, name);
    int bfd = open(path.p, O_RDONLY | O_CLOEXEC);
    int err = bfd < 0 ? errno : 0;
    struct jbuf b;
    jb_begin(&b, "open_backing");
    jb_key(&b, "block_id");
    jb_str(&b, d->id);
    jb_key(&b, "path");
    jb_str(&b, path.p);
    record_open(&b, bfd, err);
    free(path.p);
    if (bfd >= 0)
        close(bfd);
}

/* One disk, as libkrun's block device opens it: read, plus write unless
 * read-only, close-on-exec, nothing else (no O_NOFOLLOW, no O_DIRECT, no
 * lock). Returns the fd or -errno; either way it is recorded. */
static int open_disk(const struct disk *d)
{
    int fd = open(d->path, (d->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    int err = fd < 0 ? errno : 0;
    struct jbuf b;
    jb_begin(&b, "open_disk");
    jb_key(&b, "block_id");
    jb_str(&b, d->id);
    jb_key(&b, "path");
    jb_str(&b, d->path);
    jb_key(&b, "read_only");
    jb_puts(&b, d->read_only ? "true" : "false");
    record_open(&b, fd, err);
    if (fd >= 0 && d->format == 1)
        follow_backing(d, fd);
    return fd >= 0 ? fd : -err;
}

/* The start of an open_dir record, made before fork (the child allocates nothing). */
static void dir_record(struct jbuf *b, const char *tag, const char *path)
{
    jb_begin(b, "open_dir");
    jb_key(b, "tag");
    jb_str(b, tag);
    jb_key(b, "path");
    jb_str(b, path);
    jb_reserve(b, 128);
}

/* In the child: a shared directory as libkrun's virtio-fs opens its root
 * (O_PATH | O_NOFOLLOW), recorded through `logfd`. Returns the fd or -errno. */
static int open_dir(struct jbuf *rec, const char *path, int logfd)
{
    int fd = open(path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    int err = fd < 0 ? errno : 0;
    struct stat st;
    bool dir = fd >= 0 && fstat(fd, &st) == 0 && S_ISDIR(st.st_mode);
    size_t pos = rec->len;
    pos += (size_t)snprintf(rec->p + pos, rec->cap - pos,
                            ",\"euid\":%d,\"ok\":%s,\"errno\":%d,\"directory\":%s}\n",
                            (int)geteuid(), fd >= 0 ? "true" : "false", err,
                            dir ? "true" : "false");
    if (logfd >= 0) {
        ssize_t w = write(logfd, rec->p, pos);
        (void)w;
    }
    return fd >= 0 ? fd : -err;
}

static void close_range_or_loop(unsigned first, unsigned last)
{
    if (first > last)
        return;
    if (syscall(SYS_close_range, first, last, 0U) != 0)
        for (unsigned fd = first; fd <= last && fd < MAX_FDS * 64; fd++)
            close((int)fd);
}

/* ---- krun_start_enter: run the workload as a child that dies with us ---- */

/* The end of the "VM": the init reports the status, the process exits with it. */
static _Noreturn void exit_with(int code)
{
    fakeinit_exit(code);
    struct jbuf e;
    jb_begin(&e, "exit");
    jb_key(&e, "status");
    jb_int(&e, code);
    jb_finish(&e);
    _exit(code);
}

EXPORT int32_t krun_start_enter(uint32_t ctx_id)
{
    struct ctx *c;
    BEGIN(b, "krun_start_enter", ctx_id);
    int dirfd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int fds[MAX_FDS];
    size_t nfds = dirfd >= 0 ? list_fds(dirfd, fds, MAX_FDS, log_fd, -1, -1) : 0;
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
    jb_key(&b, "sockets"); /* which of those are sockets */
    jb_raw(&b, "[", 1);
    for (size_t i = 0, any = 0; i < nfds; i++) {
        struct stat st;
        if (fstat(fds[i], &st) == 0 && S_ISSOCK(st.st_mode)) {
            if (any++)
                jb_raw(&b, ",", 1);
            jb_int(&b, fds[i]);
        }
    }
    jb_raw(&b, "]", 1);
    CHECK(b, "krun_start_enter", ctx_id, c);
    if (c->exec_path == NULL)
        return jb_end(&b, -EINVAL);

    /* Like libkrun: every disk (the root disk too) is opened here, by whoever
     * calls this, before the krun_setgid/krun_setuid identity is taken. */
    int disk_fds[MAX_DISKS];
    for (size_t i = 0; i < c->ndisks; i++) {
        disk_fds[i] = open_disk(&c->disks[i]);
        if (disk_fds[i] < 0) {
            for (size_t k = 0; k < i; k++)
                close(disk_fds[k]);
            return jb_end(&b, -EINVAL); /* libkrun: "Error configuring virtio-blk" */
        }
    }
    if (c->root == NULL) { /* a disk root: this test double cannot boot a disk image */
        for (size_t k = 0; k < c->ndisks; k++)
            close(disk_fds[k]);
        return jb_end(&b, -ENOTSUP);
    }

    /* Everything the child needs is prepared here: after fork it only makes syscalls. */
    bool do_chroot = geteuid() == 0;
    const char *workdir = c->workdir ? c->workdir : "/";
    const char *rel_workdir = workdir + strspn(workdir, "/");
    const char *rel_exec = c->exec_path + strspn(c->exec_path, "/");
    size_t argc = 0;
    while (c->argv[argc] != NULL)
        argc++;
    char **argv = calloc(argc + 2, sizeof *argv);
    if (argv == NULL)
        abort();
    argv[0] = c->exec_path; /* argv[0] is the guest path, as libkrun's init does */
    memcpy(argv + 1, c->argv, argc * sizeof *argv);
    /* Like msbd's init: the workload does not see the KRUN_* and MSBD_* variables. */
    size_t envc = 0;
    while (c->envp[envc] != NULL)
        envc++;
    char **envp = calloc(envc + 1, sizeof *envp);
    if (envp == NULL)
        abort();
    for (size_t i = 0, k = 0; i < envc; i++)
        if (strncmp(c->envp[i], "KRUN_", 5) != 0 && strncmp(c->envp[i], "MSBD_", 5) != 0)
            envp[k++] = c->envp[i];
    struct jbuf dir_recs[1 + MAX_MOUNTS];
    dir_record(&dir_recs[0], "/dev/root", c->root);
    for (size_t i = 0; i < c->nmounts; i++)
        dir_record(&dir_recs[1 + i], c->mounts[i].tag, c->mounts[i].path);

    struct jbuf child_rec;
    jb_begin(&child_rec, "child");
    jb_key(&child_rec, "chroot");
    jb_puts(&child_rec, do_chroot ? "true" : "false");
    jb_key(&child_rec, "root");
    jb_str(&child_rec, c->root);
    jb_key(&child_rec, "exec");
    jb_str(&child_rec, c->exec_path);
    jb_key(&child_rec, "cwd");
    jb_str(&child_rec, workdir);
    jb_reserve(&child_rec, 8 * MAX_FDS + 128);

    jb_key(&b, "ret");
    jb_puts(&b, "null}\n"); /* null: it does not return */
    log_write(b.p, b.len);
    free(b.p);

    int init_failed = fakeinit_prepare(c->envp, c->ports, c->nports, c->vsock != VSOCK_DISABLED);
    if (init_failed)
        exit_with(init_failed);
    int report[2]; /* close-on-exec: EOF in the parent once the workload's exec worked */
    if (pipe2(report, O_CLOEXEC) != 0)
        return -errno;
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        exec_report_fd = report[1];
        /* The "guest": dies with its VMM, starts with clean signals and fds 0-2, plus
         * disk i on fd 100+i. */
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
        /* The shared directories, opened as libkrun's virtio-fs opens them. Upstream
         * does that after taking the krun_setuid identity; the double needs the root
         * for its chroot first. msbd's worker is the owner by now either way. */
        int rootfd = open_dir(&dir_recs[0], c->root, log_fd);
        for (size_t i = 0; i < c->nmounts; i++) {
            int m = open_dir(&dir_recs[1 + i], c->mounts[i].path, log_fd);
            if (m >= 0)
                close(m);
        }
        struct stat st;
        if (rootfd < 0)
            child_fail(125, "cannot open the root directory", c->root, -rootfd);
        if (fstat(rootfd, &st) != 0 || !S_ISDIR(st.st_mode))
            child_fail(125, "the root is not a directory:", c->root, ENOTDIR);
        /* Disks to 100+i (inherited); the log, the root and the exec report right
         * above them (close-on-exec); all moved above those first, so no dup2
         * clobbers a source. */
        size_t n = c->ndisks;
        int log_at = GUEST_DISK_FD + (int)n, root_at = log_at + 1, report_at = root_at + 1;
        int above = report_at + 1;
        int moved[MAX_DISKS + 3];
        for (size_t i = 0; i < n; i++)
            moved[i] = fcntl(disk_fds[i], F_DUPFD_CLOEXEC, above);
        moved[n] = log_fd >= 0 ? fcntl(log_fd, F_DUPFD_CLOEXEC, above) : -1;
        moved[n + 1] = fcntl(rootfd, F_DUPFD_CLOEXEC, above);
        moved[n + 2] = fcntl(report[1], F_DUPFD_CLOEXEC, above);
        if (moved[n + 2] >= 0 && dup3(moved[n + 2], report_at, O_CLOEXEC) == report_at)
            exec_report_fd = report_at;
        for (size_t i = 0; i < n; i++)
            if (moved[i] < 0 || dup2(moved[i], GUEST_DISK_FD + (int)i) < 0)
                child_fail(125, "cannot pass on disk", c->disks[i].path, errno);
        int logfd = moved[n] >= 0 ? dup3(moved[n], log_at, O_CLOEXEC) : -1;
        if (moved[n + 1] < 0 || (rootfd = dup3(moved[n + 1], root_at, O_CLOEXEC)) < 0)
            child_fail(125, "cannot keep the root directory", c->root, errno);
        close_range_or_loop(3, GUEST_DISK_FD - 1);
        close_range_or_loop((unsigned)above, ~0U);
        int procfd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (do_chroot && (fchdir(rootfd) != 0 || chroot(".") != 0))
            child_fail(125, "cannot chroot into", c->root, errno);
        /* Like libkrun: the identity is dropped right before the "guest" starts
         * (uid and gid only; supplementary groups are the worker's business). */
        if (c->gid >= 0 && setgid((gid_t)c->gid) != 0)
            child_fail(125, "cannot set gid for", c->root, errno);
        if (c->uid >= 0 && setuid((uid_t)c->uid) != 0)
            child_fail(125, "cannot set uid for", c->root, errno);
        /* Not root (no chroot): the guest paths resolve under the root directory. */
        if (do_chroot ? chdir(workdir) != 0
                      : fchdir(rootfd) != 0 || (*rel_workdir && chdir(rel_workdir) != 0))
            child_fail(125, "cannot chdir to", workdir, errno);
        int seen[MAX_FDS];
        size_t nseen = procfd >= 0 ? list_fds(procfd, seen, MAX_FDS, logfd, rootfd,
                                              exec_report_fd) : 0;
        if (logfd >= 0) {
            size_t pos = child_rec.len;
            char *rec = child_rec.p;
            pos += (size_t)snprintf(rec + pos, child_rec.cap - pos,
                                    ",\"pid\":%d,\"uid\":%d,\"gid\":%d", (int)getpid(),
                                    (int)getuid(), (int)getgid());
            pos = put_fds(rec, pos, child_rec.cap - 4, "fds", seen, nseen);
            rec[pos++] = '}';
            rec[pos++] = '\n';
            ssize_t w = write(logfd, rec, pos);
            (void)w;
            close(logfd);
        }
        if (procfd >= 0)
            close(procfd);
        if (do_chroot)
            execve(c->exec_path, argv, envp);
        else
            syscall(SYS_execveat, rootfd, rel_exec, argv, envp, 0);
        int err = errno;
        child_fail(err == ENOENT || err == ENOTDIR ? 127 : 126, "cannot execute", c->exec_path,
                   err);
    }

    close(report[1]);
    fakeinit_start(pid, report[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) {
            status = 0;
            break;
        }
    }
    exit_with(WIFEXITED(status) ? WEXITSTATUS(status)
              : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 255);
}
