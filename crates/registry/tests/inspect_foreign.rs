//! Uploads of the formats of other tools (vmdk, vhd, vhdx, vdi), made by
//! qemu-img: measured by strata's drivers as qemu-img measures them, and
//! refused, as Glance's format inspection refuses them, when they name other
//! files of the host (vmdk extents and parents), are damaged, or are declared
//! as another format than the one a consumer probing them would read.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Map, Value};
use strata_registry::{ErrorKind, Registry, Status};

fn qemu_img(dir: &Path, args: &[&str]) {
    let st = Command::new("qemu-img")
        .current_dir(dir)
        .args(args)
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img {args:?}");
}

/// `qemu-io -f FMT -c CMD FILE`; `-r` (read-only) when `cmd` is a read.
fn qemu_io(dir: &Path, fmt: &str, file: &str, cmd: &str) {
    let mut args = vec!["-f", fmt, "-c", cmd, file];
    if cmd.starts_with("read") {
        args.insert(0, "-r");
    }
    let st = Command::new("qemu-io")
        .current_dir(dir)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("qemu-io");
    assert!(st.success(), "qemu-io {cmd}");
}

/// The virtual size `qemu-img info -f DRIVER` reports.
fn qemu_virtual_size(driver: &str, path: &Path) -> u64 {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", driver])
        .arg(path)
        .output()
        .expect("qemu-img");
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

struct Fixture {
    dir: tempfile::TempDir,
    reg: Registry,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("registry")).unwrap();
        Fixture { dir, reg }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Upload `bytes` as a new image declared `fmt`; the image's id and the
    /// upload's outcome.
    fn upload(
        &self,
        fmt: &str,
        bytes: &[u8],
    ) -> (
        String,
        strata_registry::Result<strata_registry::ImageRecord>,
    ) {
        let meta: Map<String, Value> =
            json!({"name": "x", "disk_format": fmt, "container_format": "bare"})
                .as_object()
                .cloned()
                .unwrap();
        let id = self.reg.create(&meta).unwrap().id;
        let mut up = self.reg.begin_upload(&id, None).unwrap();
        up.write(bytes).unwrap();
        (id.clone(), up.finish())
    }

    /// The upload of `bytes` declared `fmt` is refused as invalid with a
    /// message holding `why` and no path of the server, and the image stays
    /// queued.
    fn refused(&self, fmt: &str, bytes: &[u8], why: &str) {
        let (id, r) = self.upload(fmt, bytes);
        let e = r.expect_err(why);
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
        assert!(e.to_string().contains(why), "{fmt}: {e}");
        let server = self.reg_dir();
        assert!(!e.to_string().contains(&server), "a path in: {e}");
        assert_eq!(self.reg.get(&id).unwrap().status, Status::Queued);
    }

    fn reg_dir(&self) -> String {
        self.path("registry").display().to_string()
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }
}

#[test]
fn images_qemu_img_makes_are_accepted_and_measured_as_qemu_img_measures_them() {
    let fx = Fixture::new();
    let d = fx.dir.path();
    for (glance, driver, name, opts) in [
        ("vmdk", "vmdk", "a.vmdk", "subformat=monolithicSparse"),
        ("vmdk", "vmdk", "s.vmdk", "subformat=streamOptimized"),
        ("vhd", "vpc", "d.vhd", "subformat=dynamic"),
        ("vhd", "vpc", "f.vhd", "subformat=fixed"),
        ("vhdx", "vhdx", "x.vhdx", "subformat=dynamic"),
        ("vdi", "vdi", "v.vdi", "static=off"),
    ] {
        qemu_img(d, &["create", "-q", "-f", driver, "-o", opts, name, "5M"]);
        if name != "s.vmdk" {
            qemu_io(d, driver, name, "write -P 0x5a 1M 1M");
        }
        let (_, r) = fx.upload(glance, &fx.read(name));
        let rec = r.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(rec.status, Status::Active, "{name}");
        assert_eq!(
            rec.virtual_size,
            Some(qemu_virtual_size(driver, &fx.path(name))),
            "{name}"
        );
    }
}

#[test]
fn a_vmdk_naming_other_files_of_the_host_is_refused_whatever_it_is_declared() {
    let fx = Fixture::new();
    let d = fx.dir.path();
    std::fs::write(fx.path("secret"), vec![b's'; 4096]).unwrap();
    let secret = fx.path("secret").display().to_string();
    let descriptor = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\nRW 8 FLAT \"{secret}\" 0\n\n\
         ddb.virtualHWVersion = \"4\"\nddb.adapterType = \"ide\"\n"
    );
    // Read by qemu-img, the descriptor reaches the host's file.
    std::fs::write(fx.path("flat.vmdk"), &descriptor).unwrap();
    qemu_io(d, "vmdk", "flat.vmdk", "read -P 0x73 0 4096");
    fx.refused("vmdk", descriptor.as_bytes(), "names other files");
    fx.refused("raw", descriptor.as_bytes(), "is a vmdk image");
    fx.refused("iso", descriptor.as_bytes(), "is a vmdk image");

    // A sparse header that only carries a descriptor (capacity 0) names
    // extents too.
    qemu_img(d, &["create", "-q", "-f", "vmdk", "h.vmdk", "1M"]);
    let mut only_descriptor = fx.read("h.vmdk");
    only_descriptor[12..20].fill(0);
    fx.refused("vmdk", &only_descriptor, "names other files");

    // A sparse file naming a parent.
    qemu_img(d, &["create", "-q", "-f", "vmdk", "base.vmdk", "1M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            "top.vmdk",
        ],
    );
    fx.refused("vmdk", &fx.read("top.vmdk"), "backing file");
    fx.refused("raw", &fx.read("base.vmdk"), "is a vmdk image");
}

#[test]
fn data_of_another_format_or_damaged_tables_are_refused() {
    let fx = Fixture::new();
    let d = fx.dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "q.qcow2", "1M"]);
    qemu_img(d, &["create", "-q", "-f", "vpc", "d.vhd", "1M"]);
    qemu_img(d, &["create", "-q", "-f", "vhdx", "x.vhdx", "1M"]);
    qemu_img(d, &["create", "-q", "-f", "vdi", "v.vdi", "2M"]);
    for fmt in ["vmdk", "vhd", "vhdx", "vdi"] {
        let why = format!("not a valid {fmt} image");
        fx.refused(fmt, &fx.read("q.qcow2"), &why);
        fx.refused(fmt, b"plain bytes, no header of any format", &why);
    }
    fx.refused(
        "raw",
        &fx.read("q.qcow2"),
        "is a qcow2 image: set disk_format to qcow2",
    );
    fx.refused(
        "raw",
        &fx.read("d.vhd"),
        "is a vhd image: set disk_format to vhd",
    );
    fx.refused("ami", &fx.read("x.vhdx"), "is a vhdx image");
    fx.refused("iso", &fx.read("v.vdi"), "is a vdi image");
    fx.refused("vdi", &fx.read("x.vhdx"), "not a valid vdi image");
    // Parallels (Virtuozzo's ploop) data is Glance's ploop, not raw.
    qemu_img(d, &["create", "-q", "-f", "parallels", "p.hds", "4M"]);
    fx.refused(
        "raw",
        &fx.read("p.hds"),
        "is a ploop image: set disk_format to ploop",
    );
    let (_, as_ploop) = fx.upload("ploop", &fx.read("p.hds"));
    assert_eq!(
        as_ploop.expect("ploop data as ploop").status,
        Status::Active
    );

    // A vdi whose block map names one data block twice: qemu-img check
    // reports it, the upload is refused.
    qemu_io(d, "vdi", "v.vdi", "write -P 1 0 1M");
    qemu_io(d, "vdi", "v.vdi", "write -P 2 1M 1M");
    let mut twice = fx.read("v.vdi");
    let bmap = u32::from_le_bytes(twice[0x154..0x158].try_into().unwrap()) as usize;
    let first: [u8; 4] = twice[bmap..bmap + 4].try_into().unwrap();
    twice[bmap + 4..bmap + 8].copy_from_slice(&first);
    std::fs::write(fx.path("twice.vdi"), &twice).unwrap();
    let check = Command::new("qemu-img")
        .args(["check", "-f", "vdi"])
        .arg(fx.path("twice.vdi"))
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(2), "qemu-img check finds it");
    fx.refused("vdi", &twice, "tables are damaged");

    // A differencing VHD (its footer's disk type 4, checksum kept right).
    let mut diff = fx.read("d.vhd");
    let end = diff.len() - 512;
    for at in [0, end] {
        let footer = &mut diff[at..at + 512];
        footer[60..64].copy_from_slice(&4u32.to_be_bytes());
        footer[64..68].fill(0);
        let sum: u32 = footer.iter().map(|&b| u32::from(b)).sum();
        footer[64..68].copy_from_slice(&(!sum).to_be_bytes());
    }
    fx.refused("vhd", &diff, "differencing VHD images are refused");
}
