//! Command-line front ends: `agent` (the daemon), `observe` (print flows)
//! and `policy` (check and explain intended policy).

pub mod agent;
pub mod observe;
