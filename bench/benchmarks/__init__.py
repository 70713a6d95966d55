"""airspeed velocity (asv) benchmarks; configuration in ``asv.conf.json`` at the repository root."""
