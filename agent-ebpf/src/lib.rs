#![no_std]
// The programs live in the binary target (main.rs); this empty library lets
// the agent name this crate as a build-dependency so cargo rebuilds it on change.
