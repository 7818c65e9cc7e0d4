//! map (to be written).
