//! Command-line front ends: `agent` (the daemon), `observe` (print flows),
//! `status` (a running agent's state) and `policy` (check and explain
//! intended policy).

pub mod agent;
pub mod observe;
pub mod status;
