//! OpenStack's own image client, python-glanceclient (installed from PyPI into
//! a virtualenv kept under target/), drives `strata serve`: create with a
//! file, list, show, download, update, tags, delete, with the image data in
//! the state directory and in a backup repository. Its numbers are checked
//! against md5sum, sha512sum and the file itself. A missing python3, venv or
//! pip fails the test.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::api::{hash, token, Server};
use common::image_repo::{ImageRepo, Kind};

/// The virtualenv with glanceclient, made once (by one test of this binary at
/// a time) and reused by later runs.
fn glance_bin() -> PathBuf {
    static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VENV.get_or_init(make_venv).clone()
}

fn make_venv() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("glance-venv");
    let bin = venv.join("bin").join("glance");
    if !bin.exists() {
        let st = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 must be installed (with its venv module)");
        assert!(
            st.success(),
            "python3 -m venv failed (install python3-venv)"
        );
        let st = Command::new(venv.join("bin").join("pip"))
            .args(["install", "-q", "python-glanceclient"])
            .status()
            .expect("pip in the virtualenv");
        assert!(st.success(), "pip install python-glanceclient failed");
    }
    assert!(
        bin.exists(),
        "{} missing after installing glanceclient",
        bin.display()
    );
    bin
}

struct Glance {
    bin: PathBuf,
    url: String,
    token: String,
    home: PathBuf,
    /// A CA bundle for TLS (given as REQUESTS_CA_BUNDLE: glanceclient's own
    /// --os-cacert does not reach its version discovery request).
    ca: Option<PathBuf>,
}

impl Glance {
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let o = Command::new(&self.bin)
            .args(["--os-image-url", &self.url, "--os-auth-token", &self.token])
            .args(args)
            .env("HOME", &self.home)
            .env_remove("OS_AUTH_URL")
            .env_remove("REQUESTS_CA_BUNDLE")
            .envs(self.ca.iter().map(|c| ("REQUESTS_CA_BUNDLE", c)))
            .output()
            .expect("run glance");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "glance {args:?} failed:\n{out}{err}");
        out
    }

    /// `glance image-show` (or any property table) as a map; values wrapped
    /// over several rows are joined.
    fn table(&self, args: &[&str]) -> BTreeMap<String, String> {
        parse_table(&self.ok(args))
    }
}

fn parse_table(out: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut last = String::new();
    for line in out.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() != 2 || cells[0] == "Property" {
            continue;
        }
        if cells[0].is_empty() {
            m.entry(last.clone())
                .or_insert_with(String::new)
                .push_str(cells[1]);
        } else {
            last = cells[0].to_string();
            m.insert(last.clone(), cells[1].to_string());
        }
    }
    m
}

#[test]
fn glanceclient_creates_lists_shows_downloads_updates_tags_and_deletes_an_image() {
    glance_round_trip(None);
}

#[test]
fn glanceclient_round_trips_an_image_kept_in_a_backup_repository() {
    glance_round_trip(Some(Kind::Dir));
}

/// Every verb of the client on one image, its data in the state directory
/// (`repo` None) or in a new repository of that kind.
fn glance_round_trip(repo: Option<Kind>) {
    let bin = glance_bin();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tok = token(&state, false);
    let repo = repo.map(|k| ImageRepo::init(k, dir.path()));
    let srv = match &repo {
        None => Server::start(&state, &[]),
        Some(r) => r.serve(&state),
    };
    let g = Glance {
        bin,
        url: srv.url.clone(),
        token: tok,
        home: dir.path().join("home"),
        ca: None,
    };
    let img = dir.path().join("disk.qcow2");
    common::ok(
        dir.path(),
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "disk.qcow2", "256M"],
    );
    common::io(
        dir.path(),
        "qcow2",
        "disk.qcow2",
        &["write -P 0x5a 1M 3M", "write -P 0x17 200M 64k"],
    );
    let img_s = img.to_str().unwrap();

    let created = g.table(&[
        "image-create",
        "--file",
        img_s,
        "--disk-format",
        "qcow2",
        "--container-format",
        "bare",
        "--name",
        "golden",
    ]);
    let id = created["id"].clone();
    let size = std::fs::metadata(&img).unwrap().len().to_string();
    let shown = g.table(&["image-show", &id]);
    assert_eq!(shown["status"], "active");
    assert_eq!(shown["name"], "golden");
    assert_eq!(shown["size"], size);
    assert_eq!(shown["virtual_size"], (256u64 << 20).to_string());
    assert_eq!(shown["checksum"], hash("md5sum", &img));
    assert_eq!(shown["os_hash_algo"], "sha512");
    assert_eq!(shown["os_hash_value"], hash("sha512sum", &img));

    let list = g.ok(&["image-list"]);
    assert!(list.contains(&id) && list.contains("golden"), "{list}");

    let back = dir.path().join("back.qcow2");
    g.ok(&["image-download", "--file", back.to_str().unwrap(), &id]);
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&img).unwrap());
    let data_file = state.join("images").join(format!("{id}.data"));
    assert_eq!(
        data_file.exists(),
        repo.is_none(),
        "{}",
        data_file.display()
    );
    if let Some(r) = &repo {
        assert_eq!(r.image_snapshots(&id).len(), 1);
    }

    let updated = g.table(&[
        "image-update",
        "--name",
        "golden-2",
        "--property",
        "os_distro=debian",
        &id,
    ]);
    assert_eq!(
        (updated["name"].as_str(), updated["os_distro"].as_str()),
        ("golden-2", "debian")
    );
    let updated = g.table(&["image-update", "--remove-property", "os_distro", &id]);
    assert!(!updated.contains_key("os_distro"), "{updated:?}");

    g.ok(&["image-tag-update", &id, "base"]);
    g.ok(&["image-tag-update", &id, "linux"]);
    assert_eq!(
        g.table(&["image-show", &id])["tags"],
        r#"["base", "linux"]"#
    );
    g.ok(&["image-tag-delete", &id, "base"]);
    assert_eq!(g.table(&["image-show", &id])["tags"], r#"["linux"]"#);
    let filtered = g.ok(&["image-list", "--tag", "linux"]);
    assert!(filtered.contains(&id), "{filtered}");
    let filtered = g.ok(&["image-list", "--tag", "base"]);
    assert!(!filtered.contains(&id), "{filtered}");

    g.ok(&["image-update", "--protected", "True", &id]);
    let (ok, _, err) = g.run(&["image-delete", &id]);
    assert!(
        !ok && err.contains("not permitted"),
        "a protected image was deleted: {err}"
    );
    g.ok(&["image-update", "--protected", "False", &id]);
    g.ok(&["image-delete", &id]);
    let (ok, _, err) = g.run(&["image-show", &id]);
    assert!(!ok && err.contains("No image found"), "{err}");
    assert!(!g.ok(&["image-list"]).contains(&id));
    if let Some(r) = &repo {
        // The image's snapshot went with it, and the repository is sound.
        assert_eq!(r.image_snapshots(&id), Vec::<String>::new());
        r.check();
    }
}

#[test]
fn glanceclient_pages_through_a_long_list_by_its_next_links() {
    let bin = glance_bin();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tok = token(&state, false);
    let srv = Server::start(&state, &[]);
    let n = 45;
    for i in 0..n {
        let body = format!(
            r#"{{"name": "img-{i:02}", "disk_format": "raw", "container_format": "bare"}}"#
        );
        let r = srv.req(
            "POST",
            "/v2/images",
            Some(&tok),
            Some("application/json"),
            body.as_bytes(),
        );
        assert_eq!(r.status, 201);
    }
    let g = Glance {
        bin,
        url: srv.url.clone(),
        token: tok,
        home: dir.path().join("home"),
        ca: None,
    };
    // A page size below the count makes the client follow `next` links.
    let out = g.ok(&[
        "image-list",
        "--page-size",
        "7",
        "--sort-key",
        "name",
        "--sort-dir",
        "asc",
    ]);
    let names: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split('|').nth(2))
        .map(str::trim)
        .filter(|s| s.starts_with("img-"))
        .collect();
    let want: Vec<String> = (0..n).map(|i| format!("img-{i:02}")).collect();
    assert_eq!(names, want);
}

#[test]
fn glanceclient_reaches_the_server_over_tls_with_the_server_certificate() {
    let bin = glance_bin();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tok = token(&state, false);
    let (srv, cert) = Server::start_tls(&state, dir.path());
    let mut g = Glance {
        bin,
        url: srv.url.clone(),
        token: tok,
        home: dir.path().join("home"),
        ca: Some(cert.clone()),
    };
    let created = g.table(&[
        "image-create",
        "--name",
        "tls",
        "--disk-format",
        "raw",
        "--container-format",
        "bare",
    ]);
    // Not a terminal on stdin: the client uploads what stdin holds (nothing).
    assert_eq!(
        (created["status"].as_str(), created["size"].as_str()),
        ("active", "0")
    );
    assert!(g.ok(&["image-list"]).contains(&created["id"]));
    // Without the certificate the client refuses the server.
    g.ca = None;
    let (ok, _, err) = g.run(&["image-list"]);
    assert!(!ok, "an unverified TLS server was accepted: {err}");
}
