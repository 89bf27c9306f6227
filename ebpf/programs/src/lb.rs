//! Frontend lookup and backend selection: three hash lookups at most.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use weir_abi::{
    lb::{
        AffinityEntry, AffinityKey, Backend, MaglevKey, SCOPE_INTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_MAGLEV,
        SVC_FLAG_TWO_SCOPES, Service, ServiceKey, SlotKey,
    },
    metrics::DROP_NO_SERVICE,
};

use crate::maps::{AFFINITY, BACKENDS, MAGLEV, SERVICES, SLOTS};

#[inline(always)]
pub fn lookup_service(address_be: u32, port_be: u16, proto: u8) -> Option<Service> {
    let key = ServiceKey::new(address_be, port_be, proto);
    // SAFETY: the value is copied out at once.
    SERVICES.get_ptr(&key).map(|svc| unsafe { *svc })
}

/// The frontend in-cluster clients (pods, node processes) use: the internal
/// entry of an address that has one (see `SCOPE_INTERNAL`), else the only one.
#[inline(always)]
pub fn lookup_service_internal(address_be: u32, port_be: u16, proto: u8) -> Option<Service> {
    let svc = lookup_service(address_be, port_be, proto)?;
    if svc.flags & SVC_FLAG_TWO_SCOPES == 0 {
        return Some(svc);
    }
    let key = ServiceKey::with_scope(address_be, port_be, proto, SCOPE_INTERNAL);
    // SAFETY: the value is copied out at once.
    SERVICES.get_ptr(&key).map(|internal| unsafe { *internal }).or(Some(svc))
}

/// The backend a client's affinity names, if it is fresh and the backend
/// still holds its slot (so it is still in the service).
#[inline(always)]
fn affine_slot(svc: &Service, client_be: u32, now: u32) -> Option<u32> {
    let key = AffinityKey { client_be, service_id: svc.service_id };
    // SAFETY: copied out at once.
    let entry = AFFINITY.get_ptr(&key).map(|e| unsafe { *e })?;
    if now.wrapping_sub(entry.last_used) > svc.affinity_timeout || entry.slot > u32::from(svc.count) {
        return None;
    }
    let slot_key = SlotKey { service_id: svc.service_id, slot: entry.slot };
    // SAFETY: copied out at once.
    let holder = SLOTS.get_ptr(&slot_key).map(|id| unsafe { *id })?;
    (holder == entry.backend_id).then_some(entry.slot)
}

/// Picks a backend for a new connection: the client's affine backend under
/// `sessionAffinity: ClientIP`, else one at random among the service's slots
/// (Cilium's `lb4_select_backend_id_random`). Returns the backend id and its
/// address.
#[inline(always)]
pub fn select_backend(
    svc: &Service,
    client_be: u32,
    now: u32,
    flow_hash: u32,
) -> Result<(u32, Backend), u32> {
    if svc.count == 0 {
        return Err(DROP_NO_SERVICE);
    }
    if svc.flags & SVC_FLAG_MAGLEV != 0 && svc.maglev_table_size != 0 {
        let key = MaglevKey { service_id: svc.service_id, index: flow_hash % svc.maglev_table_size };
        // SAFETY: values are copied out at once.
        let backend_id = MAGLEV.get_ptr(&key).map(|id| unsafe { *id }).ok_or(DROP_NO_SERVICE)?;
        let backend = BACKENDS.get_ptr(&backend_id).map(|be| unsafe { *be }).ok_or(DROP_NO_SERVICE)?;
        return Ok((backend_id, backend));
    }
    let affinity = svc.flags & SVC_FLAG_AFFINITY != 0;
    let slot = match affinity.then(|| affine_slot(svc, client_be, now)).flatten() {
        Some(slot) => slot,
        None => {
            // SAFETY: a helper without arguments.
            let random = unsafe { bpf_get_prandom_u32() };
            random % u32::from(svc.count) + 1
        }
    };
    let slot_key = SlotKey { service_id: svc.service_id, slot };
    // SAFETY: values are copied out at once.
    let backend_id = SLOTS.get_ptr(&slot_key).map(|id| unsafe { *id }).ok_or(DROP_NO_SERVICE)?;
    let backend = BACKENDS.get_ptr(&backend_id).map(|be| unsafe { *be }).ok_or(DROP_NO_SERVICE)?;
    if affinity {
        let key = AffinityKey { client_be, service_id: svc.service_id };
        let entry = AffinityEntry { backend_id, slot, last_used: now, _pad: 0 };
        // Losing an affinity entry to a full LRU only costs stickiness.
        let _ = AFFINITY.insert(&key, &entry, 0);
    }
    Ok((backend_id, backend))
}
