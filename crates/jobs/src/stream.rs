//! stream job (to be written).
