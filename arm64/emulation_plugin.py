"""pytest plugin for the emulated aarch64 run (arm64/emulated-test.sh loads it with -p).

Under qemu user-mode emulation everything runs a hundred times slower or more, and
hypothesis' ``too_slow`` health check fails property tests whose data generation is merely
slow. Loaded before the test modules are imported, so that their own ``@settings`` inherit it;
it changes nothing else (the number of examples stays as each test sets it).
"""

from hypothesis import HealthCheck, settings

settings.register_profile("emulated", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("emulated")
