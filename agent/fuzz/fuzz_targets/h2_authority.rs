#![no_main]
//! Any bytes from a client through the `:authority` rewriter that lets
//! stock gRPC clients use the agent's Unix socket: it must never panic, and
//! how the bytes arrive (one read or many) must not change what the server
//! reads or whether the connection is refused. The first byte picks the
//! read sizes; the second whether the client preface comes first (without
//! it most inputs stop at the preface check, as a non-HTTP/2 client does).

use flowaudit::export::h2_authority::Rewriter;
use libfuzzer_sys::fuzz_target;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let [step, mode, rest @ ..] = data else {
        return;
    };
    let mut input = Vec::with_capacity(PREFACE.len() + rest.len());
    if mode & 1 == 1 {
        input.extend_from_slice(PREFACE);
    }
    input.extend_from_slice(rest);

    let mut whole_out = Vec::new();
    let whole = Rewriter::new().feed(&input, &mut whole_out);

    let step = usize::from(*step % 64) + 1;
    let mut chunked = Rewriter::new();
    let mut chunked_out = Vec::new();
    let mut chunked_result = Ok(());
    for chunk in input.chunks(step) {
        chunked_result = chunked.feed(chunk, &mut chunked_out);
        if chunked_result.is_err() {
            break;
        }
    }
    match (&whole, &chunked_result) {
        (Ok(()), Ok(())) => assert_eq!(
            whole_out, chunked_out,
            "reads of {step} bytes changed what the server reads"
        ),
        (Err(_), Err(_)) => {}
        _ => panic!(
            "reads of {step} bytes changed the outcome: whole {whole:?}, chunked {chunked_result:?}"
        ),
    }
});
