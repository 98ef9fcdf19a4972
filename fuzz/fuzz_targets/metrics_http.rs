//! The metrics server's request handling (pipelines/src/metrics.rs): the bytes of a request
//! arriving in chunks the fuzzer chooses, gathered until `head_complete` (incremental, checked
//! against a whole search) or the size bound as the connection thread does, then
//! `parse_request`.
//!
//! Input: a chunk size byte (0: one chunk), then the bytes the client sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipelines::metrics::{head_complete, parse_request, Page, Request};
use tcpcopy_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let chunk = match input.byte() {
        0 => usize::MAX,
        n => usize::from(n),
    };
    let sent = input.rest();
    let mut head = Vec::new();
    let mut scanned = 0;
    for bytes in sent.chunks(chunk) {
        if head_complete(&head, scanned) {
            break;
        }
        // The incremental search agrees with a search of the whole head (checked on short
        // heads only: the whole search on every chunk is the quadratic cost being avoided).
        if head.len() <= 64 {
            assert!(!head_complete(&head, 0));
        }
        scanned = head.len();
        head.extend_from_slice(bytes);
        if head.len() > 8192 {
            return;
        }
    }
    assert_eq!(head_complete(&head, scanned), head_complete(&head, 0));
    let Request { page, with_body } = parse_request(&head);
    let line = String::from_utf8_lossy(&head);
    let method = line.split_whitespace().next().unwrap_or("");
    if page != Page::MethodNotAllowed {
        assert!(method == "GET" || method == "HEAD");
        assert_eq!(with_body, method == "GET");
    }
    // A request line is all that matters: the same head twice says the same.
    assert_eq!(parse_request(&head), Request { page, with_body });
});
