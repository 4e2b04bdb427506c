/* unixconnect PATH...: try to connect to each Unix stream socket PATH and say how it went,
 * one line each: "unix PATH: connected" or "unix PATH: <strerror>". Built static for the
 * real-VM tests' busybox guests, whose busybox nc has no Unix sockets. Exit status 0. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        if (strlen(argv[i]) >= sizeof addr.sun_path) {
            printf("unix %s: path too long\n", argv[i]);
            continue;
        }
        strcpy(addr.sun_path, argv[i]);
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd < 0) {
            printf("unix %s: socket: %s\n", argv[i], strerror(errno));
            continue;
        }
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0)
            printf("unix %s: connected\n", argv[i]);
        else
            printf("unix %s: %s\n", argv[i], strerror(errno));
        close(fd);
    }
    fflush(stdout);
    return 0;
}
