//! Token-bucket rate limiters with Firecracker's semantics, for disks and network interfaces.
//!
//! A limiter has up to two buckets: bandwidth (tokens are bytes) and operations (a token per
//! request or frame). Each bucket holds `size` tokens and gains `size` of them every
//! `refill_time` ms, continuously; `one_time_burst` tokens come on top, once, and are spent
//! first. A request is let through when every bucket holds what it costs, or, for a request
//! larger than a bucket, when that bucket is full (it then goes into debt and the next requests
//! wait for it to be paid). A request that is refused waits: the device stops taking requests
//! and arms the limiter's timer for the moment the buckets will hold enough; the event loop
//! watches the timer's descriptor, so a throttled queue costs nothing while it waits.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::config::{RateLimiterConfig, TokenBucketConfig};

/// Nanoseconds per millisecond.
const NS_PER_MS: u128 = 1_000_000;
/// The shortest wait the timer is armed for: a refill finer than this is not worth a wake-up.
const MIN_WAIT: Duration = Duration::from_micros(100);

/// One bucket, its time given by the caller (nanoseconds on any monotonic clock), so its
/// arithmetic is tested without waiting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u128,
    /// Tokens now; negative while a request larger than the bucket is being paid for.
    budget: i128,
    /// Burst tokens left (never refilled).
    burst: u64,
    /// When `budget` was last brought up to date.
    last_update: u128,
}

impl TokenBucket {
    /// A full bucket, as configured; `None` when it limits nothing (size or refill time 0).
    pub fn new(config: &TokenBucketConfig, now: u128) -> Option<Self> {
        if config.size == 0 || config.refill_time == 0 {
            return None;
        }
        Some(TokenBucket {
            size: config.size,
            refill_ns: u128::from(config.refill_time) * NS_PER_MS,
            budget: i128::from(config.size),
            burst: config.one_time_burst.unwrap_or(0),
            last_update: now,
        })
    }

    /// Adds the tokens earned since the last update; a full bucket banks no time.
    fn refill(&mut self, now: u128) {
        let elapsed = now.saturating_sub(self.last_update);
        let size = u128::from(self.size);
        let earned = elapsed * size / self.refill_ns;
        if earned == 0 {
            return;
        }
        // Advance by the time those tokens took, keeping the remainder for the next refill.
        self.last_update += earned * self.refill_ns / size;
        let full = i128::from(self.size);
        self.budget = (self.budget + i128::try_from(earned).unwrap_or(i128::MAX)).min(full);
        if self.budget == full {
            self.last_update = now;
        }
    }

    /// Whether `tokens` may be taken now.
    fn can_take(&mut self, tokens: u64, now: u128) -> bool {
        self.refill(now);
        if tokens <= self.burst {
            return true;
        }
        let needed = (tokens - self.burst).min(self.size);
        self.budget >= i128::from(needed)
    }

    /// Takes `tokens` (after [`Self::can_take`] said yes): burst first, then the budget.
    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(tokens - from_burst);
    }

    /// How long until `tokens` may be taken (zero if now).
    fn wait_for(&mut self, tokens: u64, now: u128) -> Duration {
        if self.can_take(tokens, now) {
            return Duration::ZERO;
        }
        let needed = i128::from((tokens - self.burst).min(self.size));
        let missing = u128::try_from(needed - self.budget).unwrap_or(0);
        let size = u128::from(self.size);
        // Time to earn the missing tokens, less what has accrued since the last update.
        let total = (missing * self.refill_ns).div_ceil(size);
        let accrued = now.saturating_sub(self.last_update);
        let ns = total.saturating_sub(accrued).max(1);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Tokens available now (the burst included), for tests and metrics.
    pub fn available(&mut self, now: u128) -> i128 {
        self.refill(now);
        self.budget + i128::from(self.burst)
    }
}

/// The time source: the monotonic clock, or a test's.
pub type Clock = fn() -> u128;

fn monotonic_ns() -> u128 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos()
}

/// A bandwidth and an operations bucket and what a refused request waits on.
#[derive(Debug, Default)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    clock: Option<Clock>,
    /// A refused request waits for this long from `blocked_at`.
    blocked: bool,
}

impl RateLimiter {
    /// A limiter as configured (one that limits nothing when `config` is `None`).
    pub fn new(config: Option<&RateLimiterConfig>) -> Self {
        Self::with_clock(config, monotonic_ns)
    }

    /// A limiter on `clock` (tests).
    pub fn with_clock(config: Option<&RateLimiterConfig>, clock: Clock) -> Self {
        let now = clock();
        let bucket = |b: Option<&TokenBucketConfig>| b.and_then(|b| TokenBucket::new(b, now));
        RateLimiter {
            bandwidth: bucket(config.and_then(|c| c.bandwidth.as_ref())),
            ops: bucket(config.and_then(|c| c.ops.as_ref())),
            clock: Some(clock),
            blocked: false,
        }
    }

    fn now(&self) -> u128 {
        self.clock.unwrap_or(monotonic_ns)()
    }

    /// Whether the limiter limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Takes a request of `bytes` if both buckets allow it; otherwise returns how long to
    /// wait before asking again (and takes nothing).
    pub fn consume(&mut self, bytes: u64) -> Result<(), Duration> {
        let now = self.now();
        let mut wait = Duration::ZERO;
        if let Some(b) = &mut self.bandwidth {
            wait = wait.max(b.wait_for(bytes, now));
        }
        if let Some(o) = &mut self.ops {
            wait = wait.max(o.wait_for(1, now));
        }
        if !wait.is_zero() {
            self.blocked = true;
            return Err(wait.max(MIN_WAIT));
        }
        if let Some(b) = &mut self.bandwidth {
            b.take(bytes);
        }
        if let Some(o) = &mut self.ops {
            o.take(1);
        }
        self.blocked = false;
        Ok(())
    }

    /// Whether the last request was refused (the device waits for the timer).
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer fired (or the configuration changed): requests may be tried again.
    pub fn unblock(&mut self) {
        self.blocked = false;
    }

    /// The bandwidth bucket (tests).
    pub fn bandwidth(&mut self) -> Option<&mut TokenBucket> {
        self.bandwidth.as_mut()
    }
}

/// A non-blocking monotonic timerfd: the wake-up of a throttled device, watched by the event
/// loop. Reading it after it was re-armed finds nothing instead of blocking.
#[derive(Debug)]
pub struct Timer {
    fd: OwnedFd,
    /// When it fires, if armed.
    deadline: Option<Instant>,
}

impl Timer {
    /// A disarmed timer.
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: creates a descriptor; the result is checked before it is owned.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Timer { fd, deadline: None })
    }

    /// Fires once after `after`, or earlier if already armed to (one timer serves both of an
    /// interface's directions: whichever wakes first asks again and re-arms for the other).
    pub fn arm(&mut self, after: Duration) {
        let deadline = Instant::now() + after;
        if self.deadline.is_some_and(|d| d <= deadline) {
            return;
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(after.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::from(after.subsec_nanos().max(1)),
            },
        };
        // SAFETY: settime on our own timerfd with a valid itimerspec; the result is checked.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                0,
                &raw const spec,
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            log::error!(
                "rate limiter: cannot arm its timer: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        self.deadline = Some(deadline);
    }

    /// The event loop saw the timer readable: consume the expiration.
    pub fn fired(&mut self) {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into `count` from our own non-blocking timerfd.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&raw mut count).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        self.deadline = None;
    }

    /// The descriptor to watch for input.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    const MS: u128 = 1_000_000;

    fn bucket(size: u64, burst: u64, refill_ms: u64) -> TokenBucket {
        let config = TokenBucketConfig {
            size,
            one_time_burst: Some(burst),
            refill_time: refill_ms,
        };
        TokenBucket::new(&config, 0).unwrap()
    }

    #[test]
    fn a_bucket_refills_at_size_per_refill_time() {
        let mut b = bucket(1000, 0, 1000);
        assert!(b.can_take(1000, 0));
        b.take(1000);
        assert_eq!(b.available(0), 0);
        assert!(!b.can_take(1, 0));
        assert_eq!(b.available(250 * MS), 250);
        assert_eq!(b.available(1000 * MS), 1000);
        // Full: no more is banked, however long it waits.
        assert_eq!(b.available(5000 * MS), 1000);
    }

    #[test]
    fn the_wait_is_the_time_the_missing_tokens_take() {
        let mut b = bucket(1000, 0, 1000);
        b.take(1000);
        assert_eq!(b.wait_for(500, 0), Duration::from_millis(500));
        assert_eq!(b.wait_for(500, 100 * MS), Duration::from_millis(400));
        assert_eq!(b.wait_for(500, 500 * MS), Duration::ZERO);
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_never_refilled() {
        let mut b = bucket(100, 300, 1000);
        assert!(b.can_take(300, 0));
        b.take(300);
        assert_eq!(b.available(0), 100, "the bucket itself is untouched");
        b.take(100);
        assert_eq!(b.available(1000 * MS), 100, "refill stops at size");
    }

    #[test]
    fn a_request_larger_than_the_bucket_waits_for_a_full_bucket_then_goes_into_debt() {
        let mut b = bucket(1000, 0, 1000);
        b.take(10);
        assert!(!b.can_take(3000, 0), "not full");
        assert!(b.can_take(3000, 10 * MS));
        b.take(3000);
        assert_eq!(b.available(10 * MS), -2000);
        // The debt is paid before anything else goes through.
        assert_eq!(b.wait_for(1, 10 * MS), Duration::from_millis(2001));
    }

    #[test]
    fn zero_size_or_refill_limits_nothing() {
        let off = TokenBucketConfig {
            size: 0,
            one_time_burst: None,
            refill_time: 100,
        };
        assert!(TokenBucket::new(&off, 0).is_none());
        let off = TokenBucketConfig {
            size: 10,
            one_time_burst: None,
            refill_time: 0,
        };
        assert!(TokenBucket::new(&off, 0).is_none());
        assert!(RateLimiter::new(None).is_unlimited());
    }

    static NOW: AtomicU64 = AtomicU64::new(0);
    fn test_clock() -> u128 {
        u128::from(NOW.load(Ordering::SeqCst))
    }

    #[test]
    fn a_limiter_takes_from_both_buckets_or_from_neither() {
        NOW.store(0, Ordering::SeqCst);
        let config = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 4096,
                one_time_burst: None,
                refill_time: 1000,
            }),
            ops: Some(TokenBucketConfig {
                size: 2,
                one_time_burst: None,
                refill_time: 1000,
            }),
        };
        let mut limiter = RateLimiter::with_clock(Some(&config), test_clock);
        assert_eq!(limiter.consume(1024), Ok(()));
        assert_eq!(limiter.consume(1024), Ok(()));
        // Bandwidth is left, operations are not: nothing is taken.
        let wait = limiter.consume(1024).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(limiter.is_blocked());
        assert_eq!(limiter.bandwidth().unwrap().available(0), 2048);
        NOW.store(500_000_000, Ordering::SeqCst);
        assert_eq!(limiter.consume(1024), Ok(()));
        assert!(!limiter.is_blocked());
    }

    #[test]
    fn a_timer_fires_once_and_reads_nothing_when_rearmed() {
        let mut timer = Timer::new().unwrap();
        timer.arm(Duration::from_millis(1));
        let mut pfd = libc::pollfd {
            fd: timer.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd.
        let ready = unsafe { libc::poll(&raw mut pfd, 1, 5000) };
        assert_eq!(ready, 1);
        timer.fired();
        // Nothing pending: a second read must not block.
        timer.fired();
        timer.arm(Duration::from_secs(60));
        timer.fired();
    }
}
