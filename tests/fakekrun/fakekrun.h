/*
 * Shared inside libfakekrun.so, the libkrun TEST DOUBLE (see README.md): the
 * JSON record writer of fakekrun.c and the guest init emulation of fakeinit.c.
 * Nothing here is exported from the library.
 */
#ifndef FAKEKRUN_H
#define FAKEKRUN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define INTERNAL __attribute__((visibility("hidden")))

/* One JSON record being built: {"fn":NAME,...}, written as one line. */
struct jbuf {
    char *p;
    size_t len, cap;
};

INTERNAL void jb_begin(struct jbuf *b, const char *fn);
INTERNAL void jb_key(struct jbuf *b, const char *key);
INTERNAL void jb_int(struct jbuf *b, long long v);
INTERNAL void jb_str(struct jbuf *b, const char *s); /* escaped, or null for NULL */
INTERNAL void jb_puts(struct jbuf *b, const char *s); /* raw */
INTERNAL void jb_finish(struct jbuf *b); /* close the object, write the line, free it */

/* A vsock port mapped with krun_add_vsock_port(2). */
struct vsock_port {
    uint32_t port;
    char *path;
    bool listen;
};

/*
 * The guest init's side of msbd's control channel (fakeinit.c). In
 * krun_start_enter, before fork: `fakeinit_prepare` reads MSBD_CONTROL_PORT and
 * MSBD_STOP_GRACE from the guest's environment and finds the port's mapping
 * (none without a vsock device); it returns 0, or 125 when the init would fail
 * (a bad MSBD_STOP_GRACE). After fork, in the parent: `fakeinit_start` with the
 * workload's pid and the read end of a close-on-exec pipe whose write end the
 * workload holds until its exec (EOF: the exec worked). Before the process
 * exits with the workload's status: `fakeinit_exit`.
 */
INTERNAL int fakeinit_prepare(char *const *envp, const struct vsock_port *ports, size_t nports,
                              bool vsock_device);
INTERNAL void fakeinit_start(pid_t workload, int exec_report);
INTERNAL void fakeinit_exit(int status);

#endif
