//! The few bpf(2) commands the tests and the benchmark (`cargo xtask
//! bench`) need, called directly rather than through `bpftool` (one process
//! per packet or per key would be thousands of processes): opening a pinned
//! link or map, finding the program behind a link, BPF_PROG_TEST_RUN, the
//! kernel's run-time statistics, map lookups, key walks and deletes, loading
//! a few-instruction program (an empty classifier that measures the
//! test-run harness itself, `XDP_PASS` for [`crate::xdp_pass`]) and
//! attaching one with a link.
//!
//! Attribute layouts follow `union bpf_attr` in include/uapi/linux/bpf.h;
//! each struct below is one arm of that union, with explicit padding fields:
//! the kernel rejects an attribute with non-zero bytes after its last field,
//! and implicit padding has no defined value.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context as _, Result, bail};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ENABLE_STATS: libc::c_long = 32;

/// `enum bpf_prog_type`: a tc classifier.
pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// `enum bpf_prog_type`: an XDP program.
pub const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_STATS_RUN_TIME: u32 = 0;

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly sized `bpf_attr` arm; the kernel
    // reads (and for some commands writes) at most `size_of::<T>()` bytes.
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr).cast::<libc::c_void>(), size_of::<T>())
    };
    if ret < 0 { Err(std::io::Error::last_os_error()) } else { Ok(ret) }
}

fn fd_from(ret: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(ret as i32) }
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    // Explicit: the kernel rejects non-zero bytes after the last field, and
    // implicit padding has no defined value.
    _pad: u32,
}

/// Opens a pinned object (map, program or link) by its bpffs path.
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).context("pin path contains NUL")?;
    let mut attr = ObjGetAttr { pathname: c.as_ptr() as u64, ..ObjGetAttr::default() };
    let ret = sys_bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("BPF_OBJ_GET {}", path.display()))?;
    Ok(fd_from(ret))
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info`, up to the fields we read (the kernel fills at
/// most `info_len` bytes).
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    kind: u32,
    id: u32,
    prog_id: u32,
}

/// The id of the program a (pinned) link runs.
pub fn link_prog_id(link: &OwnedFd) -> Result<u32> {
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<LinkInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD (link)")?;
    Ok(info.prog_id)
}

#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// Opens a loaded program by id.
pub fn prog_fd_by_id(id: u32) -> Result<OwnedFd> {
    let mut attr = GetFdByIdAttr { id, ..GetFdByIdAttr::default() };
    let ret =
        sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).with_context(|| format!("BPF_PROG_GET_FD_BY_ID {id}"))?;
    Ok(fd_from(ret))
}

/// Opens the program behind the link pinned at `path`: `(program id, fd)`.
pub fn prog_of_pinned_link(path: &Path) -> Result<(u32, OwnedFd)> {
    let link = obj_get(path)?;
    let id = link_prog_id(&link)?;
    Ok((id, prog_fd_by_id(id)?))
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// What one BPF_PROG_TEST_RUN returned.
#[derive(Debug, Clone, Copy)]
pub struct TestRun {
    /// The program's return code (TC_ACT_*) on the last repetition.
    pub retval: u32,
    /// Mean nanoseconds per repetition, as the kernel measured it.
    pub duration_ns: u32,
    /// Bytes written to `out`.
    pub size_out: usize,
}

/// Runs `prog` on `packet` `repeat` times in the kernel; the rewritten packet
/// (after the last repetition) lands in `out`.
pub fn test_run(prog: &OwnedFd, packet: &[u8], out: &mut [u8], repeat: u32) -> Result<TestRun> {
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..TestRunAttr::default()
    };
    sys_bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    Ok(TestRun { retval: attr.retval, duration_ns: attr.duration, size_out: attr.data_size_out as usize })
}

#[repr(C)]
#[derive(Default)]
struct EnableStatsAttr {
    kind: u32,
}

/// Turns on the kernel's per-program run-time statistics (`run_time_ns`,
/// `run_cnt`) for as long as the returned descriptor lives. Unlike the
/// `kernel.bpf_stats_enabled` sysctl, nothing global is left behind if the
/// benchmark dies: the kernel drops the reference with the descriptor.
pub fn enable_stats() -> Result<OwnedFd> {
    let mut attr = EnableStatsAttr { kind: BPF_STATS_RUN_TIME };
    let ret = sys_bpf(BPF_ENABLE_STATS, &mut attr).context("BPF_ENABLE_STATS")?;
    Ok(fd_from(ret))
}

/// The map element commands' arm; `value` is `next_key` for
/// BPF_MAP_GET_NEXT_KEY.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Looks `key` up in the map; `Ok(None)` when it is absent.
pub fn map_lookup<K: Copy, V: Copy + Default>(map: &OwnedFd, key: &K) -> Result<Option<V>> {
    let mut value = V::default();
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(&mut value) as u64,
        ..MapElemAttr::default()
    };
    match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e).context("BPF_MAP_LOOKUP_ELEM"),
    }
}

/// The key size of a map, from its `/proc/self/fdinfo` entry.
pub fn map_key_size(map: &OwnedFd) -> Result<u32> {
    let path = format!("/proc/self/fdinfo/{}", map.as_raw_fd());
    let info = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let value = info.lines().find_map(|l| l.strip_prefix("key_size:")).context("no key_size in fdinfo")?;
    value.trim().parse().with_context(|| format!("key_size {value:?}"))
}

/// Every key of a hash map whose keys are `key_size` bytes (collected
/// first, so that deleting them does not disturb the walk).
pub fn map_keys(map: &OwnedFd, key_size: usize) -> Result<Vec<Vec<u8>>> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut next = vec![0u8; key_size];
        let mut attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            // A null key asks for the first one.
            key: keys.last().map_or(0, |k| k.as_ptr() as u64),
            value: next.as_mut_ptr() as u64,
            ..MapElemAttr::default()
        };
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => keys.push(next),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e).context("BPF_MAP_GET_NEXT_KEY"),
        }
    }
}

/// Deletes `key` (of the map's key size) from the map; the error keeps its
/// errno (ENOENT when the key is gone).
pub fn map_delete(map: &OwnedFd, key: &[u8]) -> std::io::Result<()> {
    let mut attr =
        MapElemAttr { map_fd: map.as_raw_fd() as u32, key: key.as_ptr() as u64, ..MapElemAttr::default() };
    sys_bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(|_| ())
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// `r0 = value; exit` (BPF_ALU64 | BPF_MOV | BPF_K, 0xb7, with the immediate
/// in the upper half; then BPF_JMP | BPF_EXIT, 0x95): a program that returns
/// `value` and does nothing else.
pub fn return_insns(value: u32) -> [u64; 2] {
    [0xb7 | (u64::from(value) << 32), 0x95]
}

/// Loads a GPL program of type `prog_type` (`BPF_PROG_TYPE_*`) made of
/// `insns`, named `name` (up to 15 bytes, as the kernel shows it).
pub fn prog_load(prog_type: u32, insns: &[u64], name: &str) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    let len = name.len().min(15);
    prog_name[..len].copy_from_slice(&name.as_bytes()[..len]);
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        ..ProgLoadAttr::default()
    };
    let ret = sys_bpf(BPF_PROG_LOAD, &mut attr).with_context(|| format!("BPF_PROG_LOAD ({name})"))?;
    Ok(fd_from(ret))
}

/// Loads `r0 = TC_ACT_OK; exit`, a classifier that does nothing: its test-run
/// duration is the harness's own cost, to read the others against.
pub fn load_empty_classifier() -> Result<OwnedFd> {
    prog_load(BPF_PROG_TYPE_SCHED_CLS, &return_insns(0), "weir_empty")
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// Attaches `prog` to the device `ifindex` with a link of `attach_type`
/// (`enum bpf_attach_type`) and `flags`; dropping the link detaches it.
pub fn link_create(prog: &OwnedFd, ifindex: u32, attach_type: u32, flags: u32) -> std::io::Result<OwnedFd> {
    let mut attr =
        LinkCreateAttr { prog_fd: prog.as_raw_fd() as u32, target_ifindex: ifindex, attach_type, flags };
    Ok(fd_from(sys_bpf(BPF_LINK_CREATE, &mut attr)?))
}

/// Fails unless `run` passed the packet (TC_ACT_OK = 0).
pub fn expect_pass(what: &str, run: &TestRun) -> Result<()> {
    if run.retval != 0 {
        bail!("{what}: the program returned {} (expected TC_ACT_OK)", run.retval as i32);
    }
    Ok(())
}
