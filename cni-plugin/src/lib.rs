//! The `iamlink` CNI plugin as a library: input parsing, commands and netlink work, so that
//! tests, fuzzers and benchmarks drive the same code as the binary.

pub mod commands;
pub mod daemon;
pub mod error;
pub mod guard;
pub mod log_file;
pub mod netconf;
pub mod podnet;
