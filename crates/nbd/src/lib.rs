//! NBD server (to be written).
