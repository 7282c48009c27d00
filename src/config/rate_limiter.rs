//! Rate limiters and the disk I/O engine, in Firecracker's shape: a bandwidth bucket and an
//! operations bucket, each `{size, one_time_burst, refill_time}` (refill_time in ms).

use super::ConfigError;

/// One token bucket: `size` tokens, refilled completely every `refill_time` ms, plus
/// `one_time_burst` tokens spent first and never refilled. A size or refill time of 0 limits
/// nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds (bytes for bandwidth, requests for ops).
    pub size: u64,
    /// Extra tokens at the start, spent before the bucket's.
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill an empty bucket.
    pub refill_time: u64,
}

/// A limiter: bandwidth (bytes) and operations (requests or frames), either or both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default)]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Requests (disk) or frames (network).
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

/// Longest refill time accepted: a day (longer is a mistake, and overflows nothing below it).
const MAX_REFILL_MS: u64 = 24 * 3600 * 1000;

impl RateLimiterConfig {
    /// A refill time over a day is refused; a zero one (or zero size) turns the bucket off.
    pub fn validate(&self, device: &str) -> Result<(), ConfigError> {
        for bucket in [self.bandwidth, self.ops].into_iter().flatten() {
            if bucket.refill_time > MAX_REFILL_MS {
                return Err(ConfigError::BadRateLimiter(format!(
                    "{device}: refill_time {} ms is over a day",
                    bucket.refill_time
                )));
            }
        }
        Ok(())
    }
}

/// How a disk's requests run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IoEngine {
    /// io_uring where the kernel allows it (many requests in flight), else `Sync` with one
    /// log line.
    #[default]
    Auto,
    /// io_uring (Firecracker's `Async`); refused at start if the kernel does not allow it.
    Async,
    /// One request at a time, on the event loop.
    Sync,
}

impl std::str::FromStr for IoEngine {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(IoEngine::Auto),
            "io_uring" | "async" | "Async" => Ok(IoEngine::Async),
            "sync" | "Sync" => Ok(IoEngine::Sync),
            _ => Err(format!(
                "unknown I/O engine {s:?}: expected io_uring, sync or auto"
            )),
        }
    }
}

/// Parses `size/refill_ms[/burst]`, e.g. `1048576/1000` (1 MiB per second).
pub fn parse_bucket(value: &str) -> Result<TokenBucketConfig, String> {
    let bad = || format!("bad rate {value:?}: expected SIZE/REFILL_MS[/ONE_TIME_BURST]");
    let mut parts = value.split('/');
    let mut next = || -> Result<Option<u64>, String> {
        parts
            .next()
            .map(|p| p.parse::<u64>().map_err(|_| bad()))
            .transpose()
    };
    let size = next()?.ok_or_else(bad)?;
    let refill_time = next()?.ok_or_else(bad)?;
    let one_time_burst = next()?;
    if next()?.is_some() {
        return Err(bad());
    }
    Ok(TokenBucketConfig {
        size,
        one_time_burst,
        refill_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_parse_with_and_without_a_burst() {
        let b = parse_bucket("1048576/1000").unwrap();
        assert_eq!(
            (b.size, b.refill_time, b.one_time_burst),
            (1 << 20, 1000, None)
        );
        let b = parse_bucket("100/10/500").unwrap();
        assert_eq!(b.one_time_burst, Some(500));
        for bad in ["", "1", "1/x", "1/2/3/4", "-1/100"] {
            assert!(parse_bucket(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn engines_parse_and_overlong_refills_are_refused() {
        assert_eq!("io_uring".parse::<IoEngine>(), Ok(IoEngine::Async));
        assert_eq!("sync".parse::<IoEngine>(), Ok(IoEngine::Sync));
        assert!("aio".parse::<IoEngine>().is_err());
        let limiter = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time: MAX_REFILL_MS + 1,
            }),
            ops: None,
        };
        assert!(limiter.validate("vda").is_err());
    }
}
