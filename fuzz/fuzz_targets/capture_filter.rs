//! The `--capture-filter` parser on arbitrary text, and the parsed filter on
//! arbitrary frames: parsing never panics, a refusal is one non-empty line, a
//! parsed filter prints in a form that parses back to the same filter, and
//! `matches_frame` agrees with `packet::parse` + `matches`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vsnoop::attribution::packet;
use vsnoop::export::capture::CaptureFilter;

fuzz_target!(|data: &[u8]| {
    // First byte: length of the filter text; the rest is a frame.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n).min(rest.len());
    let (text, frame) = rest.split_at(n);
    let text = String::from_utf8_lossy(text);
    match text.parse::<CaptureFilter>() {
        Ok(filter) => {
            assert!(!filter.terms().is_empty());
            let printed = filter.to_string();
            let again: CaptureFilter = printed
                .parse()
                .unwrap_or_else(|e| panic!("{printed:?} (from {text:?}) refused: {e}"));
            assert_eq!(again, filter, "{text:?} printed as {printed:?}");
            let expected = packet::parse(frame).is_some_and(|m| filter.matches(&m));
            assert_eq!(filter.matches_frame(frame), expected);
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.is_empty());
            assert!(!message.contains('\n'), "{message:?}");
        }
    }
});
