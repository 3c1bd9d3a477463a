//! The shared harness of the real-guest tests.
