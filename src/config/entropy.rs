//! The virtio-rng (entropy) device: optional, with an optional rate limiter.

use std::str::FromStr;

use super::{ConfigError, RateLimiterConfig, parse_bucket};

/// virtio-rng: random bytes from the host for the guest's generator (Firecracker's
/// `EntropyDevice`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    /// Limits the bytes (`bandwidth`) and requests (`ops`) the guest gets; `None`: unlimited.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl EntropyConfig {
    /// Checks the rate limiter.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.rate_limiter {
            Some(limiter) => limiter.validate("entropy device"),
            None => Ok(()),
        }
    }
}

/// `--entropy` takes nothing (unlimited) or `bw=SIZE/MS[/BURST],ops=SIZE/MS[/BURST]`.
impl FromStr for EntropyConfig {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut limiter = RateLimiterConfig::default();
        for item in value.split(',').filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                Some(("bw", rate)) => limiter.bandwidth = Some(parse_bucket(rate)?),
                Some(("ops", rate)) => limiter.ops = Some(parse_bucket(rate)?),
                _ => return Err(format!("unknown item {item:?}: expected bw=... or ops=...")),
            }
        }
        let limited = limiter.bandwidth.is_some() || limiter.ops.is_some();
        Ok(EntropyConfig {
            rate_limiter: limited.then_some(limiter),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_unlimited_and_rates_parse() {
        assert_eq!(
            "".parse::<EntropyConfig>().unwrap(),
            EntropyConfig::default()
        );
        let e: EntropyConfig = "bw=4096/100,ops=10/1000/5".parse().unwrap();
        let limiter = e.rate_limiter.unwrap();
        assert_eq!(limiter.bandwidth.unwrap().size, 4096);
        assert_eq!(limiter.ops.unwrap().one_time_burst, Some(5));
        assert!("rate=1".parse::<EntropyConfig>().is_err());
        assert!("bw=x/1".parse::<EntropyConfig>().is_err());
    }

    #[test]
    fn a_refill_over_a_day_is_refused() {
        let e: EntropyConfig = "bw=1/100000000".parse().unwrap();
        assert!(e.validate().is_err());
        EntropyConfig::default().validate().unwrap();
    }
}
