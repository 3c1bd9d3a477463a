//! Runnable examples; see the `examples/` binaries.
