"""`python -m msbd.vm`: run the worker, `python -m msbd.vm doctor`, or `... zygote`."""

import sys

# Start-up time is launch latency. msgspec uses typing_extensions only when it
# is importable, and on Python >= 3.11 the standard typing module has all it
# needs; importing typing_extensions (and the inspect module it pulls in) is
# about a quarter of the worker's import time. Nothing else here uses it.
sys.modules.setdefault("typing_extensions", None)  # type: ignore[arg-type]

if sys.argv[1:] == ["zygote"]:  # the fork server (msbd.vm.zygote), which imports main
    from msbd.vm.zygote import serve

    sys.exit(serve())

from msbd.vm.main import main  # noqa: E402 - after the block above

sys.exit(main())
