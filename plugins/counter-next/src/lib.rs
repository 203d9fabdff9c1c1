//! The next release of `counter`: the same code under version 0.2.0, for
//! upgrade and rollback tests.

#[path = "../../counter/src/lib.rs"]
mod counter;
