//! convert (to be written).
