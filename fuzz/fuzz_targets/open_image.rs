//! Fuzz the qcow2 opening path: arbitrary bytes are opened as an image, read,
//! walked, their snapshots and bitmaps listed and the image checked; then a copy
//! is opened read-write and written. Errors are expected; panics, hangs and
//! unbounded allocations are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = strata_format::fuzzing::exercise(data);
    let _ = strata_format::fuzzing::exercise_write(data);
});
