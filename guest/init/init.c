/*
 * msbd-init: PID 1 inside every libkrun guest msbd starts.
 *
 * libkrun boots its guest kernel with `init=/init.krun` and serves this
 * program (embedded in libkrun.so at build time) at that path of the guest's
 * virtio-fs root. Everything else arrives through the kernel command line,
 * which the kernel hands to PID 1 as environment and arguments:
 *
 *   KRUN_INIT=path            the workload; argv[1..] are its arguments
 *   KRUN_WORKDIR=dir          its working directory
 *   KRUN_RLIMITS=ID=CUR:MAX,..  numeric resource limits to set first
 *   KRUN_BLOCK_ROOT_DEVICE, _FSTYPE, _OPTIONS
 *                             a disk to mount and switch into as the root
 *   KRUN_HOME, KRUN_TERM      HOME and TERM for the workload
 *   HOSTNAME                  the guest's hostname (default "localhost")
 *   MSBD_CONTROL_PORT=n       dial the host on vsock port n (see below)
 *   MSBD_STOP_GRACE=seconds   the grace of an orderly stop (default 10)
 *
 * It mounts the pseudo file systems, sets the environment up, runs the
 * workload as its child, reaps every orphan, and when the workload ends
 * reports its exit status to the VMM (ioctl 0x7602 on the virtio-fs root,
 * libkrun's process then exits with that code) and reboots, which ends the
 * VM. Its own failures are exit codes: 125 the environment could not be set
 * up, 126 the workload is not executable, 127 it does not exist; each comes
 * with one line on the console.
 *
 * Orderly stop: SIGTERM, SIGINT (ctrl-alt-del) or SIGPWR to PID 1, or a
 * "stop [SECONDS]" line on the control channel, sends SIGTERM to every
 * process, waits the grace, then SIGKILLs what is left; the
 * exit status is then the workload's. The control channel is a vsock
 * connection init opens to the host (CID 2) when MSBD_CONTROL_PORT is set;
 * libkrun bridges it to a host Unix socket (krun_add_vsock_port2, listen
 * false). Init writes "started\n" once the workload runs and "exit N\n"
 * before the VM goes down. docs/libkrun.md has the whole contract.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/vm_sockets.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define EXIT_CODE_IOCTL 0x7602 /* libkrun virtio-fs: "the guest's exit code is ARG" */
#define VIRTIOFS_MAGIC 0x65735546
#define EXIT_SETUP 125
#define EXIT_NOEXEC 126
#define EXIT_NOTFOUND 127
#define DEFAULT_GRACE_MS 10000

static int console = 2;  /* where our own lines go: the console, or the krun-stderr port */
static int root_fd = -1; /* the virtio-fs root, kept to report the exit code */
static int control = -1; /* vsock stream to the host, or -1 */
static bool control_up;  /* connected (not just connecting) */

static void say(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    int n = snprintf(line, sizeof line, "msbd-init: ");
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    (void)!write(console, line, n);
}

static void tell_host(const char *line)
{
    if (control_up && write(control, line, strlen(line)) < 0)
        say("control channel: %s", strerror(errno));
}

/* The end of the VM: nothing is left running, the code reaches the VMM. */
static void __attribute__((noreturn)) finish(int code)
{
    char line[32];
    snprintf(line, sizeof line, "exit %d\n", code);
    tell_host(line);
    kill(-1, SIGKILL);
    sync();
    struct statfs fs;
    if (root_fd >= 0 && fstatfs(root_fd, &fs) == 0 && fs.f_type == VIRTIOFS_MAGIC) {
        if (ioctl(root_fd, EXIT_CODE_IOCTL, code) < 0)
            say("cannot report exit code %d to the VMM: %s", code, strerror(errno));
    } else {
        say("no virtio-fs root to report exit code %d to", code);
    }
    reboot(RB_AUTOBOOT);                          /* libkrun's VMM exits on the reset */
    say("reboot failed: %s", strerror(errno));
    _exit(code);                                  /* libkrunfw reboots when PID 1 exits */
}

static void __attribute__((noreturn)) setup_failed(const char *what, const char *arg)
{
    say("%s %s: %s", what, arg, strerror(errno));
    finish(EXIT_SETUP);
}

/* Consume one of our variables: the workload does not see it. */
static char *take_env(const char *name)
{
    char *value = getenv(name);
    if (value == NULL)
        return NULL;
    value = strdup(value);
    unsetenv(name);
    return value;
}

static bool is_mountpoint(const char *dir)
{
    char parent[PATH_MAX];
    struct stat here, up;
    snprintf(parent, sizeof parent, "%s/..", dir);
    if (stat(dir, &here) < 0 || stat(parent, &up) < 0)
        return false;
    return here.st_dev != up.st_dev || here.st_ino == up.st_ino;
}

struct mount_spec {
    const char *source, *dir, *type, *data;
    unsigned long flags;
    bool required;
};

static const struct mount_spec basics[] = {
    {"devtmpfs", "/dev", "devtmpfs", "mode=0755", MS_NOSUID, true},
    {"proc", "/proc", "proc", NULL, MS_NOSUID | MS_NODEV | MS_NOEXEC, true},
    {"sysfs", "/sys", "sysfs", NULL, MS_NOSUID | MS_NODEV | MS_NOEXEC, true},
    {"cgroup2", "/sys/fs/cgroup", "cgroup2", NULL, MS_NOSUID | MS_NODEV | MS_NOEXEC, false},
    {"devpts", "/dev/pts", "devpts", "mode=0620,ptmxmode=0666", MS_NOSUID | MS_NOEXEC, false},
    {"tmpfs", "/dev/shm", "tmpfs", "mode=1777", MS_NOSUID | MS_NODEV, false},
};

/* Mount what is not mounted yet (the kernel may have mounted /dev itself). */
static void mount_basics(size_t count)
{
    for (size_t i = 0; i < count; i++) {
        const struct mount_spec *m = &basics[i];
        if (mkdir(m->dir, 0755) < 0 && errno != EEXIST) {
            if (m->required)
                setup_failed("cannot create", m->dir);
            continue;
        }
        if (!is_mountpoint(m->dir) && mount(m->source, m->dir, m->type, m->flags, m->data) < 0) {
            if (m->required)
                setup_failed("cannot mount", m->dir);
            say("cannot mount %s: %s (going on without it)", m->dir, strerror(errno));
        }
    }
}

/* The kernel opens /dev/console for PID 1 only when the root has a /dev/console. */
static void open_console(void)
{
    if (fcntl(2, F_GETFD) >= 0)
        return;
    int fd = open("/dev/console", O_RDWR | O_NOCTTY);
    if (fd < 0)
        return;
    for (int i = 0; i < 3; i++)
        if (fd != i)
            dup2(fd, i);
    if (fd > 2)
        close(fd);
}

static int mount_any(const char *device, unsigned long flags, const char *options)
{
    FILE *list = fopen("/proc/filesystems", "r");
    char line[128], type[64];
    if (list == NULL)
        return -1;
    int rc = -1;
    while (rc < 0 && fgets(line, sizeof line, list))
        if (strncmp(line, "nodev", 5) != 0 && sscanf(line, "%63s", type) == 1)
            rc = mount(device, "/newroot", type, flags, options);
    fclose(list);
    return rc;
}

/* Mount the disk root on /newroot, then make it "/" (the old root stays underneath). */
static void switch_to_disk(char *device, char *fstype, char *options)
{
    for (int tries = 0; access(device, F_OK) < 0 && tries < 100; tries++) {
        struct timespec pause = {0, 20 * 1000 * 1000}; /* the node appears as the disk probes */
        nanosleep(&pause, NULL);
    }
    if (mkdir("/newroot", 0755) < 0 && errno != EEXIST)
        setup_failed("cannot create", "/newroot");
    bool any = fstype == NULL || strcmp(fstype, "auto") == 0;
    unsigned long flags = 0;
    int rc;
    for (;;) {
        rc = any ? mount_any(device, flags, options)
                 : mount(device, "/newroot", fstype, flags, options);
        if (rc == 0 || flags == MS_RDONLY || (errno != EROFS && errno != EACCES))
            break;
        flags = MS_RDONLY; /* a read-only disk: mount it read-only */
    }
    if (rc < 0)
        setup_failed("cannot mount the root disk", device);
    if (chdir("/newroot") < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
        chdir("/") < 0)
        setup_failed("cannot switch into the root disk", device);
}

static void set_rlimits(char *spec)
{
    for (char *item = strtok(spec, ","); item != NULL; item = strtok(NULL, ",")) {
        unsigned id;
        unsigned long long cur, max;
        int used = -1;
        if (sscanf(item, "%u=%llu:%llu%n", &id, &cur, &max, &used) != 3 ||
            item[used] != '\0') {
            say("bad KRUN_RLIMITS entry '%s' (want ID=CUR:MAX)", item);
            finish(EXIT_SETUP);
        }
        struct rlimit limit = {.rlim_cur = cur, .rlim_max = max};
        if (setrlimit((int)id, &limit) < 0)
            setup_failed("cannot set rlimit", item);
    }
}

static void loopback_up(void)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr = {.ifr_name = "lo"};
    if (fd < 0)
        return;
    if (ioctl(fd, SIOCGIFFLAGS, &ifr) == 0) {
        ifr.ifr_flags |= IFF_UP;
        ioctl(fd, SIOCSIFFLAGS, &ifr);
    }
    close(fd);
}

/* Start dialing the host; poll() tells when the connection is up or has failed. */
static void dial_host(const char *port)
{
    char *end;
    unsigned long n = strtoul(port, &end, 10);
    if (*port == '\0' || *end != '\0' || n > UINT_MAX) {
        say("bad MSBD_CONTROL_PORT '%s' (no control channel)", port);
        return;
    }
    struct sockaddr_vm host = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST,
                               .svm_port = (unsigned)n};
    control = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (control >= 0 && connect(control, (struct sockaddr *)&host, sizeof host) == 0)
        control_up = true;
    else if (control < 0 || errno != EINPROGRESS) {
        say("no control channel: vsock port %lu: %s", n, strerror(errno));
        if (control >= 0)
            close(control);
        control = -1;
    }
}

/*
 * libkrun's krun-stdin/-stdout/-stderr console ports: libkrun adds them when its
 * own stdin/stdout/stderr is not a terminal and no console file was set, and the
 * console itself then goes to libkrun's log only. A port opens once, so init
 * opens them here and the workload inherits them as its fds 0, 1 and 2.
 */
static int ports[3] = {-1, -1, -1};

static void open_ports(void)
{
    static const char *names[] = {"krun-stdin", "krun-stdout", "krun-stderr"};
    DIR *dir = opendir("/sys/class/virtio-ports");
    struct dirent *port;
    while (dir != NULL && (port = readdir(dir)) != NULL) {
        char path[300], name[32] = "";
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", port->d_name);
        FILE *f = fopen(path, "r");
        if (f == NULL)
            continue;
        bool got = fgets(name, sizeof name, f) != NULL;
        fclose(f);
        name[strcspn(name, "\n")] = '\0';
        for (int fd = 0; got && fd < 3; fd++) {
            if (strcmp(name, names[fd]) != 0)
                continue;
            snprintf(path, sizeof path, "/dev/%s", port->d_name);
            ports[fd] = open(path, (fd == 0 ? O_RDONLY : O_WRONLY) | O_CLOEXEC);
            if (ports[fd] < 0)
                say("cannot open %s (%s): %s", path, names[fd], strerror(errno));
        }
    }
    if (dir != NULL)
        closedir(dir);
}

/* Fork and exec the workload; returns its pid once exec succeeded. */
static pid_t start_workload(char **argv, const sigset_t *blocked)
{
    int report[2];
    if (pipe2(report, O_CLOEXEC) < 0)
        setup_failed("cannot create", "a pipe");
    pid_t pid = fork();
    if (pid < 0)
        setup_failed("cannot fork", argv[0]);
    if (pid == 0) {
        sigprocmask(SIG_UNBLOCK, blocked, NULL);
        setsid();
        if (isatty(0))
            ioctl(0, TIOCSCTTY, 0); /* ^C on the console reaches the workload */
        for (int fd = 0; fd < 3; fd++)
            if (ports[fd] >= 0)
                dup2(ports[fd], fd);
        execvp(argv[0], argv);
        int err = errno;
        (void)!write(report[1], &err, sizeof err);
        _exit(EXIT_SETUP);
    }
    close(report[1]);
    int err = 0;
    ssize_t got;
    do
        got = read(report[0], &err, sizeof err);
    while (got < 0 && errno == EINTR);
    close(report[0]);
    if (got == (ssize_t)sizeof err) {
        waitpid(pid, NULL, 0);
        say("cannot run %s: %s", argv[0], strerror(err));
        finish(err == ENOENT || err == ENOTDIR ? EXIT_NOTFOUND : EXIT_NOEXEC);
    }
    return pid;
}

static long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

static long long grace_ms = DEFAULT_GRACE_MS;
static long long stop_deadline = -1; /* when stopping: the moment to SIGKILL what is left */
static bool killed;                  /* that moment has passed */

static void request_stop(long long grace_ms, const char *why)
{
    if (stop_deadline >= 0)
        return;
    say("stopping (%s): SIGTERM to every process, SIGKILL after %lld ms", why, grace_ms);
    stop_deadline = now_ms() + grace_ms;
    kill(-1, SIGTERM);
}

/* Lines from the host: "stop" or "stop SECONDS"; anything else is ignored. */
static void read_control(void)
{
    static char buf[256];
    static size_t used;
    ssize_t n = read(control, buf + used, sizeof buf - 1 - used);
    if (n <= 0) {
        if (n < 0 && errno == EAGAIN)
            return;
        close(control);
        control = -1;
        control_up = false;
        return;
    }
    used += n;
    buf[used] = '\0';
    char *line = buf, *nl;
    while ((nl = strchr(line, '\n')) != NULL) {
        *nl = '\0';
        double seconds;
        if (strcmp(line, "stop") == 0)
            request_stop(grace_ms, "stop from the host");
        else if (sscanf(line, "stop %lf", &seconds) == 1 && seconds >= 0 && seconds < 1e9)
            request_stop((long long)(seconds * 1000), "stop from the host");
        line = nl + 1;
    }
    used = strlen(line);
    memmove(buf, line, used);
    if (used == sizeof buf - 1)
        used = 0; /* an overlong line: drop it */
}

static void __attribute__((noreturn)) supervise(pid_t workload, int signals)
{
    for (;;) {
        struct pollfd fds[2] = {{signals, POLLIN, 0},
                                {control, control_up ? POLLIN : POLLOUT, 0}};
        int timeout = -1;
        if (stop_deadline >= 0 && !killed) {
            long long left = stop_deadline - now_ms();
            timeout = left > 0 ? (int)left : 0;
        }
        if (poll(fds, control >= 0 ? 2 : 1, timeout) < 0 && errno != EINTR)
            say("poll: %s", strerror(errno));
        if (stop_deadline >= 0 && !killed && now_ms() >= stop_deadline) {
            say("grace over: SIGKILL to every process");
            kill(-1, SIGKILL);
            killed = true;
        }
        if (fds[0].revents & POLLIN) {
            struct signalfd_siginfo info;
            if (read(signals, &info, sizeof info) == sizeof info && info.ssi_signo != SIGCHLD) {
                char why[32];
                snprintf(why, sizeof why, "SIG%s", sigabbrev_np((int)info.ssi_signo));
                request_stop(grace_ms, why);
            }
            int status;
            pid_t pid;
            while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
                if (pid == workload)
                    finish(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
        }
        if (control >= 0 && !control_up && fds[1].revents) {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(control, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err == 0) {
                control_up = true;
                tell_host("started\n");
            } else {
                say("no control channel: %s", strerror(err));
                close(control);
                control = -1;
            }
        } else if (control >= 0 && fds[1].revents) {
            read_control();
        }
    }
}

int main(int argc, char **argv)
{
    (void)argc;
    open_console();
    if (getpid() != 1) {
        say("must run as PID 1 inside a libkrun guest");
        return EXIT_SETUP;
    }
    root_fd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);

    char *device = take_env("KRUN_BLOCK_ROOT_DEVICE");
    char *fstype = take_env("KRUN_BLOCK_ROOT_FSTYPE");
    char *options = take_env("KRUN_BLOCK_ROOT_OPTIONS");
    if (device != NULL) {
        mount_basics(2); /* /dev for the device node, /proc for the file system list */
        switch_to_disk(device, fstype, options);
    }
    mount_basics(sizeof basics / sizeof basics[0]);
    /* A private /tmp only where the root has none: an existing one is the root's own. */
    if (mkdir("/tmp", 01777) == 0 &&
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") < 0)
        say("cannot mount /tmp: %s", strerror(errno));
    if (symlink("/proc/self/fd", "/dev/fd") < 0 && errno != EEXIST)
        say("cannot link /dev/fd: %s", strerror(errno));
    open_console();
    open_ports();
    int fd = ports[2] >= 0 ? ports[2] : fcntl(2, F_DUPFD_CLOEXEC, 3);
    if (fd >= 0)
        console = fd; /* the workload may change its fd 2; our lines keep their place */

    char *value;
    if ((value = take_env("KRUN_HOME")) != NULL)
        setenv("HOME", value, 1);
    if ((value = take_env("KRUN_TERM")) != NULL)
        setenv("TERM", value, 1);
    value = getenv("HOSTNAME");
    if (value == NULL)
        value = "localhost";
    if (sethostname(value, strlen(value)) < 0)
        setup_failed("cannot set hostname", value);
    if ((value = take_env("KRUN_RLIMITS")) != NULL)
        set_rlimits(value);
    if ((value = take_env("KRUN_WORKDIR")) != NULL && chdir(value) < 0)
        setup_failed("cannot enter workdir", value);
    loopback_up();
    reboot(RB_DISABLE_CAD); /* ctrl-alt-del becomes SIGINT to us: an orderly stop */

    sigset_t handled;
    sigemptyset(&handled);
    sigaddset(&handled, SIGCHLD);
    sigaddset(&handled, SIGTERM);
    sigaddset(&handled, SIGINT);
    sigaddset(&handled, SIGPWR);
    sigprocmask(SIG_BLOCK, &handled, NULL);
    int signals = signalfd(-1, &handled, SFD_CLOEXEC);
    if (signals < 0)
        setup_failed("cannot create", "a signalfd");

    if ((value = take_env("MSBD_STOP_GRACE")) != NULL) {
        char *end;
        double seconds = strtod(value, &end);
        if (*value == '\0' || *end != '\0' || !(seconds >= 0 && seconds < 1e9)) {
            say("bad MSBD_STOP_GRACE '%s' (want seconds)", value);
            finish(EXIT_SETUP);
        }
        grace_ms = (long long)(seconds * 1000);
    }
    if ((value = take_env("MSBD_CONTROL_PORT")) != NULL)
        dial_host(value);

    /* The workload: KRUN_INIT with our own arguments (the ones after "--"). */
    value = take_env("KRUN_INIT");
    argv[0] = value != NULL ? value : "/bin/sh";
    pid_t workload = start_workload(argv, &handled);
    tell_host("started\n");
    supervise(workload, signals);
}
