//! The registry as a library: uploads checksummed as they stream (checked
//! against md5sum and sha512sum), interrupted uploads back to `queued`,
//! recovery of what a dead process left, refusals, listing and paging.

use std::process::Command;

use serde_json::{json, Map, Value};
use strata_registry::{ErrorKind, ListQuery, PatchOp, Registry, Status};

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap()
}

fn new_image(reg: &Registry, name: &str, fmt: &str) -> String {
    reg.create(&obj(
        json!({"name": name, "disk_format": fmt, "container_format": "bare"}),
    ))
    .unwrap()
    .id
}

fn tool_hash(tool: &str, path: &std::path::Path) -> String {
    let out = Command::new(tool).arg(path).output().expect(tool);
    assert!(out.status.success(), "{tool} failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn upload_in_pieces_records_the_checksums_md5sum_and_sha512sum_compute() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(dir.path()).unwrap();
    let id = new_image(&reg, "blob", "iso");
    let data: Vec<u8> = (0..3_000_017u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut up = reg.begin_upload(&id, Some(data.len() as u64)).unwrap();
    assert_eq!(reg.get(&id).unwrap().status, Status::Saving);
    for piece in data.chunks(65_521) {
        up.write(piece).unwrap();
    }
    let rec = up.finish().unwrap();
    assert_eq!(rec.status, Status::Active);
    assert_eq!(rec.size, Some(data.len() as u64));
    assert_eq!(
        rec.virtual_size, None,
        "iso has no virtual size strata measures"
    );
    let file = dir.path().join("copy");
    std::fs::write(&file, &data).unwrap();
    assert_eq!(
        rec.checksum.as_deref(),
        Some(tool_hash("md5sum", &file).as_str())
    );
    assert_eq!(
        rec.os_hash_value.as_deref(),
        Some(tool_hash("sha512sum", &file).as_str())
    );
    let (_, mut r) = reg.download(&id, None).unwrap();
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut back).unwrap();
    assert_eq!(back, data);
    let (_, mut r) = reg.download(&id, Some((10, 19))).unwrap();
    let mut part = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut part).unwrap();
    assert_eq!(part, &data[10..20]);
}

#[test]
fn a_download_of_data_damaged_on_disk_fails_before_its_last_chunk_instead_of_passing() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(dir.path()).unwrap();
    let id = new_image(&reg, "d", "iso");
    let size = 3 * (1 << 20) + 100_000;
    let mut up = reg.begin_upload(&id, None).unwrap();
    up.write(&vec![5u8; size]).unwrap();
    up.finish().unwrap();
    let data = dir.path().join("images").join(format!("{id}.data"));
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&data, &bytes).unwrap();
    let (_, mut r) = reg.download(&id, None).unwrap();
    let mut back = Vec::new();
    let err = std::io::Read::read_to_end(&mut r, &mut back).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("sha512"), "{err}");
    assert_eq!(back.len(), 3 << 20, "the last chunk is withheld");
    let again = std::io::Read::read(&mut r, &mut [0u8; 10]).unwrap_err();
    assert_eq!(again.kind(), std::io::ErrorKind::InvalidData);
    // Data shorter than its record fails too, instead of ending early.
    std::fs::write(&data, &bytes[..size - 1]).unwrap();
    assert!(reg.download(&id, None).is_err());
}

#[test]
fn a_dropped_upload_leaves_the_image_queued_and_uploadable_again() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(dir.path()).unwrap();
    let id = new_image(&reg, "cut", "raw");
    let mut up = reg.begin_upload(&id, None).unwrap();
    up.write(&[1u8; 4096]).unwrap();
    drop(up);
    let rec = reg.get(&id).unwrap();
    assert_eq!(rec.status, Status::Queued);
    assert_eq!(rec.size, None);
    assert!(!dir
        .path()
        .join("images")
        .join(format!("{id}.partial"))
        .exists());
    let mut up = reg.begin_upload(&id, None).unwrap();
    up.write(&[2u8; 512]).unwrap();
    let rec = up.finish().unwrap();
    assert_eq!(
        (rec.status, rec.size, rec.virtual_size),
        (Status::Active, Some(512), Some(512))
    );
}

#[test]
fn a_second_upload_to_one_image_is_a_conflict_and_an_active_image_takes_no_more_data() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(dir.path()).unwrap();
    let id = new_image(&reg, "c", "raw");
    let up = reg.begin_upload(&id, None).unwrap();
    let other = Registry::open(dir.path()).unwrap();
    assert_eq!(
        other.begin_upload(&id, None).err().unwrap().kind(),
        ErrorKind::Conflict
    );
    assert_eq!(reg.delete(&id).unwrap_err().kind(), ErrorKind::Conflict);
    up.finish().unwrap();
    assert_eq!(
        reg.begin_upload(&id, None).err().unwrap().kind(),
        ErrorKind::Conflict
    );
}

#[test]
fn opening_the_registry_returns_an_abandoned_saving_image_to_queued_and_drops_stray_files() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(dir.path()).unwrap();
    let id = new_image(&reg, "crash", "raw");
    // What a process killed mid-upload leaves: the record says saving, a
    // partial file (and even a complete data file) lie beside it.
    let images = dir.path().join("images");
    let rec_path = images.join(format!("{id}.json"));
    let text = std::fs::read_to_string(&rec_path).unwrap();
    std::fs::write(&rec_path, text.replace("\"queued\"", "\"saving\"")).unwrap();
    std::fs::write(images.join(format!("{id}.partial")), [0u8; 10]).unwrap();
    std::fs::write(images.join(format!("{id}.data")), [0u8; 10]).unwrap();
    let orphan = "00000000-0000-4000-8000-000000000000";
    std::fs::write(images.join(format!("{orphan}.data")), [0u8; 10]).unwrap();
    let reg = Registry::open(dir.path()).unwrap();
    assert_eq!(reg.get(&id).unwrap().status, Status::Queued);
    for f in [
        format!("{id}.partial"),
        format!("{id}.data"),
        format!("{orphan}.data"),
    ] {
        assert!(!images.join(&f).exists(), "{f} left behind");
    }
}

#[test]
fn qcow2_data_is_measured_by_the_engine_and_bad_backed_data_file_or_encrypted_qcow2_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(dir.path()).unwrap();
    let img = dir.path().join("a.qcow2");
    let ov = dir.path().join("ov.qcow2");
    let qemu_img = |args: &[&str]| {
        let st = Command::new("qemu-img")
            .args(args)
            .status()
            .expect("qemu-img");
        assert!(st.success());
    };
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "3G"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        ov.to_str().unwrap(),
    ]);
    let host_file = dir.path().join("host-file");
    std::fs::write(&host_file, b"host data a consumer must not reach").unwrap();
    let with_data_file = dir.path().join("df.qcow2");
    let data_file = format!("data_file={}", host_file.display());
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &data_file,
        with_data_file.to_str().unwrap(),
        "1M",
    ]);
    let encrypted = dir.path().join("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=pw",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        encrypted.to_str().unwrap(),
        "1M",
    ]);
    let upload = |fmt: &str, bytes: &[u8]| {
        let id = new_image(&reg, "q", fmt);
        let mut up = reg.begin_upload(&id, None).unwrap();
        up.write(bytes).unwrap();
        (id.clone(), up.finish())
    };
    let (_, ok) = upload("qcow2", &std::fs::read(&img).unwrap());
    assert_eq!(ok.unwrap().virtual_size, Some(3 << 30));
    for (fmt, bytes, why) in [
        ("qcow2", std::fs::read(&ov).unwrap(), "backing file"),
        (
            "qcow2",
            b"not a qcow2 image at all".to_vec(),
            "not a valid qcow2",
        ),
        ("raw", std::fs::read(&img).unwrap(), "is a qcow2 image"),
        (
            "qcow2",
            std::fs::read(&with_data_file).unwrap(),
            "external data file",
        ),
        ("qcow2", std::fs::read(&encrypted).unwrap(), "encryption"),
    ] {
        let (id, r) = upload(fmt, &bytes);
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert!(e.to_string().contains(why), "{e}");
        let server_path = dir.path().to_str().unwrap();
        assert!(!e.to_string().contains(server_path), "a path in: {e}");
        assert_eq!(reg.get(&id).unwrap().status, Status::Queued);
    }
}

#[test]
fn patches_and_attributes_are_checked_and_applied_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(dir.path()).unwrap();
    let id = new_image(&reg, "p", "raw");
    let kind = |ops: Vec<PatchOp>| reg.update(&id, &ops).unwrap_err().kind();
    let message = |ops: Vec<PatchOp>| reg.update(&id, &ops).unwrap_err().to_string();
    for (value, says) in [
        (
            json!(-3),
            "-3 is out of range for 'min_disk' (0 to 2147483647)",
        ),
        (json!(1u64 << 31), "is out of range for 'min_disk'"),
        (json!("2"), "\"2\" is not of type 'integer' for 'min_disk'"),
        (json!(1.5), "1.5 is not of type 'integer' for 'min_disk'"),
    ] {
        let m = message(vec![PatchOp::Replace("min_disk".into(), value)]);
        assert!(m.contains(says), "{m}");
    }
    assert_eq!(
        kind(vec![PatchOp::Replace("status".into(), json!("active"))]),
        ErrorKind::Forbidden
    );
    assert_eq!(
        kind(vec![PatchOp::Replace("protected".into(), json!("yes"))]),
        ErrorKind::Invalid
    );
    assert_eq!(
        kind(vec![PatchOp::Replace("nope".into(), json!("x"))]),
        ErrorKind::Conflict
    );
    assert_eq!(
        kind(vec![PatchOp::Remove("name".into())]),
        ErrorKind::Forbidden
    );
    assert_eq!(
        kind(vec![PatchOp::Add("../x".into(), json!("x"))]),
        ErrorKind::Invalid
    );
    assert_eq!(
        kind(vec![
            PatchOp::Add("os_distro".into(), json!("debian")),
            PatchOp::Add("k".into(), json!(1))
        ]),
        ErrorKind::Invalid
    );
    assert!(
        !reg.get(&id).unwrap().properties.contains_key("os_distro"),
        "half a patch applied"
    );
    let rec = reg
        .update(
            &id,
            &[
                PatchOp::Add("os_distro".into(), json!("debian")),
                PatchOp::Replace("name".into(), json!("q")),
            ],
        )
        .unwrap();
    assert_eq!(
        (rec.name.as_deref(), rec.properties["os_distro"].as_str()),
        (Some("q"), Some("debian"))
    );
    for bad in [
        json!({"status": "active"}),
        json!({"name": 5}),
        json!({"id": "../../etc"}),
        json!({"disk_format": "exe"}),
    ] {
        assert!(reg.create(&obj(bad.clone())).is_err(), "{bad}");
    }
    for bad_id in ["../x", "", "8A1BA440-EA06-4534-B979-3530C6FB84B3", "a/b"] {
        assert_eq!(reg.get(bad_id).unwrap_err().kind(), ErrorKind::NotFound);
    }
    reg.update(&id, &[PatchOp::Replace("protected".into(), json!(true))])
        .unwrap();
    assert_eq!(reg.delete(&id).unwrap_err().kind(), ErrorKind::Forbidden);
}

#[test]
fn lists_filter_sort_and_page_with_a_marker() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(dir.path()).unwrap();
    let mut ids = Vec::new();
    for i in 0..7 {
        let id = new_image(
            &reg,
            &format!("img{}", i % 3),
            if i % 2 == 0 { "raw" } else { "qcow2" },
        );
        if i < 3 {
            reg.add_tag(&id, "gold").unwrap();
        }
        ids.push(id);
    }
    let q = |pairs: &[(&str, &str)]| {
        let p: Vec<(String, String)> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        ListQuery::from_pairs(&p).unwrap()
    };
    let names = |page: strata_registry::Page| {
        page.images
            .into_iter()
            .map(|r| r.name.unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(reg.list(&q(&[("name", "img1")])).unwrap().images.len(), 2);
    assert_eq!(
        reg.list(&q(&[("disk_format", "raw")]))
            .unwrap()
            .images
            .len(),
        4
    );
    assert_eq!(
        reg.list(&q(&[("tag", "gold"), ("disk_format", "raw")]))
            .unwrap()
            .images
            .len(),
        2
    );
    let sorted = names(
        reg.list(&q(&[("sort_key", "name"), ("sort_dir", "asc")]))
            .unwrap(),
    );
    assert_eq!(
        sorted,
        ["img0", "img0", "img0", "img1", "img1", "img2", "img2"]
    );
    let mut seen = Vec::new();
    let mut query = q(&[("sort", "name:desc"), ("limit", "3")]);
    loop {
        let page = reg.list(&query).unwrap();
        assert!(page.images.len() <= 3);
        query.marker = page.images.last().map(|r| r.id.clone());
        seen.extend(page.images.iter().map(|r| r.id.clone()));
        if !page.more {
            break;
        }
    }
    let mut all = ids.clone();
    all.sort();
    seen.sort();
    assert_eq!(seen, all, "paging must visit every image once");
    for bad in [
        &[("sort_key", "secret")][..],
        &[("limit", "-1")],
        &[("sort_dir", "up")],
    ] {
        let p: Vec<(String, String)> = bad
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert!(ListQuery::from_pairs(&p).is_err());
    }
    let mut m = q(&[]);
    m.marker = Some("00000000-0000-4000-8000-000000000000".into());
    assert_eq!(reg.list(&m).unwrap_err().kind(), ErrorKind::Invalid);
}

#[test]
fn lists_filter_by_size_range_in_lists_times_and_all_visibilities_as_glance_does() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(dir.path()).unwrap();
    let mut ids = Vec::new();
    for (i, len) in [100usize, 200, 300].into_iter().enumerate() {
        let id = new_image(&reg, &format!("s{i}"), "raw");
        let mut up = reg.begin_upload(&id, None).unwrap();
        up.write(&vec![7u8; len]).unwrap();
        up.finish().unwrap();
        ids.push(id);
    }
    let empty = new_image(&reg, "a,b", "iso");
    reg.update(
        &ids[0],
        &[PatchOp::Replace("visibility".into(), json!("private"))],
    )
    .unwrap();
    let names = |pairs: &[(&str, &str)]| {
        let p: Vec<(String, String)> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let mut n: Vec<String> = reg
            .list(&ListQuery::from_pairs(&p).unwrap())
            .unwrap()
            .images
            .into_iter()
            .map(|r| r.name.unwrap())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&[("size_min", "200")]), ["s1", "s2"]);
    assert_eq!(names(&[("size_max", "200")]), ["s0", "s1"]);
    assert_eq!(names(&[("size_min", "150"), ("size_max", "250")]), ["s1"]);
    assert_eq!(names(&[("visibility", "all")]), ["a,b", "s0", "s1", "s2"]);
    assert_eq!(names(&[("visibility", "private")]), ["s0"]);
    // Images here have no owner: another tenant's list is empty, not everything.
    assert!(names(&[("owner", "another-tenant")]).is_empty());
    assert_eq!(names(&[("member_status", "accepted")]).len(), 4);
    assert_eq!(names(&[("name", r#"in:s0,"a,b""#)]), ["a,b", "s0"]);
    assert_eq!(names(&[("status", "in:queued,killed")]), ["a,b"]);
    let in_ids = format!("in:{},{}", ids[1], ids[2]);
    assert_eq!(names(&[("id", in_ids.as_str())]), ["s1", "s2"]);
    assert_eq!(
        names(&[("created_at", "gte:2000-01-01T00:00:00Z")]).len(),
        4
    );
    assert!(names(&[("created_at", "lt:2000-01-01T00:00:00Z")]).is_empty());
    assert!(names(&[("updated_at", "gt:2999-01-01T02:00:00+02:00")]).is_empty());
    let made = reg.get(&empty).unwrap().created_at;
    let eq = format!("eq:{made}");
    assert!(names(&[("created_at", eq.as_str())]).contains(&"a,b".to_string()));
    let lte = format!("lte:{made}");
    assert_eq!(names(&[("created_at", lte.as_str())]).len(), 4);
    for (k, v) in [
        ("size_min", "-1"),
        ("size_max", "big"),
        ("created_at", "gte:yesterday"),
        ("updated_at", "around:2000-01-01T00:00:00Z"),
        ("name", r#"in:"open"#),
    ] {
        let err = ListQuery::from_pairs(&[(k.to_string(), v.to_string())]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{k}={v}");
        assert!(err.to_string().contains(k), "{k}={v}: {err}");
    }
}
