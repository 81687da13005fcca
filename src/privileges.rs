//! Capabilities: which ones the daemon uses, dropping every other one, and
//! telling the user once, at start-up, what it cannot do without them.
//!
//! | capability            | used for                                              |
//! |-----------------------|-------------------------------------------------------|
//! | CAP_NET_RAW           | opening a capture (a packet socket)                   |
//! | CAP_NET_ADMIN         | capture setups that change socket or device settings  |
//! | CAP_SYS_PTRACE        | reading other users' /proc/<pid>/fd and ns/net links  |
//! | CAP_DAC_READ_SEARCH   | listing other users' /proc/<pid>/fd directories       |
//! | CAP_PERFMON           | kernel events that tell who owns a flow (`all`, `tree`) |
//! | CAP_SYS_ADMIN         | entering another network namespace (setns), unmount   |
//!
//! Capabilities belong to threads and are inherited by the threads they
//! start, so [`drop_unused`] runs before the daemon starts any.

use caps::{CapSet, Capability};
use log::{debug, warn};

/// What netstatfs keeps.
pub const USED: [Capability; 6] = [
    Capability::CAP_NET_RAW,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_PTRACE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_PERFMON,
    Capability::CAP_SYS_ADMIN,
];

/// The `setcap` line that grants a plain user's copy of the binary what
/// it needs (entering other network namespaces needs cap_sys_admin too).
pub fn setcap_command() -> String {
    let program = std::env::current_exe()
        .map(|path| path.display().to_string())
        .unwrap_or_else(|_| "netstatfs".into());
    format!(
        "sudo setcap cap_net_raw,cap_net_admin,cap_sys_ptrace,cap_dac_read_search,cap_perfmon+ep {program}"
    )
}

fn has(capability: Capability) -> bool {
    caps::has_cap(None, CapSet::Effective, capability).unwrap_or(false)
}

/// Says once what netstatfs cannot do with the capabilities it has.
pub fn report_missing() {
    if !has(Capability::CAP_NET_RAW) {
        warn!(
            "without CAP_NET_RAW, socket files cannot be read (capturing needs it); grant it with: {}",
            setcap_command()
        );
    }
    if !has(Capability::CAP_SYS_PTRACE) || !has(Capability::CAP_DAC_READ_SEARCH) {
        warn!(
            "without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH, only your own processes are listed \
             (other users' /proc/<pid>/fd cannot be read); grant them with: {}",
            setcap_command()
        );
    }
    if !has(Capability::CAP_PERFMON) && !has(Capability::CAP_SYS_ADMIN) {
        warn!(
            "without CAP_PERFMON, all and tree streams follow /proc instead of kernel events \
             (flows shorter than about 10 ms are missed); grant it with: {}",
            setcap_command()
        );
    }
    if !has(Capability::CAP_SYS_ADMIN) {
        debug!(
            "without CAP_SYS_ADMIN, sockets in other network namespaces cannot be read (setns needs it)"
        );
    }
}

/// Drops every capability netstatfs does not use, from the effective,
/// permitted and inheritable sets, the ambient set and (where allowed) the
/// bounding set. A no-op for a process that has none of the others.
pub fn drop_unused() -> Result<(), String> {
    let keep: caps::CapsHashSet = USED.into_iter().collect();
    // The bounding set first, while CAP_SETPCAP may still be there.
    if has(Capability::CAP_SETPCAP) {
        for capability in caps::all().difference(&keep) {
            if caps::has_cap(None, CapSet::Bounding, *capability).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, *capability).map_err(|err| {
                    format!("cannot drop {capability} from the bounding set: {err}")
                })?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient)
        .map_err(|err| format!("cannot clear ambient capabilities: {err}"))?;
    caps::clear(None, CapSet::Inheritable)
        .map_err(|err| format!("cannot clear inheritable capabilities: {err}"))?;
    for set in [CapSet::Effective, CapSet::Permitted] {
        let current =
            caps::read(None, set).map_err(|err| format!("cannot read capabilities: {err}"))?;
        let wanted: caps::CapsHashSet = current.intersection(&keep).copied().collect();
        caps::set(None, set, &wanted).map_err(|err| format!("cannot drop capabilities: {err}"))?;
    }
    Ok(())
}
