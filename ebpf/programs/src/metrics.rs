//! Per-CPU counters by reason, read by `weir metrics list`.

use crate::maps::METRICS;

#[inline(always)]
pub fn count(reason: u32, bytes: u32) {
    if let Some(counter) = METRICS.get_ptr_mut(reason) {
        // SAFETY: a per-CPU slot, so no other CPU writes it concurrently.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(bytes);
        }
    }
}
