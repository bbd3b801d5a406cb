//! What a TCP connection carries on the wire (work in progress).
