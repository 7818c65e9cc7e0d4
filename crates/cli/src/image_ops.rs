//! Images and VMs together: `strata image create-from-snapshot` and
//! `create-from-vm` (images of a VM's disk), and the disks of `strata vm
//! define` made from images (`--disk-from-image IMAGE[,clone=thin|copy]`, or
//! `{image = "...", clone = "thin"}` entries among a definition file's disks).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use strata_jobs::{Cancel, NoProgress};
use strata_registry::deploy::CloneMode;
use strata_registry::from_vm::{FromVm, Source};
use strata_registry::{ImageRecord, Registry};
use strata_vm::{Disk, Manager, StateDir, VmDef};

/// The options both image-from-VM commands take.
#[derive(clap::Args)]
pub struct ImageOpts {
    /// The image's name (default: VM-SNAPSHOT, or VM-TIME for a live image).
    #[arg(long)]
    name: Option<String>,
    /// The image's disk format: qcow2 or raw.
    #[arg(long, default_value = "qcow2")]
    disk_format: String,
    /// The VM's disk (0 for the first).
    #[arg(long, default_value_t = 0)]
    disk: usize,
}

#[derive(clap::Args)]
pub struct FromSnapshotArgs {
    vm: String,
    snapshot: String,
    #[command(flatten)]
    opts: ImageOpts,
}

#[derive(clap::Args)]
pub struct FromVmArgs {
    vm: String,
    /// Freeze the guest's filesystems through its agent for the instant taken.
    #[arg(long)]
    quiesce: bool,
    #[command(flatten)]
    opts: ImageOpts,
}

fn from_vm(reg: &Registry, vm: String, source: Source, o: ImageOpts) -> Result<ImageRecord> {
    let mgr = Manager::new(StateDir::new(reg.state_dir()));
    let req = FromVm {
        vm,
        source,
        disk: o.disk,
        name: o.name,
        disk_format: o.disk_format,
    };
    Ok(reg.create_from_vm(&mgr, &req, &NoProgress, &Cancel::default())?)
}

/// `strata image create-from-snapshot VM SNAPSHOT`.
pub fn from_snapshot(reg: &Registry, a: FromSnapshotArgs) -> Result<ImageRecord> {
    from_vm(reg, a.vm, Source::Snapshot(a.snapshot), a.opts)
}

/// `strata image create-from-vm VM`.
pub fn from_running(reg: &Registry, a: FromVmArgs) -> Result<ImageRecord> {
    let source = Source::Live { quiesce: a.quiesce };
    from_vm(reg, a.vm, source, a.opts)
}

/// One `--disk-from-image` value: IMAGE[,clone=thin|copy] (thin by default).
fn parse_image_disk(s: &str) -> Result<(String, CloneMode)> {
    let (image, mode) = match s.rsplit_once(",clone=") {
        Some((i, m)) => (i, m.parse()?),
        None => (s, CloneMode::Thin),
    };
    if image.is_empty() {
        bail!("invalid disk '{s}': no image");
    }
    Ok((image.to_string(), mode))
}

/// Disks of a VM being defined that are made from images; they are removed
/// again if the definition fails.
pub struct ImageDisks {
    made: Vec<PathBuf>,
    kept: bool,
}

impl ImageDisks {
    /// Nothing made yet, for VM `name` (refused at once when it is defined).
    pub fn new(mgr: &Manager, name: &str) -> Result<ImageDisks> {
        strata_vm::state::check_name("VM", name)?;
        if mgr
            .state_dir()
            .vm_dir(name)
            .join(strata_vm::state::RECORD)
            .exists()
        {
            bail!("VM '{name}' is already defined");
        }
        Ok(ImageDisks {
            made: Vec::new(),
            kept: false,
        })
    }

    /// Make disk number `index` of VM `name` from `image` in the VM's
    /// directory.
    fn make(
        &mut self,
        mgr: &Manager,
        name: &str,
        index: usize,
        image: &str,
        mode: CloneMode,
    ) -> Result<Disk> {
        let reg = Registry::open(mgr.state_dir().root()).context("open the image registry")?;
        let rec = reg.resolve(image)?;
        let dir = mgr.state_dir().vm_dir(name).join("disks");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let ext = match mode {
            CloneMode::Thin => "qcow2",
            CloneMode::Copy => rec.disk_format.as_deref().unwrap_or("raw"),
        };
        let dest = dir.join(format!("disk{index}-{}.{ext}", rec.id));
        let d = reg.clone_disk(&rec.id, &dest, mode)?;
        self.made.push(d.file.clone());
        Ok(Disk {
            file: d.file,
            format: d.format,
        })
    }

    /// Append a disk to `def` for each `--disk-from-image` value.
    pub fn add_options(&mut self, mgr: &Manager, def: &mut VmDef, values: &[String]) -> Result<()> {
        for v in values {
            let (image, mode) = parse_image_disk(v)?;
            let d = self.make(mgr, &def.name, def.disks.len(), &image, mode)?;
            def.disks.push(d);
        }
        Ok(())
    }

    /// Replace each `{image = ID-or-NAME, clone = "thin"|"copy"}` entry among
    /// the `disks` of a definition document by the disk made from it.
    pub fn resolve_document(
        &mut self,
        mgr: &Manager,
        name: &str,
        doc: &mut serde_json::Value,
    ) -> Result<()> {
        let Some(disks) = doc.get_mut("disks").and_then(|d| d.as_array_mut()) else {
            return Ok(());
        };
        for (i, entry) in disks.iter_mut().enumerate() {
            let Some(image) = entry.get("image") else {
                continue;
            };
            let image = image
                .as_str()
                .with_context(|| format!("disk {i}: 'image' must be a string"))?
                .to_string();
            let mode = match entry.get("clone") {
                None => CloneMode::Thin,
                Some(m) => m
                    .as_str()
                    .with_context(|| format!("disk {i}: 'clone' must be a string"))?
                    .parse()?,
            };
            if let Some(extra) = entry
                .as_object()
                .and_then(|o| o.keys().find(|k| !matches!(k.as_str(), "image" | "clone")))
            {
                bail!("disk {i}: unknown field '{extra}' beside 'image'");
            }
            let d = self.make(mgr, name, i, &image, mode)?;
            *entry = serde_json::json!({"file": d.file, "format": d.format});
        }
        Ok(())
    }

    /// The definition succeeded: keep the disks.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for ImageDisks {
    fn drop(&mut self) {
        if !self.kept {
            for f in &self.made {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

/// A definition file (TOML by its extension, else JSON) whose disks may be
/// made from images; `name` overrides the file's.
pub fn read_definition(mgr: &Manager, f: &Path, name: Option<&str>) -> Result<(VmDef, ImageDisks)> {
    let text = std::fs::read(f).with_context(|| format!("read {}", f.display()))?;
    let not_a_def = || format!("{} is not a VM definition", f.display());
    let mut doc: serde_json::Value = if f.extension().is_some_and(|e| e == "toml") {
        let text = std::str::from_utf8(&text).with_context(not_a_def)?;
        toml::from_str(text).with_context(not_a_def)?
    } else {
        serde_json::from_slice(&text).with_context(not_a_def)?
    };
    if let (Some(n), Some(o)) = (name, doc.as_object_mut()) {
        o.insert("name".into(), n.into());
    }
    let vm = doc
        .get("name")
        .and_then(|n| n.as_str())
        .with_context(not_a_def)?
        .to_string();
    let mut disks = ImageDisks::new(mgr, &vm)?;
    disks.resolve_document(mgr, &vm, &mut doc)?;
    let def = serde_json::from_value(doc).with_context(not_a_def)?;
    Ok((def, disks))
}
