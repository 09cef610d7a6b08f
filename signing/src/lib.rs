//! Offline verification of signed programs (work in progress).
