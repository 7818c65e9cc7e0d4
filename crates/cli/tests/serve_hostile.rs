//! Bad and hostile requests to `strata serve`: each gets a clear HTTP error in
//! Glance's error shape, and the registry stays consistent. Uploads cut mid
//! stream, a server killed during an upload, concurrent uploads, body limits,
//! tokens and their roles, path tricks.

mod common;

use std::io::Write;

use common::api::{connect, create_image, head, read_reply, status_of, token, wait_status, Server};

const JSON: Option<&str> = Some("application/json");
const OCTETS: Option<&str> = Some("application/octet-stream");
const PATCH: Option<&str> = Some("application/openstack-images-v2.1-json-patch");

fn create(srv: &Server, tok: &str, name: &str) -> String {
    create_image(srv, tok, name, "raw")
}

/// No image file in the state directory is anything but `UUID.ext`.
fn files_are_only_image_ids(state: &std::path::Path) {
    for e in std::fs::read_dir(state.join("images")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        let id = name.split('.').next().unwrap();
        assert!(
            id.len() == 36 || name.starts_with(".tmp"),
            "unexpected file {name}"
        );
    }
}

#[test]
fn tokens_are_required_checked_and_read_only_tokens_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let admin = token(dir.path(), false);
    let reader = token(dir.path(), true);
    let srv = Server::start(dir.path(), &[]);
    let r = srv.req("GET", "/versions", None, None, b"");
    assert_eq!(r.status, 300, "version discovery needs no token");
    assert!(r.json()["versions"][0]["id"]
        .as_str()
        .unwrap()
        .starts_with("v2"));
    for tok in [None, Some("wrong"), Some(&admin[..63])] {
        let r = srv.req("GET", "/v2/images", tok, None, b"");
        assert_eq!(r.status, 401, "{tok:?}");
        assert!(!r.error_message().is_empty());
    }
    // Authorization: Bearer works as well as X-Auth-Token.
    let mut s = connect(srv.addr);
    let req = format!("GET /v2/images HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {reader}\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    assert_eq!(read_reply(&mut s).status, 200);
    let r = srv.req("POST", "/v2/images", Some(&reader), JSON, b"{}");
    assert_eq!(r.status, 403);
    assert!(r.error_message().contains("read-only"));
    let id = create(&srv, &admin, "x");
    for (m, p) in [
        ("DELETE", format!("/v2/images/{id}")),
        ("PUT", format!("/v2/images/{id}/tags/t")),
        ("PUT", format!("/v2/images/{id}/file")),
    ] {
        assert_eq!(
            srv.req(m, &p, Some(&reader), None, b"").status,
            403,
            "{m} {p}"
        );
    }
    assert_eq!(
        srv.req("GET", &format!("/v2/images/{id}"), Some(&reader), None, b"")
            .status,
        200
    );
    let stored = std::fs::read_to_string(dir.path().join("tokens.json")).unwrap();
    assert!(
        !stored.contains(&admin) && !stored.contains(&reader),
        "tokens stored in clear"
    );
}

#[test]
fn malformed_wrong_typed_oversized_and_truncated_bodies_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let tok = token(dir.path(), false);
    let srv = Server::start(dir.path(), &[]);
    let post = |body: &[u8]| srv.req("POST", "/v2/images", Some(&tok), JSON, body);
    for (body, code, says) in [
        (&b"{\"name\": "[..], 400, "Malformed JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"{\"name\": 5}", 400, "name"),
        (b"{\"protected\": \"yes\"}", 400, "protected"),
        (b"{\"min_ram\": -1}", 400, "min_ram"),
        (b"{\"disk_format\": \"exe\"}", 400, "disk_format"),
        (b"{\"status\": \"active\"}", 403, "read-only"),
        (b"{\"checksum\": \"00\"}", 403, "read-only"),
        (b"{\"id\": \"../../etc/passwd\"}", 400, "UUID"),
        (b"{\"os_distro\": 7}", 400, "os_distro"),
        (b"{\"../evil\": \"x\"}", 400, "property name"),
    ] {
        let r = post(body);
        assert_eq!(r.status, code, "{}", String::from_utf8_lossy(body));
        let m = r.error_message();
        assert!(m.contains(says), "{m}");
    }
    let huge = format!("{{\"name\": \"{}\"}}", "a".repeat(1 << 20));
    assert_eq!(post(huge.as_bytes()).status, 413);
    let r = srv.req("POST", "/v2/images", Some(&tok), Some("text/plain"), b"{}");
    assert_eq!(r.status, 415);
    // A body shorter than its Content-Length, then the client stops sending.
    let mut s = connect(srv.addr);
    s.write_all(head("POST", "/v2/images", Some(&tok), JSON, Some(100)).as_bytes())
        .unwrap();
    s.write_all(b"{\"name\":").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let r = read_reply(&mut s);
    assert_eq!(r.status, 400);
    let id = create(&srv, &tok, "p");
    let path = format!("/v2/images/{id}");
    let patch = |ct, body: &[u8]| srv.req("PATCH", &path, Some(&tok), ct, body);
    assert_eq!(patch(JSON, b"[]").status, 415);
    for (body, code) in [
        (&b"{}"[..], 400),
        (b"[{\"op\": \"move\", \"path\": \"/name\"}]", 400),
        (b"[{\"op\": \"replace\", \"path\": \"/name\"}]", 400),
        (
            b"[{\"op\": \"replace\", \"path\": \"/a/b\", \"value\": \"x\"}]",
            400,
        ),
        (
            b"[{\"op\": \"replace\", \"path\": \"/status\", \"value\": \"active\"}]",
            403,
        ),
        (
            b"[{\"op\": \"replace\", \"path\": \"/nope\", \"value\": \"x\"}]",
            409,
        ),
        (b"[{\"op\": \"remove\", \"path\": \"/name\"}]", 403),
    ] {
        let r = patch(PATCH, body);
        assert_eq!(r.status, code, "{}", String::from_utf8_lossy(body));
        r.error_message();
    }
    let r = patch(
        PATCH,
        b"[{\"op\": \"replace\", \"path\": \"/name\", \"value\": \"../../etc/passwd\"}]",
    );
    assert_eq!(r.status, 200, "a name is only a label");
    files_are_only_image_ids(dir.path());
}

#[test]
fn unknown_ids_and_path_tricks_are_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let tok = token(dir.path(), false);
    let srv = Server::start(dir.path(), &[]);
    let id = create(&srv, &tok, "x");
    for p in [
        "/v2/images/00000000-0000-4000-8000-000000000000".to_string(),
        "/v2/images/..%2F..%2Ftokens".into(),
        "/v2/images/../../tokens.json".into(),
        format!("/v2/images/{}", id.to_uppercase()),
        "/v2/images/%2e%2e".into(),
        "/v2/nothing".into(),
    ] {
        let r = srv.req("GET", &p, Some(&tok), None, b"");
        assert_eq!(r.status, 404, "{p}");
        r.error_message();
    }
    let r = srv.req(
        "PUT",
        "/v2/images/..%2F..%2Ftokens/file",
        Some(&tok),
        OCTETS,
        b"x",
    );
    assert_eq!(r.status, 404);
    let r = srv.req("POST", &format!("/v2/images/{id}"), Some(&tok), JSON, b"{}");
    assert_eq!(r.status, 405);
    assert_eq!(
        srv.req(
            "PUT",
            &format!("/v2/images/{id}/tags/a%2Fb"),
            Some(&tok),
            None,
            b""
        )
        .status,
        400
    );
    files_are_only_image_ids(dir.path());
}

#[test]
fn uploads_cut_mid_stream_or_by_a_server_kill_leave_the_image_queued_never_saving() {
    let dir = tempfile::tempdir().unwrap();
    let tok = token(dir.path(), false);
    let mut srv = Server::start(dir.path(), &[]);
    let id = create(&srv, &tok, "cut");
    let path = format!("/v2/images/{id}/file");
    let chunk = vec![0xa5u8; 1 << 20];
    // 1. The client goes away after 4 of 16 MiB.
    let mut s = connect(srv.addr);
    s.write_all(head("PUT", &path, Some(&tok), OCTETS, Some(16 << 20)).as_bytes())
        .unwrap();
    for _ in 0..4 {
        s.write_all(&chunk).unwrap();
    }
    wait_status(&srv, &tok, &id, "saving");
    drop(s);
    wait_status(&srv, &tok, &id, "queued");
    // 2. The server is killed while an upload streams in.
    let mut s = connect(srv.addr);
    s.write_all(head("PUT", &path, Some(&tok), OCTETS, Some(16 << 20)).as_bytes())
        .unwrap();
    s.write_all(&chunk).unwrap();
    wait_status(&srv, &tok, &id, "saving");
    srv.kill();
    drop(s);
    let rec =
        std::fs::read_to_string(dir.path().join("images").join(format!("{id}.json"))).unwrap();
    assert!(
        rec.contains("\"saving\""),
        "the kill did not land mid-upload"
    );
    let srv = Server::start(dir.path(), &[]);
    assert_eq!(status_of(&srv, &tok, &id), "queued");
    let r = srv.req("GET", &path, Some(&tok), None, b"");
    assert_eq!(r.status, 204, "a queued image has no data");
    // 3. A whole upload then works.
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 253) as u8).collect();
    let r = srv.req("PUT", &path, Some(&tok), OCTETS, &data);
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(status_of(&srv, &tok, &id), "active");
    let r = srv.req("GET", &path, Some(&tok), None, b"");
    assert_eq!((r.status, r.body == data), (200, true));
    files_are_only_image_ids(dir.path());
}

#[test]
fn a_second_upload_while_one_streams_is_a_conflict_and_the_first_completes() {
    let dir = tempfile::tempdir().unwrap();
    let tok = token(dir.path(), false);
    let srv = Server::start(dir.path(), &[]);
    let id = create(&srv, &tok, "race");
    let path = format!("/v2/images/{id}/file");
    let mut first = connect(srv.addr);
    first
        .write_all(head("PUT", &path, Some(&tok), OCTETS, Some(2 << 20)).as_bytes())
        .unwrap();
    first.write_all(&vec![1u8; 1 << 20]).unwrap();
    wait_status(&srv, &tok, &id, "saving");
    let r = srv.req("PUT", &path, Some(&tok), OCTETS, b"other data");
    assert_eq!(r.status, 409);
    r.error_message();
    assert_eq!(
        srv.req("DELETE", &format!("/v2/images/{id}"), Some(&tok), None, b"")
            .status,
        409
    );
    first.write_all(&vec![1u8; 1 << 20]).unwrap();
    assert_eq!(read_reply(&mut first).status, 204);
    assert_eq!(status_of(&srv, &tok, &id), "active");
    let r = srv.req("PUT", &path, Some(&tok), OCTETS, b"again");
    assert_eq!(r.status, 409, "an active image takes no new data");
}

#[test]
fn uploads_over_the_size_limit_or_the_announced_size_are_refused_and_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let tok = token(dir.path(), false);
    let srv = Server::start(dir.path(), &["--max-image-size", "1000000"]);
    let id = create(&srv, &tok, "big");
    let path = format!("/v2/images/{id}/file");
    let r = srv.req("PUT", &path, Some(&tok), OCTETS, &vec![0u8; 1_000_001]);
    assert_eq!(r.status, 413);
    r.error_message();
    assert_eq!(status_of(&srv, &tok, &id), "queued");
    let mut s = connect(srv.addr);
    let h = head("PUT", &path, Some(&tok), OCTETS, Some(10))
        .replace("\r\n\r\n", "\r\nx-openstack-image-size: 9\r\n\r\n");
    s.write_all(h.as_bytes()).unwrap();
    s.write_all(b"0123456789").unwrap();
    let r = read_reply(&mut s);
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(status_of(&srv, &tok, &id), "queued");
    let r = srv.req("PUT", &path, Some(&tok), OCTETS, &vec![3u8; 1_000_000]);
    assert_eq!(r.status, 204);
}

#[test]
fn downloads_serve_ranges_with_checksum_headers() {
    let dir = tempfile::tempdir().unwrap();
    let tok = token(dir.path(), false);
    let srv = Server::start(dir.path(), &[]);
    let id = create(&srv, &tok, "r");
    let path = format!("/v2/images/{id}/file");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
    assert_eq!(srv.req("PUT", &path, Some(&tok), OCTETS, &data).status, 204);
    let get = |range: &str| {
        let mut s = connect(srv.addr);
        let h = head("GET", &path, Some(&tok), None, None)
            .replace("\r\n\r\n", &format!("\r\nRange: {range}\r\n\r\n"));
        s.write_all(h.as_bytes()).unwrap();
        read_reply(&mut s)
    };
    let r = get("bytes=1000-1999");
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[1000..2000]);
    assert_eq!(
        r.header("content-range").as_deref(),
        Some("bytes 1000-1999/100000")
    );
    let r = get("bytes=-10");
    assert_eq!((r.status, &r.body[..]), (206, &data[99_990..]));
    let r = get("bytes=100000-");
    assert_eq!(r.status, 416);
    r.error_message();
    let r = srv.req("GET", &path, Some(&tok), None, b"");
    assert_eq!(r.status, 200);
    let md5 = srv
        .req("GET", &format!("/v2/images/{id}"), Some(&tok), None, b"")
        .json()["checksum"]
        .clone();
    assert_eq!(r.header("content-md5").as_deref(), md5.as_str());
    assert_eq!(r.body, data);
}

#[test]
fn a_download_of_data_damaged_on_disk_ends_short_of_its_length() {
    let dir = tempfile::tempdir().unwrap();
    let tok = token(dir.path(), false);
    let srv = Server::start(dir.path(), &[]);
    let id = create(&srv, &tok, "damaged");
    let path = format!("/v2/images/{id}/file");
    let data: Vec<u8> = (0..3_500_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(srv.req("PUT", &path, Some(&tok), OCTETS, &data).status, 204);
    let file = dir.path().join("images").join(format!("{id}.data"));
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[10] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let r = srv.req("GET", &path, Some(&tok), None, b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(data.len().to_string()));
    assert!(
        r.body.len() < data.len(),
        "all {} bytes of a damaged image were served",
        r.body.len()
    );
    // Repaired, it downloads whole.
    bytes[10] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let r = srv.req("GET", &path, Some(&tok), None, b"");
    assert_eq!((r.status, r.body.len()), (200, data.len()));
    assert!(r.body == data);
}
