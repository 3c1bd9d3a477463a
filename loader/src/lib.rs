//! Attaches to a guest, traps its crashes, runs the repair kernel, resumes it.
