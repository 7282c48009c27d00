//! Network interfaces: a TAP name and a MAC address, checked before anything is opened.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ConfigError;

/// Longest TAP name Linux accepts (IFNAMSIZ minus the terminating NUL).
pub const MAX_TAP_NAME_LEN: usize = 15;

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A stable address for TAP `tap`: locally administered, unicast, and the same every time
    /// for the same name (FNV-1a of the name).
    pub fn for_tap(tap: &str) -> MacAddr {
        let mut hash: u32 = 0x811c_9dc5;
        for byte in tap.bytes() {
            hash = (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193);
        }
        let [a, b, c, d] = hash.to_be_bytes();
        MacAddr([0x06, 0x00, a, b, c, d])
    }

    /// Unicast (a NIC cannot have a group address) and not all zeroes.
    pub fn is_valid_station(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Longest interface id.
pub const MAX_NET_ID_LEN: usize = 64;

/// Not six colon-separated hex bytes.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address: expected six hex bytes like 06:00:ac:10:00:02")]
pub struct MacParseError(String);

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(|| MacParseError(s.to_owned()))?;
            // from_str_radix alone would take a sign: "+6" is not a hex byte.
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(MacParseError(s.to_owned()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| MacParseError(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(MacParseError(s.to_owned()));
        }
        Ok(MacAddr(bytes))
    }
}

/// A virtio-net interface on a host TAP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The interface's name for the VMM and its API (Firecracker's `iface_id`); `None` uses the
    /// TAP's name.
    #[serde(default)]
    pub id: Option<String>,
    /// The TAP's name; ember creates it (for its own lifetime) if it does not exist and may.
    pub tap: String,
    /// The guest's address; `None` uses [`MacAddr::for_tap`].
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Limits on what the guest receives.
    #[serde(default)]
    pub rx_rate_limiter: Option<super::RateLimiterConfig>,
    /// Limits on what the guest sends.
    #[serde(default)]
    pub tx_rate_limiter: Option<super::RateLimiterConfig>,
}

impl NetConfig {
    /// An interface on TAP `tap` with the default MAC address.
    pub fn new(tap: impl Into<String>) -> Self {
        NetConfig {
            id: None,
            tap: tap.into(),
            mac: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }
    }

    /// The interface's id (the API's `iface_id`): the one given, else the TAP's name.
    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.tap)
    }

    /// The device's id, owned (see [`NetConfig::id`]).
    pub fn device_id(&self) -> String {
        self.id().to_owned()
    }

    /// The MAC address the guest gets.
    pub fn mac(&self) -> MacAddr {
        self.mac.unwrap_or_else(|| MacAddr::for_tap(&self.tap))
    }

    /// Checks the name the way Linux does, and the address.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.tap;
        let bad_char = |c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control();
        if name.is_empty()
            || name.len() > MAX_TAP_NAME_LEN
            || name == "."
            || name == ".."
            || name.chars().any(bad_char)
        {
            return Err(ConfigError::BadTapName(name.clone()));
        }
        if let Some(id) = &self.id {
            if id.is_empty()
                || id.len() > MAX_NET_ID_LEN
                || !id.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(ConfigError::BadNetId(id.clone()));
            }
        }
        let mac = self.mac();
        if !mac.is_valid_station() {
            return Err(ConfigError::BadMac(mac));
        }
        for limiter in [&self.rx_rate_limiter, &self.tx_rate_limiter]
            .into_iter()
            .flatten()
        {
            limiter.validate(name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print_both_ways() {
        let mac: MacAddr = "06:00:AC:10:00:02".parse().unwrap();
        assert_eq!(mac.0, [6, 0, 0xac, 0x10, 0, 2]);
        assert_eq!(mac.to_string(), "06:00:ac:10:00:02");
        for bad in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "6:0:ac:10:0:2",
            "zz:00:ac:10:00:02",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    /// Found with the `config` fuzz target's MAC oracle (parsing must round-trip to the same
    /// text): `u8::from_str_radix` accepts a leading `+`, so "+6:00:00:00:00:01" parsed as
    /// 06:00:00:00:00:01.
    #[test]
    fn signed_bytes_are_not_mac_bytes() {
        for bad in [
            "+6:00:00:00:00:01",
            "06:00:00:00:00:+1",
            "06:+0:ac:10:00:02",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn interface_ids_default_to_the_tap_and_are_checked() {
        let mut net = NetConfig::new("tap0");
        assert_eq!(net.id(), "tap0");
        net.id = Some("eth0".into());
        assert_eq!(net.id(), "eth0");
        net.validate().unwrap();
        for bad in ["", "a b", &"x".repeat(65)] {
            net.id = Some(bad.to_owned());
            assert!(
                matches!(net.validate(), Err(ConfigError::BadNetId(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn macs_are_strings_in_json() {
        let mac: MacAddr = serde_json::from_str(r#""06:00:ac:10:00:02""#).unwrap();
        assert_eq!(
            serde_json::to_string(&mac).unwrap(),
            r#""06:00:ac:10:00:02""#
        );
        assert!(serde_json::from_str::<MacAddr>(r#""06:00""#).is_err());
    }

    #[test]
    fn default_macs_are_stable_local_unicast_and_differ_by_tap() {
        let a = MacAddr::for_tap("tap0");
        assert_eq!(a, MacAddr::for_tap("tap0"));
        assert_ne!(a, MacAddr::for_tap("tap1"));
        assert_eq!(a.0[0] & 0b11, 0b10, "locally administered unicast");
    }

    #[test]
    fn bad_tap_names_and_group_macs_are_refused() {
        for name in [
            "",
            "a-name-that-is-too-long",
            "a/b",
            "a b",
            ".",
            "..",
            "eth0:1",
        ] {
            let err = NetConfig::new(name).validate().unwrap_err();
            assert!(matches!(err, ConfigError::BadTapName(_)), "{name}: {err}");
        }
        NetConfig::new("tap-fifteen-abc").validate().unwrap();
        let mut net = NetConfig::new("tap0");
        net.mac = Some("01:00:5e:00:00:01".parse().unwrap());
        assert!(matches!(net.validate(), Err(ConfigError::BadMac(_))));
        net.mac = Some(MacAddr([0; 6]));
        assert!(matches!(net.validate(), Err(ConfigError::BadMac(_))));
    }
}
