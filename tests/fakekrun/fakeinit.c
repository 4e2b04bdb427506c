/*
 * The guest init's side of msbd's control channel, emulated by libfakekrun.so,
 * the libkrun TEST DOUBLE (see README.md). Not a VMM, never a fallback.
 *
 * msbd's real init (guest/init/init.c, docs/libkrun.md) dials host vsock port
 * MSBD_CONTROL_PORT; libkrun turns that into a connection to the Unix socket
 * the port was mapped to with krun_add_vsock_port2, made from the VMM process.
 * Here a thread of the process that called krun_start_enter makes the same
 * connection (so as the same identity, from the same pid), then speaks the
 * init's part: "started" once the workload's exec worked; on "stop [SECONDS]"
 * SIGTERM to the workload, SIGKILL after the grace (SECONDS, else
 * MSBD_STOP_GRACE, else 10 s); "exit N" when the run is over. The init's
 * console lines go to stderr with the init's "msbd-init: " prefix.
 *
 * Test switches (environment of the calling process):
 *   FAKEKRUN_CONTROL=none   never connect (an init without the channel)
 *   FAKEKRUN_CONTROL=deaf   connect and report, but ignore stop (a hung guest)
 *   FAKEKRUN_CONTROL_GATE=path  connect only once a byte can be read from the
 *                           FIFO at path (a slow boot, on cue)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "fakekrun.h"

#define DEFAULT_GRACE_MS 10000

enum mode { MODE_INIT, MODE_NONE, MODE_DEAF };

static struct {
    bool wanted;       /* MSBD_CONTROL_PORT was set: the init dials */
    unsigned long port;
    const char *path;  /* the socket the port is mapped to, or NULL (unmapped) */
    long long grace_ms;
    enum mode mode;
    const char *gate;
    pid_t workload;
    int pidfd;         /* the workload's: signals never hit a reused pid */
    int exec_report;
    bool stopping;
    pthread_mutex_t lock;
    int sock;          /* the connection once made, -1 before and after; under lock */
} init = {.lock = PTHREAD_MUTEX_INITIALIZER, .sock = -1, .pidfd = -1, .exec_report = -1};

static void say(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    int n = snprintf(line, sizeof line, "msbd-init: ");
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    ssize_t w = write(2, line, (size_t)n);
    (void)w;
}

/* The first NAME=value of `envp`, as getenv finds it. */
static const char *env_value(char *const *envp, const char *name)
{
    size_t len = strlen(name);
    for (size_t i = 0; envp != NULL && envp[i] != NULL; i++)
        if (strncmp(envp[i], name, len) == 0 && envp[i][len] == '=')
            return envp[i] + len + 1;
    return NULL;
}

INTERNAL int fakeinit_prepare(char *const *envp, const struct vsock_port *ports, size_t nports,
                              bool vsock_device)
{
    init.grace_ms = DEFAULT_GRACE_MS;
    const char *value = env_value(envp, "MSBD_STOP_GRACE");
    if (value != NULL) {
        char *end;
        double seconds = strtod(value, &end);
        if (*value == '\0' || *end != '\0' || !(seconds >= 0 && seconds < 1e9)) {
            say("bad MSBD_STOP_GRACE '%s' (want seconds)", value);
            return 125;
        }
        init.grace_ms = (long long)(seconds * 1000);
    }
    value = env_value(envp, "MSBD_CONTROL_PORT");
    if (value == NULL)
        return 0;
    char *end;
    unsigned long port = strtoul(value, &end, 10);
    if (*value == '\0' || *end != '\0' || port > UINT_MAX) {
        say("bad MSBD_CONTROL_PORT '%s' (no control channel)", value);
        return 0;
    }
    init.wanted = true;
    init.port = port;
    for (size_t i = 0; vsock_device && i < nports; i++) /* a later mapping replaces one */
        if (ports[i].port == port)
            init.path = ports[i].listen ? NULL : ports[i].path; /* listening: a reset */
    const char *mode = getenv("FAKEKRUN_CONTROL");
    init.mode = mode == NULL ? MODE_INIT : strcmp(mode, "none") == 0 ? MODE_NONE
              : strcmp(mode, "deaf") == 0 ? MODE_DEAF : MODE_INIT;
    init.gate = getenv("FAKEKRUN_CONTROL_GATE");
    return 0;
}

static void record_line(const char *fn, const char *line)
{
    struct jbuf b;
    jb_begin(&b, fn);
    jb_key(&b, "line");
    jb_str(&b, line);
    jb_finish(&b);
}

/* Under the lock: one line to the host, recorded without its newline. */
static void send_line_locked(const char *line)
{
    if (init.sock < 0)
        return;
    if (write(init.sock, line, strlen(line)) < 0)
        say("control channel: %s", strerror(errno));
    char shown[64];
    snprintf(shown, sizeof shown, "%.*s", (int)strcspn(line, "\n"), line);
    record_line("control_send", shown);
}

static void signal_workload(int sig)
{
    struct jbuf b;
    jb_begin(&b, "guest_signal");
    jb_key(&b, "signal");
    jb_int(&b, sig);
    jb_finish(&b);
    if (init.pidfd < 0 || syscall(SYS_pidfd_send_signal, init.pidfd, sig, NULL, 0) != 0)
        kill(init.workload, sig);
}

static long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

/* Like the init: SIGTERM, wait for the end or the grace, then SIGKILL. */
static void stop(long long grace_ms)
{
    say("stopping (stop from the host): SIGTERM to every process, SIGKILL after %lld ms",
        grace_ms);
    signal_workload(SIGTERM);
    long long deadline = now_ms() + grace_ms;
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0)
            break;
        struct pollfd p = {.fd = init.pidfd, .events = POLLIN};
        int r = poll(&p, init.pidfd >= 0 ? 1 : 0, left > INT_MAX ? INT_MAX : (int)left);
        if (r > 0)
            return; /* the workload ended: the process exits with its status */
        if (r < 0 && errno != EINTR)
            break;
    }
    say("grace over: SIGKILL to every process");
    signal_workload(SIGKILL);
}

static void handle(const char *line)
{
    record_line("control_recv", line);
    double seconds;
    long long grace_ms;
    if (strcmp(line, "stop") == 0)
        grace_ms = init.grace_ms;
    else if (sscanf(line, "stop %lf", &seconds) == 1 && seconds >= 0 && seconds < 1e9)
        grace_ms = (long long)(seconds * 1000);
    else
        return; /* other lines are ignored */
    if (init.mode == MODE_DEAF || init.stopping)
        return;
    init.stopping = true;
    stop(grace_ms);
}

/* Wait for one byte from the FIFO: the test says when the "boot" is over. It holds
 * the FIFO open for writing all along, so neither the open nor the write blocks. */
static void wait_for_gate(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    char byte;
    ssize_t n;
    do
        n = read(fd, &byte, 1);
    while (n < 0 && errno == EINTR);
    close(fd);
}

static int dial(int *err)
{
    *err = ECONNRESET; /* what the guest sees for a port libkrun does not map */
    if (init.path == NULL)
        return -1;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(init.path) >= sizeof addr.sun_path) {
        *err = ENAMETOOLONG;
        return -1;
    }
    strcpy(addr.sun_path, init.path);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s >= 0 && connect(s, (struct sockaddr *)&addr, sizeof addr) == 0)
        return s;
    *err = errno;
    if (s >= 0)
        close(s);
    return -1;
}

static void *control_main(void *unused)
{
    (void)unused;
    if (init.gate != NULL && *init.gate)
        wait_for_gate(init.gate);
    int err;
    int s = dial(&err);
    struct jbuf b;
    jb_begin(&b, "control_connect");
    jb_key(&b, "port");
    jb_int(&b, (long long)init.port);
    jb_key(&b, "path");
    jb_str(&b, init.path);
    jb_key(&b, "euid");
    jb_int(&b, geteuid());
    jb_key(&b, "ok");
    jb_puts(&b, s >= 0 ? "true" : "false");
    jb_key(&b, "errno");
    jb_int(&b, s >= 0 ? 0 : err);
    jb_finish(&b);
    if (s < 0) {
        say("no control channel: %s", strerror(err));
        close(init.exec_report);
        return NULL;
    }
    pthread_mutex_lock(&init.lock);
    init.sock = s;
    pthread_mutex_unlock(&init.lock);

    char byte;
    ssize_t n;
    do
        n = read(init.exec_report, &byte, 1);
    while (n < 0 && errno == EINTR);
    close(init.exec_report);
    if (n == 0) { /* EOF: the exec closed the pipe */
        pthread_mutex_lock(&init.lock);
        send_line_locked("started\n");
        pthread_mutex_unlock(&init.lock);
    }

    char buf[256];
    size_t used = 0;
    for (;;) {
        n = read(s, buf + used, sizeof buf - 1 - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        used += (size_t)n;
        buf[used] = '\0';
        char *line = buf, *nl;
        while ((nl = strchr(line, '\n')) != NULL) {
            *nl = '\0';
            handle(line);
            line = nl + 1;
        }
        used = strlen(line);
        memmove(buf, line, used);
        if (used == sizeof buf - 1)
            used = 0; /* an overlong line: dropped */
    }
    /* The host's end closed: not a stop request. The init just goes on. */
    pthread_mutex_lock(&init.lock);
    close(init.sock);
    init.sock = -1;
    pthread_mutex_unlock(&init.lock);
    return NULL;
}

INTERNAL void fakeinit_start(pid_t workload, int exec_report)
{
    if (!init.wanted || init.mode == MODE_NONE) {
        close(exec_report);
        return;
    }
    init.workload = workload;
    init.exec_report = exec_report;
    init.pidfd = (int)syscall(SYS_pidfd_open, workload, 0);
    pthread_t tid;
    if (pthread_create(&tid, NULL, control_main, NULL) == 0)
        pthread_detach(tid);
    else
        close(exec_report);
}

INTERNAL void fakeinit_exit(int status)
{
    char line[32];
    snprintf(line, sizeof line, "exit %d\n", status);
    pthread_mutex_lock(&init.lock);
    send_line_locked(line);
    pthread_mutex_unlock(&init.lock);
}
