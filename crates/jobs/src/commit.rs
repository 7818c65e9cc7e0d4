//! commit job (to be written).
