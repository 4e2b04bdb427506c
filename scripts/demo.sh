#!/usr/bin/env bash
# The main job, end to end: start msbd, launch sandboxes, show their state and
# output, stop them, stop the daemon. Run by `make demo` after setup, and by
# `make demo-vm` inside scripts/nested-kvm.
#
# It launches real microVMs when this host can run them (a KVM that boots a
# guest kernel, and libkrun from `make libkrun` or $MSBD_LIBKRUN); otherwise
# it says so and uses the libkrun test double, which runs no VM.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DEMO=${DEMO_DIR:-$PWD/.demo}
SOCK=$DEMO/msbd.sock
FAKEKRUN=$PWD/tests/fakekrun/libfakekrun.so
LIBKRUN=${MSBD_LIBKRUN:-}
if [ -z "$LIBKRUN" ] && dir=$(scripts/build-libkrun --print-dir 2>/dev/null); then
    LIBKRUN=$dir/libkrun.so.1
fi
if [ -n "$LIBKRUN" ] && "$BIN/python" -m msbd.vm doctor --libkrun "$LIBKRUN" >/dev/null 2>&1
then
    REAL=1
else
    REAL=0
    CHECKED=${LIBKRUN:-$FAKEKRUN}  # what doctor is shown for: the real library if there is one
    LIBKRUN=$FAKEKRUN
fi

rm -rf "$DEMO"
mkdir -p "$DEMO/rootfs/bin" "$DEMO/rootfs/tmp" "$DEMO/rootfs/proc" "$DEMO/rootfs/sys" \
    "$DEMO/rootfs/dev"
cp /bin/busybox "$DEMO/rootfs/bin/busybox"
for applet in sh echo cat sleep uname seq date env ls nc; do ln -s busybox "$DEMO/rootfs/bin/$applet"; done

say() { printf '\n\033[1m### %s\033[0m\n' "$*"; }
run() { printf '$'; printf ' %q' "$@"; printf '\n'; "$@"; }
msbctl() { "$BIN/msbctl" --socket "$SOCK" "$@"; }

if [ "$REAL" = 1 ]; then
    echo "Real microVMs: libkrun $LIBKRUN on a KVM that boots a guest kernel."
else
    cat <<NOTE
NOTE: this host cannot run real microVMs (\`msbd doctor\` says why: here, most likely a
/dev/kvm served by kvm_pvm, or no libkrun), so this demo launches sandboxes with the
libkrun TEST DOUBLE from tests/fakekrun: it runs the workload as a plain child process,
NOT in a VM. Everything else (daemon, socket, database, worker, fd checks, timers) is the
real thing. \`make demo-vm\` runs this same demo with real microVMs inside a QEMU guest.
NOTE
    "$BIN/python" -m msbd.vm doctor --libkrun "$CHECKED" | sed 's/^/  doctor: /' || true
fi

say "start the daemon (msbd serve) in the background"
printf '$ msbd serve --socket %s --state-dir %s --libkrun %s &\n' "$SOCK" "$DEMO/state" "$LIBKRUN"
"$BIN/msbd" serve --socket "$SOCK" --state-dir "$DEMO/state" --libkrun "$LIBKRUN" \
    2>"$DEMO/daemon.log" &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null || true' EXIT
for _ in $(seq 600); do  # Python starts slowly under emulation (make demo-vm)
    msbctl ping >/dev/null 2>&1 && break
    kill -0 $DAEMON 2>/dev/null || { cat "$DEMO/daemon.log"; exit 1; }
    sleep 0.1
done

say "the daemon answers"
run msbctl ping
run msbctl info

say "a raw JSON-RPC client works too (one JSON object per line)"
"$BIN/python" - "$SOCK" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
for line in (b'{"jsonrpc":"2.0","id":1,"method":"daemon.ping"}',
             b'[{"jsonrpc":"2.0","id":2,"method":"sandbox.get","params":{"name":"nope"}},'
             b'{"jsonrpc":"2.0","id":3,"method":"sandbox.list","params":{"state":"bogus"}}]'):
    print("-->", line.decode())
    s.sendall(line + b"\n")
    print("<--", s.makefile("rb").readline().decode().strip())
PY

say "launch a sandbox that says hello, then idles (idle timeout 60 s)"
run msbctl run hello --rootfs "$DEMO/rootfs" --memory 256 --idle-timeout 60 -l demo=yes \
    -- /bin/sh -c 'echo hello from $(uname -s) $(uname -r) inside the sandbox; seq 1 3; exec sleep 600'
for _ in $(seq 1200); do  # a real guest boots first: wait for its first line
    msbctl logs hello | grep -q hello && break
    sleep 0.1
done
run msbctl ls
run msbctl metrics hello
run msbctl logs hello

say "stop it (SIGTERM to the worker, which asks the guest to shut down)"
run msbctl stop hello
run msbctl ls

say "a server with a published port: no network for the guest, one way in for clients"
run msbctl run web --rootfs "$DEMO/rootfs" --memory 256 -p 127.0.0.1:18080:8080 \
    -- /bin/sh -c 'exec nc -ll -p 8080 -e echo hello through a published port'
for _ in $(seq 1200); do  # until the guest's server answers (the relay closes until then)
    answer=$(/bin/busybox nc 127.0.0.1 18080 </dev/null 2>/dev/null || true)
    [ -n "$answer" ] && break
    sleep 0.1
done
echo "\$ busybox nc 127.0.0.1 18080"
echo "$answer"
run msbctl ls
run msbctl stop web

say "a batch job: run --wait prints its output and exits with its exit code"
set +e
run msbctl run job --rootfs "$DEMO/rootfs" --wait -- /bin/sh -c 'echo computing; echo done; exit 3'
code=$?
set -e
echo "(msbctl exited with $code, the sandbox's exit code)"

say "a sandbox with a max duration of 2 s is ended by the daemon's timer"
run msbctl run short --rootfs "$DEMO/rootfs" --max-duration 2 -- /bin/sleep 600
run msbctl wait short || true
run msbctl ls

say "every state change is in the events log"
run msbctl events --since 0 --no-follow

say "remove the records"
for name in hello web job short; do run msbctl rm "$name"; done
run msbctl ls

say "stop the daemon (SIGTERM): in-flight calls finish, sandboxes stop, exit status 0"
kill -TERM $DAEMON
wait $DAEMON && echo "msbd exited with status 0"
trap - EXIT
