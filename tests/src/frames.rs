//! Hand-made Ethernet/IPv4/TCP frames for BPF_PROG_TEST_RUN (the Maglev test
//! and `cargo xtask bench`): exactly what a pod's veth would carry, with
//! valid checksums, so the programs take their real paths; and readers for
//! the addresses of the frame a program returns.

use std::net::Ipv4Addr;

/// TCP flag bits.
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

/// One TCP segment without payload, as a 54-byte Ethernet frame.
pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut frame = Vec::with_capacity(54);
    // Ethernet: any unicast MACs, IPv4.
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
    let ip_start = frame.len();
    frame.extend_from_slice(&[
        0x45, 0, // version 4, IHL 5; DSCP
        0, 40, // total length: 20 + 20
        0, 1, // id
        0x40, 0, // don't fragment
        64, 6, // TTL, TCP
        0, 0, // checksum, below
    ]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    let csum = checksum(&frame[ip_start..ip_start + 20]);
    frame[ip_start + 10..ip_start + 12].copy_from_slice(&csum.to_be_bytes());
    let tcp_start = frame.len();
    frame.extend_from_slice(&sport.to_be_bytes());
    frame.extend_from_slice(&dport.to_be_bytes());
    frame.extend_from_slice(&1u32.to_be_bytes()); // seq
    frame.extend_from_slice(&(if flags & ACK != 0 { 1u32 } else { 0 }).to_be_bytes()); // ack
    frame.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]); // offset 5, flags, window, csum, urg
    // TCP checksum over the pseudo-header and the segment.
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&frame[tcp_start..]);
    let csum = checksum(&pseudo);
    frame[tcp_start + 16..tcp_start + 18].copy_from_slice(&csum.to_be_bytes());
    frame
}

/// The source address of an IPv4 frame.
pub fn source(frame: &[u8]) -> Option<Ipv4Addr> {
    let b: [u8; 4] = frame.get(26..30)?.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}

/// The destination address of an IPv4 frame (after a DNAT, where it went).
pub fn destination(frame: &[u8]) -> Option<Ipv4Addr> {
    let b: [u8; 4] = frame.get(30..34)?.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}

/// The destination port of a TCP frame.
pub fn destination_port(frame: &[u8]) -> Option<u16> {
    let b: [u8; 2] = frame.get(36..38)?.try_into().ok()?;
    Some(u16::from_be_bytes(b))
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 =
        bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_valid_checksums_and_addresses() {
        let f = tcp(Ipv4Addr::new(10, 244, 0, 2), 1234, Ipv4Addr::new(10, 96, 0, 1), 80, SYN);
        assert_eq!(f.len(), 54);
        assert_eq!(checksum(&f[14..34]), 0, "IPv4 header checksum");
        assert_eq!(destination(&f), Some(Ipv4Addr::new(10, 96, 0, 1)));
        assert_eq!(destination_port(&f), Some(80));
        let mut pseudo = vec![10, 244, 0, 2, 10, 96, 0, 1, 0, 6, 0, 20];
        pseudo.extend_from_slice(&f[34..]);
        assert_eq!(checksum(&pseudo), 0, "TCP checksum");
    }
}
