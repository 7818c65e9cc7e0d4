//! compare (to be written).
