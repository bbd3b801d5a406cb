//! Where flow events leave the agent: the JSON-lines export file (and, as
//! they land, metrics and the gRPC stream).

pub mod file;
