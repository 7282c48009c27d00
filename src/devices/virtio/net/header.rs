//! The virtio-net header in front of each transmit frame, checked against the offloads the
//! guest negotiated before the host kernel sees it: the TAP would otherwise build whatever
//! segmentation the header asks for (UDP fragmentation, USO, ECN), offered or not.

use thiserror::Error;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
};

use super::tap::VNET_HDR_LEN;

/// `flags`: the device is to finish the checksum from `csum_start` on.
const NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;

/// A transmit header the guest was not entitled to send.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TxHeaderError {
    /// `flags` other than NEEDS_CSUM (DATA_VALID and RSC_INFO are the device's to set).
    #[error("a transmit header with flags {0:#x}")]
    Flags(u8),
    /// NEEDS_CSUM without VIRTIO_NET_F_CSUM.
    #[error("a checksum offload the guest did not negotiate")]
    Checksum,
    /// A `gso_type` whose feature was not negotiated (or that the device never offers).
    #[error("segmentation type {0:#x}, which was not negotiated")]
    Segmentation(u8),
    /// Segmentation without NEEDS_CSUM, or with a zero segment size.
    #[error("segmentation without a checksum offload or segment size")]
    Incomplete,
}

/// The transmit offloads the guest negotiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxOffloads {
    csum: bool,
    tso4: bool,
    tso6: bool,
}

impl TxOffloads {
    /// From the feature bits the driver acknowledged.
    pub fn from_features(acked: u64) -> Self {
        let has = |feature: u32| acked & (1 << feature) != 0;
        TxOffloads {
            csum: has(VIRTIO_NET_F_CSUM),
            tso4: has(VIRTIO_NET_F_HOST_TSO4),
            tso6: has(VIRTIO_NET_F_HOST_TSO6),
        }
    }

    /// Whether `hdr` (`virtio_net_hdr_v1`, little-endian) asks only for what was negotiated
    /// (virtio 1.2, 5.1.6.2).
    pub fn check(&self, hdr: &[u8; VNET_HDR_LEN]) -> Result<(), TxHeaderError> {
        let [flags, gso_type, _, _, gso_size_lo, gso_size_hi, ..] = *hdr;
        if flags & !NEEDS_CSUM != 0 {
            return Err(TxHeaderError::Flags(flags));
        }
        let needs_csum = flags & NEEDS_CSUM != 0;
        if needs_csum && !self.csum {
            return Err(TxHeaderError::Checksum);
        }
        let allowed = match gso_type {
            GSO_NONE => return Ok(()),
            GSO_TCPV4 => self.tso4,
            GSO_TCPV6 => self.tso6,
            // UDP (UFO), UDP_L4 (USO), the ECN bit: never offered.
            _ => false,
        };
        if !allowed {
            return Err(TxHeaderError::Segmentation(gso_type));
        }
        if !needs_csum || u16::from_le_bytes([gso_size_lo, gso_size_hi]) == 0 {
            return Err(TxHeaderError::Incomplete);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GSO_UDP: u8 = 3;
    const GSO_UDP_L4: u8 = 5;
    const GSO_ECN: u8 = 0x80;
    const DATA_VALID: u8 = 2;

    fn header(flags: u8, gso_type: u8, gso_size: u16) -> [u8; VNET_HDR_LEN] {
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr[0] = flags;
        hdr[1] = gso_type;
        hdr[2..4].copy_from_slice(&54u16.to_le_bytes());
        hdr[4..6].copy_from_slice(&gso_size.to_le_bytes());
        hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
        hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
        hdr
    }

    fn offloads(features: &[u32]) -> TxOffloads {
        TxOffloads::from_features(features.iter().map(|&f| 1u64 << f).sum())
    }

    #[test]
    fn negotiated_offloads_pass() {
        let all = offloads(&[
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
        ]);
        for hdr in [
            header(0, GSO_NONE, 0),
            header(NEEDS_CSUM, GSO_NONE, 0),
            header(NEEDS_CSUM, GSO_TCPV4, 1448),
            header(NEEDS_CSUM, GSO_TCPV6, 1428),
        ] {
            assert_eq!(all.check(&hdr), Ok(()), "{hdr:?}");
        }
        // Without any offload, a plain frame still passes.
        assert_eq!(offloads(&[]).check(&header(0, GSO_NONE, 0)), Ok(()));
    }

    #[test]
    fn segmentation_that_was_not_negotiated_is_refused() {
        let csum_only = offloads(&[VIRTIO_NET_F_CSUM]);
        let tso4 = offloads(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4]);
        let all = offloads(&[
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
        ]);
        let refused = [
            (csum_only, GSO_TCPV4),
            (csum_only, GSO_TCPV6),
            (tso4, GSO_TCPV6),
            // Never offered, whatever was negotiated.
            (all, GSO_UDP),
            (all, GSO_UDP_L4),
            (all, GSO_TCPV4 | GSO_ECN),
            (all, GSO_TCPV6 | GSO_ECN),
            (all, 2),
            (all, 0x7f),
            (all, 0xff),
        ];
        for (negotiated, gso_type) in refused {
            assert_eq!(
                negotiated.check(&header(NEEDS_CSUM, gso_type, 1448)),
                Err(TxHeaderError::Segmentation(gso_type)),
                "{negotiated:?} {gso_type:#x}"
            );
        }
    }

    #[test]
    fn checksums_and_flags_that_were_not_negotiated_are_refused() {
        let none = offloads(&[]);
        assert_eq!(
            none.check(&header(NEEDS_CSUM, GSO_NONE, 0)),
            Err(TxHeaderError::Checksum)
        );
        // TSO acknowledged without CSUM (the spec forbids it) still cannot segment.
        let tso_alone = offloads(&[VIRTIO_NET_F_HOST_TSO4]);
        assert_eq!(
            tso_alone.check(&header(NEEDS_CSUM, GSO_TCPV4, 1448)),
            Err(TxHeaderError::Checksum)
        );
        let all = offloads(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4]);
        for flags in [DATA_VALID, NEEDS_CSUM | DATA_VALID, 4, 0x80] {
            assert_eq!(
                all.check(&header(flags, GSO_NONE, 0)),
                Err(TxHeaderError::Flags(flags))
            );
        }
        assert_eq!(
            all.check(&header(0, GSO_TCPV4, 1448)),
            Err(TxHeaderError::Incomplete)
        );
        assert_eq!(
            all.check(&header(NEEDS_CSUM, GSO_TCPV4, 0)),
            Err(TxHeaderError::Incomplete)
        );
    }
}
