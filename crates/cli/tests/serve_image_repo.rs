//! The image registry with its data in a backup repository (`strata serve
//! --image-store repo:PATH`, and `s3:URL` on a bucket of a real Garage
//! server): images go in and come out through the HTTP API (whole and by
//! ranges, checksums as md5sum and sha512sum compute them), the real restic
//! lists and checks the repository, a backup of the same disk adds no chunk,
//! prune never removes an image, delete and gc free an image's own data, and
//! a server killed during uploads leaves no image saving and no snapshot
//! behind. Each test runs once per kind of repository.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::api::{connect, create_image, hash, head, status_of, token, wait_status, Server};
use common::image_repo::{ImageRepo, Kind};
use common::restic::{env_count, noise, qemu_img, raw_disk, run, s, snapshots_json, stdout, MIB};

const OCTETS: Option<&str> = Some("application/octet-stream");

/// A repository, a state directory and an admin token.
struct Setup {
    repo: ImageRepo,
    state: PathBuf,
    tok: String,
    dir: tempfile::TempDir,
}

fn setup(kind: Kind) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let repo = ImageRepo::init(kind, dir.path());
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let tok = token(&state, false);
    Setup {
        repo,
        state,
        tok,
        dir,
    }
}

impl Setup {
    fn serve(&self) -> Server {
        self.repo.serve(&self.state)
    }

    fn upload(&self, srv: &Server, id: &str, data: &[u8]) -> u16 {
        let path = format!("/v2/images/{id}/file");
        srv.req("PUT", &path, Some(&self.tok), OCTETS, data).status
    }

    fn get(&self, srv: &Server, id: &str, range: Option<&str>) -> (u16, Vec<u8>) {
        let path = format!("/v2/images/{id}/file");
        let mut h = head("GET", &path, Some(&self.tok), None, None);
        if let Some(r) = range {
            h = h.replace("\r\n\r\n", &format!("\r\nRange: {r}\r\n\r\n"));
        }
        let mut c = connect(srv.addr);
        c.write_all(h.as_bytes()).unwrap();
        let reply = common::api::read_reply(&mut c);
        (reply.status, reply.body)
    }

    fn show(&self, srv: &Server, id: &str) -> serde_json::Value {
        let r = srv.req(
            "GET",
            &format!("/v2/images/{id}"),
            Some(&self.tok),
            None,
            b"",
        );
        assert_eq!(r.status, 200);
        r.json()
    }

    /// How many pack files the repository holds (restic lists them, taking no lock).
    fn packs(&self) -> usize {
        stdout(&run(self.repo.restic(&["--no-lock", "list", "packs"])))
            .lines()
            .count()
    }

    fn stats(&self) -> serde_json::Value {
        let o = run(self.repo.backup(&["stats", "--output=json"]));
        serde_json::from_str(&stdout(&o)).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

#[test]
fn an_image_in_a_repository_reads_back_whole_and_by_ranges_and_shares_chunks_with_backups() {
    reads_back_and_shares_chunks(Kind::Dir);
}

#[test]
fn an_image_in_an_s3_repository_reads_back_whole_and_by_ranges_and_shares_chunks_with_backups() {
    reads_back_and_shares_chunks(Kind::S3);
}

fn reads_back_and_shares_chunks(kind: Kind) {
    let st = setup(kind);
    // A whole number of sectors: a backup reads a raw disk as QEMU shows it,
    // its size rounded up to 512 bytes.
    let disk_path = st.path("disk.raw");
    let mut disk = raw_disk(&disk_path);
    disk.resize(disk.len().next_multiple_of(512), 0);
    write(&disk_path, &disk);
    let srv = st.serve();
    let id = create_image(&srv, &st.tok, "disk", "raw");
    assert_eq!(st.upload(&srv, &id, &disk), 204);
    let shown = st.show(&srv, &id);
    assert_eq!(shown["status"], "active");
    assert_eq!(shown["size"], disk.len() as u64);
    assert_eq!(shown["virtual_size"], disk.len() as u64);
    assert_eq!(shown["checksum"], hash("md5sum", &disk_path));
    assert_eq!(shown["os_hash_value"], hash("sha512sum", &disk_path));
    assert!(
        !st.state.join("images").join(format!("{id}.data")).exists(),
        "the data went to a file, not to the repository"
    );

    // Whole, and ranges inside a chunk, across chunk boundaries, in the zero
    // run, and at the end.
    let (status, body) = st.get(&srv, &id, None);
    assert_eq!(status, 200);
    assert!(body == disk, "the whole image reads back other bytes");
    let n = disk.len();
    for (range, a, b) in [
        ("bytes=0-0".to_string(), 0, 0),
        (
            format!("bytes={}-{}", 4 * MIB - 10, 4 * MIB + 9),
            4 * MIB - 10,
            4 * MIB + 9,
        ),
        (format!("bytes={}-{}", 5 * MIB, 27 * MIB), 5 * MIB, 27 * MIB),
        (format!("bytes={}-", n - 5000), n - 5000, n - 1),
        ("bytes=-100".to_string(), n - 100, n - 1),
    ] {
        let (status, body) = st.get(&srv, &id, Some(&range));
        assert_eq!(status, 206, "{range}");
        assert!(body == disk[a..=b], "{range} reads back other bytes");
    }

    // restic sees one image snapshot and checks every byte; strata's disk
    // listing leaves it out.
    let snaps = st.repo.image_snapshots(&id);
    assert_eq!(snaps.len(), 1);
    st.repo.check();
    let dumped = run(st.repo.restic(&["dump", &snaps[0], &format!("/{id}")])).stdout;
    assert!(dumped == disk, "restic dumps other bytes than the image's");
    let listed = run(st.repo.backup(&["list", "--output=json"]));
    assert!(snapshots_json(&listed).is_empty(), "{}", stdout(&listed));

    // A backup of the same disk stores no new data chunk.
    let before = st.stats();
    run(st.repo.backup(&["create", s(&disk_path)]));
    let after = st.stats();
    assert_eq!(after["unique_blobs"], before["unique_blobs"]);
    assert_eq!(after["unique_bytes"], before["unique_bytes"]);
    assert_eq!(
        after["logical_bytes"].as_u64().unwrap(),
        2 * before["logical_bytes"].as_u64().unwrap()
    );

    // Prune never removes the image, whatever it keeps of the backups.
    let other = st.path("other.raw");
    write(&other, &noise(MIB));
    run(st.repo.backup(&["create", s(&other)]));
    let pruned = run(st.repo.backup(&["prune", "--keep-last", "1"]));
    assert!(
        stdout(&pruned).contains("1 image snapshots of the image registry kept"),
        "{}",
        stdout(&pruned)
    );
    assert_eq!(st.repo.image_snapshots(&id).len(), 1);
    let (status, body) = st.get(&srv, &id, None);
    assert!(status == 200 && body == disk, "the image was lost to prune");

    // qcow2 data is inspected through the repository: a valid image becomes
    // active with its virtual size, one naming a backing file is refused and
    // leaves no snapshot.
    let qcow = st.path("disk.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&disk_path), s(&qcow)]);
    let qid = create_image(&srv, &st.tok, "qcow", "qcow2");
    assert_eq!(st.upload(&srv, &qid, &std::fs::read(&qcow).unwrap()), 204);
    let info: serde_json::Value =
        serde_json::from_slice(&qemu_img(&["info", "--output=json", s(&qcow)]).stdout).unwrap();
    assert_eq!(st.show(&srv, &qid)["virtual_size"], info["virtual-size"]);
    let overlay = st.path("overlay.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&qcow),
        "-F",
        "qcow2",
        s(&overlay),
    ]);
    let bad = create_image(&srv, &st.tok, "overlay", "qcow2");
    assert_eq!(
        st.upload(&srv, &bad, &std::fs::read(&overlay).unwrap()),
        400
    );
    assert_eq!(status_of(&srv, &st.tok, &bad), "queued");
    assert!(st.repo.image_snapshots(&bad).is_empty());

    // Deleting an image of data nothing else holds, then gc, frees that data;
    // everything else still reads back.
    let unique = noise(10 * MIB);
    let uid = create_image(&srv, &st.tok, "unique", "raw");
    assert_eq!(st.upload(&srv, &uid, &unique), 204);
    let with = st.stats();
    let r = srv.req(
        "DELETE",
        &format!("/v2/images/{uid}"),
        Some(&st.tok),
        None,
        b"",
    );
    assert_eq!(r.status, 204);
    assert!(
        st.repo.image_snapshots(&uid).is_empty(),
        "delete left the snapshot"
    );
    let gc = run(st.repo.backup(&["gc", "--output=json"]));
    let gc: serde_json::Value = serde_json::from_str(&stdout(&gc)).unwrap();
    assert!(
        gc["bytes_freed"].as_i64().unwrap() >= (10 * MIB) as i64,
        "gc freed too little: {gc}"
    );
    let without = st.stats();
    assert_eq!(
        with["unique_bytes"].as_u64().unwrap() - without["unique_bytes"].as_u64().unwrap(),
        (10 * MIB) as u64
    );
    st.repo.check();
    let (status, body) = st.get(&srv, &id, None);
    assert!(
        status == 200 && body == disk,
        "gc took data of a kept image"
    );
}

/// Where a kill lands in an upload.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// After the first MiB.
    Early,
    /// Once a pack of the upload is stored.
    AfterPack,
    /// After the whole body, `ms` later (during or after the commit).
    AfterBody(u64),
}

/// The files of `dir` and its subdirectories.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_server_killed_during_uploads_into_a_repository_leaves_no_snapshot_and_restarts_consistent() {
    killed_uploads_leave_nothing(Kind::Dir, 8);
}

#[test]
fn a_server_killed_during_uploads_into_an_s3_repository_leaves_no_snapshot_and_restarts_consistent()
{
    killed_uploads_leave_nothing(Kind::S3, 4);
}

/// `STRATA_TEST_IMAGE_KILLS` rounds (`default` when unset), each killing the
/// server at another point of an upload.
fn killed_uploads_leave_nothing(kind: Kind, default: u64) {
    let st = setup(kind);
    let rounds = env_count("STRATA_TEST_IMAGE_KILLS", default);
    let mut images = Vec::new();
    let mut kills_mid_upload = 0;
    for round in 0..rounds {
        let cut = match round % 4 {
            0 => Cut::Early,
            1 => Cut::AfterPack,
            // From 0.5 s on: the later ones land in the commit (packs,
            // index, snapshot, read-back, naming) or after it.
            _ => Cut::AfterBody(500 + (100 * round) % 1000),
        };
        // Data of its own: a pack is stored only for chunks the repository lacks.
        let data = noise(24 * MIB);
        let mut srv = st.serve();
        let id = create_image(&srv, &st.tok, &format!("cut-{round}"), "raw");
        let packs_before = st.packs();
        let mut c = connect(srv.addr);
        let path = format!("/v2/images/{id}/file");
        c.write_all(head("PUT", &path, Some(&st.tok), OCTETS, Some(data.len() as u64)).as_bytes())
            .unwrap();
        match cut {
            Cut::Early => {
                c.write_all(&data[..MIB]).unwrap();
                wait_status(&srv, &st.tok, &id, "saving");
            }
            Cut::AfterPack => {
                c.write_all(&data[..20 * MIB]).unwrap();
                let deadline = Instant::now() + Duration::from_secs(60);
                while st.packs() == packs_before {
                    assert!(Instant::now() < deadline, "no pack was stored");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Cut::AfterBody(ms) => {
                c.write_all(&data).unwrap();
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
        let rec =
            std::fs::read_to_string(st.state.join("images").join(format!("{id}.json"))).unwrap();
        if rec.contains("\"saving\"") {
            kills_mid_upload += 1;
        }
        srv.kill();
        drop(c);

        // The next start: never saving; active with its one snapshot and its
        // bytes, or queued with none.
        let srv = st.serve();
        let status = status_of(&srv, &st.tok, &id);
        let snaps = st.repo.image_snapshots(&id);
        match status.as_str() {
            "active" => {
                assert_eq!(snaps.len(), 1, "{cut:?}");
                let (code, body) = st.get(&srv, &id, None);
                assert!(code == 200 && body == data, "{cut:?}: other bytes");
            }
            "queued" => assert!(snaps.is_empty(), "{cut:?} left snapshots {snaps:?}"),
            other => panic!("{cut:?}: image {id} is {other} after a restart"),
        }
        for f in files(&st.state.join("images")) {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!name.ends_with(".partial"), "{cut:?} left {name}");
            if name == format!("{id}.snap") {
                assert_eq!(status, "active", "{cut:?}: a queued image names a snapshot");
            }
        }
        images.push((id, status, data));
    }
    let active = images.iter().filter(|(_, s, _)| s == "active").count();
    eprintln!(
        "{rounds} kills: {kills_mid_upload} mid-upload; after restart {active} images active, {} queued",
        images.len() - active
    );
    assert!(
        kills_mid_upload * 2 >= rounds,
        "only {kills_mid_upload} of {rounds} kills landed mid-upload"
    );

    // The repository is sound (once restic drops the killed servers' locks,
    // stale: same host, dead process); gc removes what the cut uploads
    // stored; every queued image then uploads whole.
    run(st.repo.restic(&["unlock"]));
    st.repo.check();
    let gc = run(st.repo.backup(&["gc", "--output=json"]));
    let gc: serde_json::Value = serde_json::from_str(&stdout(&gc)).unwrap();
    assert!(
        gc["unindexed_packs_removed"].as_u64().unwrap() >= 1,
        "no cut upload left a pack: {gc}"
    );
    let srv = st.serve();
    for (id, status, data) in &images {
        if status == "queued" {
            assert_eq!(st.upload(&srv, id, data), 204);
        }
        let (code, body) = st.get(&srv, id, Some("bytes=5000000-5999999"));
        assert!(code == 206 && body == data[5_000_000..6_000_000]);
        assert_eq!(st.repo.image_snapshots(id).len(), 1);
    }
    st.repo.check();
}
