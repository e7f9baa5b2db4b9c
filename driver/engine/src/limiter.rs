//! The upload bandwidth limit: one token bucket shared by every volume of an engine, so the
//! limit is the gateway's, not each volume's (DESIGN.md §6: the operator sets it, possibly on
//! a schedule, through the control channel).
//!
//! Uploads take their bytes before they start and may go into debt by up to one segment: an
//! upload never waits for a bucket that can never hold a whole segment, and the average rate
//! still keeps to the limit. Changing the limit wakes every waiting upload.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;

#[derive(Debug)]
pub struct UploadLimiter {
    /// Bytes per second; 0 means no limit.
    rate: AtomicU64,
    bucket: Mutex<Bucket>,
    changed: Notify,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may be sent now; negative is debt.
    available: f64,
    refilled: Instant,
}

impl Default for UploadLimiter {
    fn default() -> Self {
        UploadLimiter {
            rate: AtomicU64::new(0),
            bucket: Mutex::new(Bucket {
                available: 0.0,
                refilled: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }
}

impl UploadLimiter {
    /// Sets the limit in bytes per second; 0 lifts it.
    pub fn set_rate(&self, bytes_per_second: u64) {
        self.rate.store(bytes_per_second, Ordering::Release);
        self.changed.notify_waiters();
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Acquire)
    }

    /// Waits until `bytes` may be uploaded under the limit.
    pub async fn acquire(&self, bytes: u64) {
        loop {
            let rate = self.rate();
            if rate == 0 {
                return;
            }
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wait = {
                let mut bucket = self.bucket.lock().await;
                let now = Instant::now();
                let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
                // At most one second's worth is saved up, so an idle gateway does not burst
                // far above its limit.
                #[allow(clippy::cast_precision_loss)]
                let rate_f = rate as f64;
                bucket.available = (bucket.available + elapsed * rate_f).min(rate_f);
                bucket.refilled = now;
                if bucket.available >= 0.0 {
                    #[allow(clippy::cast_precision_loss)]
                    let cost = bytes as f64;
                    bucket.available -= cost;
                    return;
                }
                Duration::from_secs_f64(-bucket.available / rate_f)
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = &mut changed => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn uploads_keep_to_the_rate_on_average() {
        let limiter = UploadLimiter::default();
        limiter.set_rate(1 << 20);
        let started = Instant::now();
        for _ in 0..8 {
            limiter.acquire(1 << 20).await;
        }
        // The first MiB goes at once (the bucket starts empty but not in debt), each next one
        // a second later.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_secs(7) && elapsed < Duration::from_secs(9),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_limit_never_waits_and_lifting_it_wakes_waiters() {
        let limiter = std::sync::Arc::new(UploadLimiter::default());
        let started = Instant::now();
        limiter.acquire(1 << 30).await;
        assert_eq!(started.elapsed(), Duration::ZERO);

        limiter.set_rate(1024);
        limiter.acquire(1 << 20).await; // into debt: the next one waits about 1024 s
        let waiter = {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.acquire(1 << 20).await })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished());
        limiter.set_rate(0);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("lifting the limit wakes the waiting upload")
            .unwrap();
    }
}
