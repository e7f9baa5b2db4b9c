//! Waiting on a condition with a deadline: the only way these tests synchronise with the
//! gateway.

use std::time::{Duration, Instant};

/// How often a condition is checked.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Checks `condition` until it returns `Ok`, or panics after `timeout` saying what was
/// awaited and what the condition last reported.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    condition: impl FnMut() -> Result<T, String>,
) -> T {
    wait_until_every(timeout, POLL_INTERVAL, what, condition)
}

/// [`wait_until`] for conditions that are expensive to check (an admin command that lists
/// the bucket), checked every `interval`.
pub fn wait_until_every<T>(
    timeout: Duration,
    interval: Duration,
    what: &str,
    mut condition: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match condition() {
            Ok(value) => return value,
            Err(last) => last,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        std::thread::sleep(interval);
    }
}
