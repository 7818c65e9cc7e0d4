//! Fuzz the repair: arbitrary bytes (mutations of the valid seeds in
//! `corpus/open_image`) are opened for repair and repaired as `check -r all`
//! does. The repair must keep its promise: afterwards no cluster an entry names
//! has a refcount below its references, so no referenced cluster can be handed
//! out again. Errors opening or repairing are expected; a broken promise, a
//! panic or a hang is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = strata_format::fuzzing::repair_all(data) {
        panic!("{broken}");
    }
});
