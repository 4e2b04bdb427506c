# msbd: `make demo` runs the main job end to end, `make test` runs every check.
# Both set everything up first (system packages, virtualenv, the libkrun test double).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup system-deps venv fakekrun libkrun lane-deps test lint typecheck pytest vm-test \
	systemd-test \
	demo demo-vm \
	bench bench-vm clean

setup: system-deps venv fakekrun

system-deps:
	@scripts/system-deps.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

fakekrun:
	@$(MAKE) -s -C tests/fakekrun

# The real libkrun (crates.io, pinned) with msbd's guest init, and the pinned libkrunfw,
# built into a cache outside the checkout (docs/libkrun.md); prints the lib directory.
libkrun:
	@scripts/build-libkrun

lint: venv
	$(BIN)/ruff check msbd tests $(wildcard bench)

typecheck: venv
	$(BIN)/mypy

# The nested-KVM lane's packages (QEMU, a kernel) before any test starts the lane, so no
# test sees them being installed; then the system packages again: Debian's QEMU can
# replace a newer qemu-utils and so take qemu-img away.
lane-deps:
	@scripts/nested-kvm.d/deps.sh
	@scripts/system-deps.sh

pytest: setup lane-deps
	$(BIN)/pytest

# Real guests (pytest -m vm): here if this host's KVM can boot a kernel, else inside
# scripts/nested-kvm; never skipped.
vm-test: setup libkrun
	@scripts/vm-test

# msbd's units under a real systemd as PID 1 (pytest -m systemd), inside
# scripts/nested-kvm --systemd: socket activation, READY/STATUS, stop, watchdog, hardening,
# real guests through the service.
systemd-test: setup libkrun
	@scripts/systemd-test

test: setup lint typecheck pytest vm-test systemd-test

demo: setup
	@scripts/demo.sh

# The same demo with real microVMs, inside scripts/nested-kvm (for hosts whose own KVM
# cannot boot a guest kernel, like kvm_pvm).
demo-vm: setup libkrun
	@scripts/nested-kvm --env DEMO_DIR=/tmp/msbd-demo -- scripts/demo.sh

bench: setup
	$(BIN)/pip install -q -r bench/requirements.txt
	$(BIN)/python -m bench.run

# Real guests: msbd's sandbox.run against microsandbox's `msb run`, in scripts/nested-kvm
# (BENCHMARKS.md, section 4). BENCH_VM_ARGS goes to bench.vm_launch (e.g. --rounds 9);
# BENCH_VM_TIMEOUT bounds the whole run (a wedged nested guest ends there, status 124).
BENCH_VM_TIMEOUT ?= 1800
bench-vm: setup libkrun
	@echo "bench-vm: host load before: $$(cat /proc/loadavg)"
	@lib=$$(scripts/build-libkrun --print-dir) && \
	scripts/nested-kvm --memory 6144 --timeout $(BENCH_VM_TIMEOUT) --env PYTHONUNBUFFERED=1 \
	    --env MSBD_TEST_LIBKRUN="$$lib/libkrun.so.1" -- \
	    $(BIN)/python -m bench.vm_launch $(BENCH_VM_ARGS); \
	status=$$?; echo "bench-vm: host load after: $$(cat /proc/loadavg)"; exit $$status

clean:
	rm -rf $(VENV) .demo build *.egg-info
	@$(MAKE) -s -C tests/fakekrun clean
	@$(MAKE) -s -C guest/init clean
