//! rebase job (to be written).
