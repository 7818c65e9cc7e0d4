//! Helpers of the tests that drive a running VM of `strata vm`: its monitor and
//! writes through QEMU's own block layer (no guest needs to boot).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The monitor of the VM whose directory is `vm_dir`, on a connection of the
/// test's own (QEMU serves one client at a time: drop it before the next strata
/// command).
pub fn monitor(vm_dir: &Path) -> strata_qmp::Qmp {
    strata_qmp::Qmp::connect(&vm_dir.join("qmp.sock"), Duration::from_secs(30)).unwrap()
}

/// Run one qemu-io command inside the running QEMU on the guest's first disk,
/// through the guest device's own block backend as the guest's I/O goes (what
/// qemu-io prints goes to QEMU's log). A command QEMU refuses fails the test.
pub fn qemu_io_inside(vm_dir: &Path, cmd: &str) -> String {
    let line = format!("qemu-io -d /machine/peripheral/vdisk0/virtio-backend \"{cmd}\"");
    let v = monitor(vm_dir)
        .execute_value(
            "human-monitor-command",
            Some(serde_json::json!({ "command-line": line })),
        )
        .unwrap();
    let out = v.as_str().unwrap().to_string();
    assert!(!out.contains("Error"), "{line}: {out}");
    out
}

/// Run `cmd` with strata told to stop dead (no cleanup) at VM step `step`
/// (`STRATA_VM_CRASH_AT`), and require that it did.
pub fn crashed_at(mut cmd: Command, step: &str) {
    let o = cmd.env("STRATA_VM_CRASH_AT", step).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(86),
        "{step}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
