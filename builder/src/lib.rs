//! Builds and reads repair images.
