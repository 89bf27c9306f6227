//! Port ranges as LPM prefixes over the 16-bit port: `endPort` ranges cost
//! the datapath nothing more than single ports (Cilium does the same since
//! its policy map became an LPM trie).

/// A port prefix: `port` with its top `bits` bits significant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct PortPrefix {
    pub port: u16,
    pub bits: u8,
}

impl PortPrefix {
    pub const ANY: Self = Self { port: 0, bits: 0 };
}

#[cfg(test)]
impl PortPrefix {
    pub fn first(&self) -> u16 {
        self.port
    }

    pub fn last(&self) -> u16 {
        self.port | u16::MAX.checked_shr(u32::from(self.bits)).unwrap_or(0)
    }
}

/// The smallest set of prefixes covering exactly `lo..=hi`.
pub fn range_prefixes(lo: u16, hi: u16) -> Vec<PortPrefix> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // The largest aligned block starting at lo that fits.
        let mut size = if lo == 0 { 1 << 16 } else { 1u32 << lo.trailing_zeros() };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push(PortPrefix { port: lo as u16, bits: 16 - size.trailing_zeros() as u8 });
        lo += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_cover_the_range_exactly() {
        for (lo, hi) in [(80, 80), (80, 81), (1000, 2000), (1, 65535), (0, 65535), (32768, 60999)] {
            let prefixes = range_prefixes(lo, hi);
            let covered: u32 = prefixes.iter().map(|p| u32::from(p.last()) - u32::from(p.first()) + 1).sum();
            assert_eq!(covered, u32::from(hi) - u32::from(lo) + 1, "{lo}-{hi}");
            assert!(prefixes.iter().all(|p| p.first() >= lo && p.last() <= hi), "{lo}-{hi}: {prefixes:?}");
            assert!(prefixes.len() <= 32);
        }
        assert_eq!(range_prefixes(80, 80), vec![PortPrefix { port: 80, bits: 16 }]);
        assert_eq!(range_prefixes(0, 65535), vec![PortPrefix::ANY]);
    }
}
