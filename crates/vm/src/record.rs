//! What strata keeps about a VM: its definition (with the disks QEMU writes
//! now), its snapshot tree, and the intent of a multi-step operation under way.
//! All of it is one JSON document written atomically (see `state`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state::{check_name, write_atomic, RECORD};

/// One disk: an image file and its format (`qcow2` or `raw`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Disk {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub file: PathBuf,
    #[serde(default = "default_format")]
    pub format: String,
}

fn default_format() -> String {
    "qcow2".to_string()
}

/// A VM definition (also the `define --file` document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmDef {
    pub name: String,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    pub cpus: u32,
    /// The disks in guest order (virtio: vda, vdb, ...). After an external
    /// snapshot or revert these are the overlays QEMU writes.
    pub disks: Vec<Disk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
}

/// Internal (inside the qcow2 files) or external (overlays on frozen files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Kind {
    Internal,
    External,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Internal => "internal",
            Kind::External => "external",
        }
    }
}

/// One snapshot of the tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Snapshot {
    pub name: String,
    /// The snapshot the VM's state came from when this one was taken.
    pub parent: Option<String>,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    pub kind: Kind,
    /// Whether the guest's memory (and device state) was saved.
    pub memory: bool,
    /// External memory snapshots: the file holding the memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub memory_file: Option<PathBuf>,
    /// How `memory_file` is laid out (records without it: `mapped-ram`).
    #[serde(default, skip_serializing_if = "MemoryLayout::is_mapped_ram")]
    pub memory_layout: MemoryLayout,
    /// Internal: the files holding the snapshot. External: the files frozen at
    /// the snapshot (the backing files of the overlays made then).
    pub disks: Vec<Disk>,
    /// The VM's run state when taken: `running`, `paused` or `stopped`.
    pub vm_state: String,
    /// With `--quiesce`: the number of guest filesystems the agent froze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_filesystems: Option<u64>,
    /// How long the guest was paused for the snapshot, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
}

/// How QEMU laid out a memory file; loading it needs the same layout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum MemoryLayout {
    /// QEMU's `mapped-ram`: every page at a fixed offset of a sparse file (what
    /// a save copied while the guest ran, each page once at its place).
    #[default]
    MappedRam,
    /// One sequential migration stream (a background snapshot writes each page
    /// once; QEMU 10 cannot load its `mapped-ram` form).
    Stream,
}

impl MemoryLayout {
    fn is_mapped_ram(&self) -> bool {
        *self == MemoryLayout::MappedRam
    }
}

/// One snapshot with its place in the tree, as `snapshot info` and the HTTP
/// API show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SnapshotInfo {
    #[serde(flatten)]
    pub snapshot: Snapshot,
    /// The snapshots whose parent this one is.
    pub children: Vec<String>,
    /// Whether the VM's current state descends from this snapshot directly.
    pub current: bool,
}

/// A multi-step operation under way: recorded before its first step, cleared in
/// the same write that records its result. The next command finishes or rolls
/// it back (see `recover`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intent {
    /// `create`, `revert` or `delete`.
    pub op: String,
    pub snapshot: String,
    pub kind: Kind,
    /// Files the operation creates (overlays, memory file): removed on rollback.
    #[serde(default)]
    pub new_files: Vec<PathBuf>,
    /// The guest's filesystems may be frozen by this operation (`--quiesce`):
    /// recovery thaws them.
    #[serde(default)]
    pub quiesce: bool,
}

/// Everything strata keeps about one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub def: VmDef,
    #[serde(default)]
    pub snapshots: Vec<Snapshot>,
    /// The snapshot the VM's current state descends from.
    #[serde(default)]
    pub current: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<Intent>,
    /// The guest's saved memory (`vm save`): the next start resumes from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved: Option<Saved>,
    /// A disk being restored from a backup while the VM runs on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<crate::restore::InstantRestore>,
}

/// A VM's state saved to a file by `vm save`, for `vm start` or `vm restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// The memory (and device state) file.
    pub file: PathBuf,
    /// The run state when saved: `running` or `paused`, as the guest resumes.
    pub vm_state: String,
}

impl VmRecord {
    pub fn load(dir: &Path) -> Result<VmRecord> {
        let path = dir.join(RECORD);
        let data =
            std::fs::read(&path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        serde_json::from_slice(&data)
            .map_err(|e| Error::Invalid(format!("{} is damaged: {e}", path.display())))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut data = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Invalid(format!("cannot encode the VM record: {e}")))?;
        data.push(b'\n');
        write_atomic(&dir.join(RECORD), &data)
    }

    pub fn snapshot(&self, name: &str) -> Result<&Snapshot> {
        self.snapshots
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::NoSuchSnapshot {
                vm: self.def.name.clone(),
                snap: name.to_string(),
            })
    }

    /// Snapshot `name` with its children and whether it is the current one.
    pub fn snapshot_info(&self, name: &str) -> Result<SnapshotInfo> {
        Ok(SnapshotInfo {
            snapshot: self.snapshot(name)?.clone(),
            children: self.children(name),
            current: self.current.as_deref() == Some(name),
        })
    }

    /// The names of the snapshots whose parent is `name`.
    pub fn children(&self, name: &str) -> Vec<String> {
        self.snapshots
            .iter()
            .filter(|s| s.parent.as_deref() == Some(name))
            .map(|s| s.name.clone())
            .collect()
    }

    /// True when `file` is a disk of some snapshot (so it must be kept).
    pub fn file_in_use(&self, file: &Path) -> bool {
        self.def.disks.iter().any(|d| d.file == file)
            || self.saved.as_ref().is_some_and(|s| s.file == file)
            || self
                .snapshots
                .iter()
                .any(|s| s.disks.iter().any(|d| d.file == file))
    }
}

/// Parse a memory size: a number of MiB, or a number with a `K`, `M`, `G` or
/// `T` suffix (binary units); the result is in MiB and at least 1.
pub fn parse_memory(s: &str) -> Result<u64> {
    let bad = || Error::Invalid(format!("invalid memory size '{s}' (e.g. 512M, 2G)"));
    let t = s.trim();
    let (num, mult_kib): (&str, u64) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1),
        Some('m' | 'M') => (&t[..t.len() - 1], 1024),
        Some('g' | 'G') => (&t[..t.len() - 1], 1024 * 1024),
        Some('t' | 'T') => (&t[..t.len() - 1], 1024 * 1024 * 1024),
        _ => (t, 1024),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let kib = n.checked_mul(mult_kib).ok_or_else(bad)?;
    if kib == 0 || kib % 1024 != 0 {
        return Err(bad());
    }
    Ok(kib / 1024)
}

/// Parse `PATH[,format=FMT]`.
pub fn parse_disk(s: &str) -> Result<Disk> {
    let (path, format) = match s.rsplit_once(",format=") {
        Some((p, f)) => (p, f.to_string()),
        None => (s, default_format()),
    };
    if path.is_empty() {
        return Err(Error::Invalid(format!("invalid disk '{s}': no path")));
    }
    Ok(Disk {
        file: PathBuf::from(path),
        format,
    })
}

impl VmDef {
    /// Check the definition and make its paths absolute: the name is safe, the
    /// sizes are sane, every disk exists and is of its stated format.
    pub fn validate(&mut self) -> Result<()> {
        check_name("VM", &self.name)?;
        if self.memory_mib == 0 {
            return Err(Error::Invalid("memory must be at least 1 MiB".into()));
        }
        if self.cpus == 0 || self.cpus > 1024 {
            return Err(Error::Invalid(format!(
                "invalid CPU count {} (1 to 1024)",
                self.cpus
            )));
        }
        if self.disks.is_empty() {
            return Err(Error::Invalid("a VM needs at least one --disk".into()));
        }
        let abs = |p: &Path, what: &str| -> Result<PathBuf> {
            std::fs::canonicalize(p).map_err(|e| {
                Error::Invalid(format!("{what} '{}' cannot be used: {e}", p.display()))
            })
        };
        for d in &mut self.disks {
            d.file = abs(&d.file, "disk")?;
            let want: strata_format::Format = d.format.parse().map_err(|_| {
                Error::Invalid(format!(
                    "disk '{}': unknown format '{}' (qcow2 or raw)",
                    d.file.display(),
                    d.format
                ))
            })?;
            let found = strata_chain::probe_format(&d.file)?;
            if found != want {
                return Err(Error::Invalid(format!(
                    "disk '{}' is {}, not {}",
                    d.file.display(),
                    found.name(),
                    want.name()
                )));
            }
        }
        if let Some(k) = &self.kernel {
            self.kernel = Some(abs(k, "kernel")?);
        }
        if let Some(i) = &self.initrd {
            self.initrd = Some(abs(i, "initrd")?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_are_mib_by_default_and_take_binary_suffixes() {
        assert_eq!(parse_memory("256").unwrap(), 256);
        assert_eq!(parse_memory("1G").unwrap(), 1024);
        assert_eq!(parse_memory("2048k").unwrap(), 2);
        for bad in ["", "0", "1x", "1000K", "99999999999999T"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_disk_argument_takes_an_optional_format() {
        assert_eq!(parse_disk("/a,b.img,format=raw").unwrap().format, "raw");
        assert_eq!(
            parse_disk("/a.qcow2").unwrap(),
            Disk {
                file: "/a.qcow2".into(),
                format: "qcow2".into()
            }
        );
    }
}
