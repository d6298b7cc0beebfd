//! Address arithmetic for the egress policy: CIDR blocks, the special ranges denied by
//! default, and the IPv4 addresses hidden inside IPv6 ones (mapped, translated, NAT64 — the
//! well-known and the local-use prefix —, 6to4, Teredo).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    /// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a /32 or /128).
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("'{s}': bad prefix length"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let (full, rest) = ((prefix / 8) as usize, prefix % 8);
    if a[..full] != b[..full] {
        return false;
    }
    rest == 0 || (a[full] ^ b[full]) & (0xffu8 << (8 - rest)) == 0
}

/// The address itself plus every IPv4 address embedded in it, by every standard embedding
/// the address fits. For deny rules and special ranges: a candidate more can only refuse more.
pub(super) fn candidates(ip: IpAddr) -> Vec<IpAddr> {
    let mut out = vec![ip];
    if let IpAddr::V6(v6) = ip {
        out.extend(embedded_v4(v6).into_iter().map(IpAddr::V4));
        out.extend(local_nat64_v4(v6).into_iter().map(IpAddr::V4));
    }
    out
}

/// The addresses an allow rule may match: the address itself plus the IPv4 address embedded
/// at a place fixed by its standard. Not the readings of a local-use NAT64 address: where its
/// IPv4 address sits is the operator's choice (RFC 6052 prefix length), so an allowed IPv4
/// CIDR matching one reading must not let through an address the NAT64 translates by another.
pub(super) fn allow_candidates(ip: IpAddr) -> Vec<IpAddr> {
    let mut out = vec![ip];
    if let IpAddr::V6(v6) = ip {
        out.extend(embedded_v4(v6).map(IpAddr::V4));
    }
    out
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = v6.octets();
    let seg = v6.segments();
    let last4 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4); // ::ffff:a.b.c.d
    }
    if seg[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return Some(last4); // SIIT IPv4-translated ::ffff:0:a.b.c.d (RFC 2765, RFC 7915)
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || seg[..6] == [0, 0, 0, 0, 0, 0] && seg[6] != 0 {
        return Some(last4); // NAT64 64:ff9b::/96, and deprecated IPv4-compatible ::a.b.c.d
    }
    if seg[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])); // 6to4
    }
    if seg[0] == 0x2001 && seg[1] == 0 {
        let x = u32::from(last4) ^ 0xffff_ffff; // Teredo client address, obfuscated
        return Some(Ipv4Addr::from(x));
    }
    None
}

/// The IPv4 address a local-use NAT64 address (64:ff9b:1::/48, RFC 8215) carries, read with
/// each RFC 6052 prefix length the block allows (/48, /56, /64, /96; bits 64-71 are skipped).
fn local_nat64_v4(v6: Ipv6Addr) -> Vec<Ipv4Addr> {
    let o = v6.octets();
    let seg = v6.segments();
    if seg[..3] != [0x64, 0xff9b, 1] {
        return Vec::new();
    }
    vec![
        Ipv4Addr::new(o[6], o[7], o[9], o[10]),
        Ipv4Addr::new(o[7], o[9], o[10], o[11]),
        Ipv4Addr::new(o[9], o[10], o[11], o[12]),
        Ipv4Addr::new(o[12], o[13], o[14], o[15]),
    ]
}

const SPECIAL: &[(&str, &str)] = &[
    ("0.0.0.0/8", "unspecified/this-network"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved and broadcast"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("::ffff:0:0:0/96", "IPv4-translated (SIIT)"),
    ("2001:2::/48", "benchmarking"),
];

/// The special range `ip` is in, if any (checked as given, without embedded addresses).
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    SPECIAL.iter().find_map(|(c, what)| {
        let c: Cidr = c.parse().ok()?;
        c.contains(ip).then_some(*what)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_matching() {
        let c: Cidr = "10.0.0.0/8".parse().expect("cidr");
        assert!(c.contains("10.255.1.2".parse().expect("ip")));
        assert!(!c.contains("11.0.0.1".parse().expect("ip")));
        let c: Cidr = "172.16.0.0/12".parse().expect("cidr");
        assert!(c.contains("172.31.255.255".parse().expect("ip")));
        assert!(!c.contains("172.32.0.0".parse().expect("ip")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("::1"
            .parse::<Cidr>()
            .expect("bare")
            .contains("::1".parse().expect("ip")));
    }

    #[test]
    fn embedded_ipv4_is_found() {
        for (v6, v4) in [
            ("::ffff:127.0.0.1", "127.0.0.1"),
            ("::ffff:0:a9fe:a9fe", "169.254.169.254"),
            ("::ffff:0:10.1.2.3", "10.1.2.3"),
            ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
            ("64:ff9b:1::a9fe:a9fe", "169.254.169.254"),
            ("64:ff9b:1:a00:5::", "10.0.5.0"),        // RFC 6052 /48 reading
            ("64:ff9b:1:c0:a8:100::", "192.168.1.0"), // /56
            ("64:ff9b:1:0:7f:0:100:0", "127.0.0.1"),  // /64
            ("2002:0a00:0005::1", "10.0.0.5"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"),
        ] {
            let got = candidates(v6.parse().expect("v6"));
            assert!(got.contains(&v4.parse().expect("v4")), "{v6}: {got:?}");
        }
    }

    #[test]
    fn special_ranges_include_translation_discard_and_relay_blocks() {
        for (ip, what) in [
            ("64:ff9b:1::1", "local-use NAT64"),
            ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", "local-use NAT64"),
            ("100::1", "discard-only"),
            ("100::ffff:ffff:ffff:ffff", "discard-only"),
            ("192.88.99.1", "6to4 relay anycast"),
            ("::ffff:0:8.8.8.8", "IPv4-translated"),
            ("3fff:123::1", "documentation"),
            ("2001:2::1", "benchmarking"),
        ] {
            let got = special_range(ip.parse().expect("ip"));
            assert!(got.is_some_and(|g| g.contains(what)), "{ip}: {got:?}");
        }
        for ip in [
            "64:ff9b:2::1",
            "100:0:0:1::1",
            "192.88.100.1",
            "::fffe:0:0:1",
            "2001:3::1",
            "64:ff9b::808:808",
        ] {
            assert_eq!(special_range(ip.parse().expect("ip")), None, "{ip}");
        }
    }
}
