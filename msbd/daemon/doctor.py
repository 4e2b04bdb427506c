"""Host checks for `daemon.info`, made by the worker's own code in a worker-like process.

The daemon never loads libkrun itself (only workers do, through ctypes), so
it asks `python -m msbd.vm doctor --json` what a worker would find: the
hardware virtualization flag, /dev/kvm access and whether it is `kvm_pvm`,
libkrun (and where), libkrunfw. The answer is cached; `refresh` runs it again.
"""

from __future__ import annotations

import logging
import time

import anyio
import msgspec

from msbd.contract import CheckInfo, HostReport

log = logging.getLogger("msbd.doctor")


_DECODER = msgspec.json.Decoder(HostReport)
_MAX_AGE = 30.0


class HostCheck:
    def __init__(self, *, python: str, libkrun: str | None, env: dict[str, str]) -> None:
        self._argv = [python, "-m", "msbd.vm", "doctor", "--json"]
        if libkrun is not None:
            self._argv += ["--libkrun", libkrun]
        self._env = env
        self.report = HostReport(libkrun_problem="not checked yet")
        self._checked_at = -_MAX_AGE
        self._lock = anyio.Lock()

    async def refresh(self, *, max_age: float = 0.0) -> HostReport:
        async with self._lock:
            if time.monotonic() - self._checked_at < max_age:
                return self.report
            try:
                with anyio.fail_after(20):
                    done = await anyio.run_process(self._argv, env=self._env, check=False)
                self.report = _DECODER.decode(done.stdout)
            except (OSError, TimeoutError, msgspec.DecodeError) as exc:
                log.warning("host check failed: %s", exc)
                self.report = HostReport(
                    checks=[CheckInfo(name="doctor", ok=False, detail=f"host check failed: {exc}",
                                      hint="run `msbd doctor` by hand to see why")],
                    libkrun_problem=f"host check failed: {exc}")
            self._checked_at = time.monotonic()
            return self.report
