//! Pieces of QEMU's command line that the VM manager and the test guest share:
//! the disks (a file node and a format node per disk, on virtio-blk) and the
//! control channels (the agent's virtio-serial port and the QMP socket), with
//! the node, device and chardev names both rely on.

use std::path::Path;
use std::process::Command;

/// The id of the agent's chardev and of its virtio-serial port.
pub const AGENT_CHARDEV: &str = "qga0";
pub const AGENT_PORT: &str = "qga0-port";

/// The format node of disk `i` as started (`disk0`, ...); its file node is
/// `disk{i}-file`.
pub fn disk_node(i: usize) -> String {
    format!("disk{i}")
}

/// The virtio-blk device id of disk `i`.
pub fn disk_device(i: usize) -> String {
    format!("vdisk{i}")
}

/// A path inside a QEMU option string (commas doubled).
pub fn escape(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// Add disk `i`: `file` opened with driver `format` (`qcow2` or `raw`).
pub fn add_disk(cmd: &mut Command, i: usize, file: &Path, format: &str) {
    let node = disk_node(i);
    cmd.arg("-blockdev").arg(format!(
        "driver=file,filename={},node-name={node}-file",
        escape(file)
    ));
    cmd.arg("-blockdev")
        .arg(format!("driver={format},file={node}-file,node-name={node}"));
    cmd.arg("-device")
        .arg(format!("virtio-blk-pci,drive={node},id={}", disk_device(i)));
}

/// Add the guest agent's port (host end: the unix socket `agent`) and the QMP
/// monitor on the unix socket `qmp`; neither waits for a client.
pub fn add_channels(cmd: &mut Command, agent: &Path, qmp: &Path) {
    cmd.args(["-device", "virtio-serial-pci,id=vser0"])
        .arg("-chardev")
        .arg(format!(
            "socket,id={AGENT_CHARDEV},path={},server=on,wait=off",
            escape(agent)
        ))
        .arg("-device")
        .arg(format!(
            "virtserialport,chardev={AGENT_CHARDEV},name=org.qemu.guest_agent.0,id={AGENT_PORT}"
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", escape(qmp)));
}
