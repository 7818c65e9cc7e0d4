//! Fuzz the qcow2 opening path: arbitrary bytes are opened as an image, read,
//! walked, their snapshots listed and the image checked. Errors are expected;
//! panics, hangs and unbounded allocations are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = strata_format::fuzzing::exercise(data);
});
