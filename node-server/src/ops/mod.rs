//! Answers for operators: [`explain`] (`iamlinkd explain`, `status`) from [`diagnose`] (the store
//! and the kernel) and [`local_api`] (the running daemon's own view, on a Unix socket).

pub mod attachments;
pub mod diagnose;
pub mod explain;
pub mod local_api;
