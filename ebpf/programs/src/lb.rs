//! Frontend lookup and backend selection: three hash lookups at most.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use weir_abi::{
    lb::{Backend, Service, ServiceKey, SlotKey},
    metrics::DROP_NO_SERVICE,
};

use crate::maps::{BACKENDS, SERVICES, SLOTS};

#[inline(always)]
pub fn lookup_service(address_be: u32, port_be: u16, proto: u8) -> Option<Service> {
    let key = ServiceKey::new(address_be, port_be, proto);
    // SAFETY: the value is copied out at once.
    SERVICES.get_ptr(&key).map(|svc| unsafe { *svc })
}

/// Picks a backend at random among the service's slots (Cilium's
/// `lb4_select_backend_id_random`). Returns the backend id and its address.
#[inline(always)]
pub fn select_backend(svc: &Service) -> Result<(u32, Backend), u32> {
    if svc.count == 0 {
        return Err(DROP_NO_SERVICE);
    }
    // SAFETY: a helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = random % u32::from(svc.count) + 1;
    let slot_key = SlotKey { service_id: svc.service_id, slot };
    // SAFETY: values are copied out at once.
    let backend_id = SLOTS.get_ptr(&slot_key).map(|id| unsafe { *id }).ok_or(DROP_NO_SERVICE)?;
    let backend = BACKENDS.get_ptr(&backend_id).map(|be| unsafe { *be }).ok_or(DROP_NO_SERVICE)?;
    Ok((backend_id, backend))
}
