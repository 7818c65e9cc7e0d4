//! The format layer: maps guest offsets to host data.
//!
//! Drivers: [`qcow2`] (versions 2 and 3, byte-compatible with QEMU), [`raw`],
//! [`luks`], and the formats of other tools as QEMU reads and writes them:
//! [`vpc`], [`vdi`], [`vhdx`], [`vmdk`], [`qed`], [`parallels`].
//! Both offer the guest view through [`BlockDevice`].

#![deny(clippy::cast_possible_truncation)]

pub mod crypto;
mod device;
mod device_storage;
mod error;
pub mod foreign_check;
#[doc(hidden)]
pub mod fuzzing;
pub mod luks;
pub mod parallels;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod units;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

pub use device::{
    check_range, reads_zero_by_status, BlockDevice, Extent, InternalSnapshots, Overlay, Status,
};
pub use device_storage::DeviceStorage;
pub use error::{Error, ErrorKind, Offset, Operation, Result};

/// Image formats strata reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Qcow2,
    Raw,
    /// A LUKS1 header, then the encrypted disk (QEMU's `luks` driver).
    Luks,
    /// Microsoft's VHD (QEMU's `vpc` driver).
    Vpc,
    /// VirtualBox's VDI.
    Vdi,
    /// Hyper-V's VHDX.
    Vhdx,
    /// VMware's VMDK.
    Vmdk,
    /// QEMU Enhanced Disk (QEMU's `qed` driver).
    Qed,
    /// Parallels Desktop's and Virtuozzo's disks.
    Parallels,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
            Format::Luks => "luks",
            Format::Vpc => "vpc",
            Format::Vdi => "vdi",
            Format::Vhdx => "vhdx",
            Format::Vmdk => "vmdk",
            Format::Qed => "qed",
            Format::Parallels => "parallels",
        }
    }

    /// The formats other than qcow2, raw and luks that QEMU reads and writes
    /// through its own drivers (their modules: [`vpc`], [`vdi`], [`vhdx`],
    /// [`vmdk`], [`qed`], [`parallels`]): no internal snapshots, bitmaps,
    /// amendment, measurement or emptying after a commit. Of them only qed
    /// resizes ([`Format::resizes`]) and has a backing file whose link can
    /// change.
    pub fn is_foreign(self) -> bool {
        matches!(
            self,
            Format::Vpc
                | Format::Vdi
                | Format::Vhdx
                | Format::Vmdk
                | Format::Qed
                | Format::Parallels
        )
    }

    /// Whether QEMU's driver for the format can change an image's virtual
    /// size (qcow2, raw and luks; qed only grows).
    pub fn resizes(self) -> bool {
        !self.is_foreign() || self == Format::Qed
    }

    /// Whether a new image of this format reads as zeroes before anything is
    /// written to it (a `luks` image's unwritten sectors decrypt to noise).
    pub fn zero_init(self) -> bool {
        self != Format::Luks
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            "luks" => Ok(Format::Luks),
            "vpc" => Ok(Format::Vpc),
            "vdi" => Ok(Format::Vdi),
            "vhdx" => Ok(Format::Vhdx),
            "vmdk" => Ok(Format::Vmdk),
            "qed" => Ok(Format::Qed),
            "parallels" => Ok(Format::Parallels),
            other => Err(Error::invalid_argument(format!(
                "Unknown file format '{other}'"
            ))),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
