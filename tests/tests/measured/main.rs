//! Tests that measure the bytes this process read (`rchar`) while an in-process server works, or
//! that stall loads on purpose: a binary of their own, and one test at a time ([`ONE_AT_A_TIME`]),
//! so no other test's reads blur their figures. RSS is measured in `memory`, alone.

mod budget;
mod cancel_bound;

/// Held by every test of this binary for its whole run: they run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
