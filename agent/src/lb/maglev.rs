//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, §3.4): a lookup table of a
//! prime size M in which every backend owns about M/N entries. The table
//! depends only on the set of backend names, so every node builds the same
//! one and sends a flow to the same backend; removing one of N backends
//! reassigns little more than that backend's 1/N of the entries.

/// Entries per table by default: a prime well above 100 × the backends of a
/// typical service (Cilium's default is 16381; its table is a per-service
/// inner map, ours entries in one shared map, hence smaller).
pub const DEFAULT_TABLE_SIZE: u32 = 1021;

pub fn is_prime(n: u32) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

fn fnv1a(seed: &str, name: &str) -> u64 {
    seed.bytes()
        .chain(name.bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The lookup table: entry i is an index into `names` (which must be
/// non-empty). `size` must be prime.
pub fn table(names: &[String], size: u32) -> Vec<usize> {
    let m = size as usize;
    let permutation: Vec<(usize, usize)> = names
        .iter()
        .map(|n| {
            let offset = (fnv1a("maglev-offset:", n) % size as u64) as usize;
            let skip = (fnv1a("maglev-skip:", n) % (size as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; names.len()];
    let mut entries = vec![usize::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in permutation.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m;
            while entries[c] != usize::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            entries[c] = i;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.244.0.{i}:8080/TCP")).collect()
    }

    #[test]
    fn every_backend_gets_a_fair_share() {
        let t = table(&names(10), DEFAULT_TABLE_SIZE);
        for i in 0..10 {
            let share = t.iter().filter(|e| **e == i).count();
            assert!((90..=115).contains(&share), "backend {i} owns {share} of 1021");
        }
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        let before = names(10);
        let mut after = before.clone();
        let gone = after.remove(3);
        let (t1, t2) = (table(&before, DEFAULT_TABLE_SIZE), table(&after, DEFAULT_TABLE_SIZE));
        let moved = t1.iter().zip(&t2).filter(|(a, b)| before[**a] != after[**b]).count();
        let owned = t1.iter().filter(|a| before[**a] == gone).count();
        // Every entry of the removed backend must move; Maglev moves only a
        // little more than that.
        assert!(moved >= owned && moved <= owned + owned / 2, "moved {moved}, the removed one owned {owned}");
    }

    #[test]
    fn the_table_depends_only_on_the_names() {
        assert_eq!(table(&names(5), 251), table(&names(5), 251));
        assert!(is_prime(DEFAULT_TABLE_SIZE) && is_prime(16381) && !is_prime(1024));
    }
}
