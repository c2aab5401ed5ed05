"""The LEGO runtime: sampler and (later) backends and brick schedules. Needs no torch."""
