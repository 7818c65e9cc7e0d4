//! NBD exports as image names, through both tools: URLs (`nbd://`, `nbd+tcp://`,
//! `nbd+unix://`), the legacy `nbd:` forms, `--image-opts` and `json:` with
//! `driver=nbd`, served by qemu-nbd and by `strata nbd serve` alike. stdout,
//! stderr and the exit code must be identical; what strata's convert writes
//! to an export (and reads from one) must read the same to qemu-img.

mod common;

use common::nbd::{free_port, NbdServer, Server, SERVERS};
use common::{assert_all_same, ok, same, sh};
use std::path::Path;

/// A qcow2 image with data, a zeroed cluster and a hole (`a.qcow2`), the same
/// guest bytes as raw (`a.raw`), and a smaller raw image (`small.raw`).
fn images(d: &Path) {
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"],
    );
    common::io(
        d,
        "qcow2",
        "a.qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 1M 192k",
            "write -z 2M 64k",
        ],
    );
    sh(d, "qemu-img", &["convert", "-O", "raw", "a.qcow2", "a.raw"]);
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "small.raw", "1M"],
    );
}

/// Serve a copy of `image` (its bytes as they are, `-f raw`) as `export` on the
/// Unix socket `sock` in `d`.
fn serve_copy(d: &Path, server: Server, image: &str, export: &str, sock: &str) -> NbdServer {
    let copy = format!("{sock}-{image}");
    std::fs::copy(d.join(image), d.join(&copy)).unwrap();
    let sock = d.join(sock);
    let sock = sock.to_str().unwrap();
    NbdServer::start(
        server,
        &["-f", "raw", "-x", export, "-k", sock],
        &d.join(copy),
        sock,
    )
}

/// The ways of naming the export `export` on the Unix socket `sock`.
fn unix_names(sock: &str, export: &str) -> Vec<String> {
    vec![
        format!("nbd+unix:///{export}?socket={sock}"),
        format!("nbd:unix:{sock}:exportname={export}"),
        format!(
            "json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"nbd\",\"server\":{{\"type\":\"unix\",\"path\":\"{sock}\"}},\"export\":\"{export}\"}}}}"
        ),
    ]
}

#[test]
fn info_map_check_and_compare_of_exports_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    for server in SERVERS {
        let q = d.join("q.sock");
        let r = d.join("r.sock");
        let (q, r) = (q.to_str().unwrap(), r.to_str().unwrap());
        let _qs = serve_copy(d, server, "a.qcow2", "q", "q.sock");
        let _rs = serve_copy(d, server, "a.raw", "r", "r.sock");
        let port = free_port();
        std::fs::copy(d.join("a.raw"), d.join("tcp-a.raw")).unwrap();
        let _ts = NbdServer::start(
            server,
            &[
                "-f",
                "raw",
                "-x",
                "r",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-r",
            ],
            &d.join("tcp-a.raw"),
            &format!("127.0.0.1:{port}"),
        );
        let mut names = unix_names(q, "q");
        names.extend(unix_names(r, "r"));
        names.extend([
            format!("nbd://127.0.0.1:{port}/r"),
            format!("nbd+tcp://127.0.0.1:{port}/r"),
            format!("nbd:127.0.0.1:{port}:exportname=r"),
            format!("nbd://localhost:{port}/r"),
            format!("nbd://127.0.0.1:{port}/%72"),
        ]);
        for name in &names {
            for sub in [
                &["info"][..],
                &["info", "--output=json"],
                &["map"],
                &["map", "--output=json"],
                &["map", "--output=json", "-s", "64k", "-l", "1M"],
                &["check"],
                &["check", "--output=json"],
            ] {
                let mut a = sub.to_vec();
                a.push(name);
                same(d, &a);
            }
            same(d, &["compare", name, "a.raw"]);
            same(d, &["compare", "-F", "raw", "small.raw", name]);
        }
        // The format given, or the NBD node itself as the image.
        for args in [
            vec!["info", "-f", "qcow2", &names[0]],
            vec!["info", "-f", "raw", &names[0]],
            vec!["map", "--output=json", "-f", "raw", &names[0]],
            vec!["info", "-f", "nbd", &names[3]],
            vec!["info", "--output=json", "-f", "nbd", &names[3]],
            vec!["map", "-f", "nbd", &names[3]],
            vec!["info", "-f", "qcow2", &names[3]],
            vec!["check", "-f", "qcow2", &names[3]],
        ] {
            same(d, &args);
        }
        let opts = [
            format!("driver=nbd,server.type=unix,server.path={r},export=r"),
            format!("driver=nbd,path={r},export=r"),
            format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=r"),
            format!("driver=nbd,host=127.0.0.1,port={port},export=r"),
            format!("driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path={q},file.export=q"),
            format!("driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={r},file.export=r,read-only=on"),
        ];
        for o in &opts {
            for sub in [
                &["info"][..],
                &["info", "--output=json"],
                &["map", "--output=json"],
                &["check"],
            ] {
                let mut a = sub.to_vec();
                a.extend(["--image-opts", o]);
                same(d, &a);
            }
        }
        same(
            d,
            &[
                "info",
                &format!("json:{{\"driver\":\"nbd\",\"server\":{{\"type\":\"unix\",\"path\":\"{r}\"}},\"export\":\"r\"}}"),
            ],
        );
        same(d, &["compare", "--image-opts", &opts[4], &opts[0]]);
        assert_all_same();
    }
}

#[test]
fn names_that_reach_no_export_are_refused_in_qemu_img_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    let gone = free_port();
    for server in SERVERS {
        let _rs = serve_copy(d, server, "a.raw", "r", "r.sock");
        let r = d.join("r.sock");
        let r = r.to_str().unwrap();
        let missing = d.join("none.sock");
        let missing = missing.to_str().unwrap();
        let names = [
            format!("nbd+unix:///nope?socket={r}"),
            format!("nbd+unix:///?socket={r}"),
            format!("nbd:unix:{r}"),
            format!("nbd:unix:{r}:exportname=nope"),
            format!("nbd+unix:///r?socket={missing}"),
            format!("nbd://127.0.0.1:{gone}/r"),
            format!("nbd:127.0.0.1:{gone}:exportname=r"),
            format!("nbd+unix:///r?socket={missing}&socket={r}"),
            "nbd:".into(),
            format!("nbd:unix:{r}:exportname="),
            format!("nbd+unix:///r?sock={r}"),
            format!("nbd+unix://host/r?socket={r}"),
            format!("nbd+unix:///r?socket={r}&foo=1"),
            "nbd://127.0.0.1:port/r".into(),
            format!("nbd://127.0.0.1:{gone}/r?socket=x"),
            format!("nbds://127.0.0.1:{gone}/r"),
        ];
        for name in &names {
            for sub in ["info", "map", "check"] {
                same(d, &[sub, name]);
            }
            same(d, &["compare", name, "a.raw"]);
            same(d, &["convert", "-O", "raw", name, "out.raw"]);
        }
        let opts = [
            format!("driver=nbd,server.type=unix,server.path={r},export=r,foo=bar"),
            "driver=nbd,export=r".into(),
            "driver=nbd,server.type=unix,export=r".into(),
            "driver=nbd,server.type=inet,server.host=127.0.0.1,export=r".into(),
            format!("driver=nbd,server.type=bogus,server.path={r}"),
            format!("driver=nbd,server.type=unix,server.path={r},export=r,tls-creds=nope"),
            format!("driver=nbd,server.type=unix,server.path={r},export=nope"),
            format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={gone},export=r"),
            format!("driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={r},file.export=r,foo=bar"),
        ];
        for o in &opts {
            same(d, &["info", "--image-opts", o]);
            same(d, &["map", "--image-opts", o]);
        }
        // A qcow2 image that is not there, and -f with --image-opts.
        same(
            d,
            &["info", "-f", "qcow2", &format!("nbd+unix:///r?socket={r}")],
        );
        same(d, &["info", "-f", "raw", "--image-opts", &opts[0]]);
        assert_all_same();
    }
}

#[test]
fn map_reads_dirty_bitmaps_and_allocation_depth_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    sh(d, "qemu-img", &["bitmap", "--add", "a.qcow2", "b0"]);
    common::io(
        d,
        "qcow2",
        "a.qcow2",
        &["write -P 3 3M 64k", "write -z 1M 64k"],
    );
    let sock = d.join("b.sock");
    let sock = sock.to_str().unwrap();
    let _srv = NbdServer::start(
        Server::Qemu,
        &["-r", "-f", "qcow2", "-x", "b", "-k", sock, "-B", "b0", "-A"],
        &d.join("a.qcow2"),
        sock,
    );
    let base = format!("driver=nbd,server.type=unix,server.path={sock},export=b");
    for ctx in [
        "qemu:dirty-bitmap:b0",
        "qemu:allocation-depth",
        "base:allocation",
        "qemu:dirty-bitmap:nope",
    ] {
        let o = format!("{base},x-dirty-bitmap={ctx}");
        let raw = format!(
            "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={sock},file.export=b,file.x-dirty-bitmap={ctx}"
        );
        for name in [&o, &raw] {
            same(d, &["map", "--output=json", "--image-opts", name]);
            same(d, &["map", "--image-opts", name]);
            same(
                d,
                &["map", "--output=json", "-s", "1M", "--image-opts", name],
            );
        }
    }
    // The same contexts from strata's own server.
    let sock2 = d.join("s.sock");
    let sock2 = sock2.to_str().unwrap();
    let _strata = NbdServer::start(
        Server::Strata,
        &["-r", "-f", "qcow2", "-x", "b", "-k", sock2],
        &d.join("a.qcow2"),
        sock2,
    );
    for ctx in ["qemu:allocation-depth", "base:allocation"] {
        let o = format!(
            "driver=nbd,server.type=unix,server.path={sock2},export=b,x-dirty-bitmap={ctx}"
        );
        same(d, &["map", "--output=json", "--image-opts", &o]);
    }
    assert_all_same();
}

#[test]
fn convert_writes_into_and_reads_from_exports_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "blank.raw", "4M"],
    );
    for server in SERVERS {
        // Each tool writes into an export of its own; both must hold the source.
        for (i, prog) in ["strata", "qemu-img"].into_iter().enumerate() {
            let sock = format!("w{i}.sock");
            let target = format!("{sock}-blank.raw");
            {
                let _srv = serve_copy(d, server, "blank.raw", "w", &sock);
                let url = format!("nbd+unix:///w?socket={}", d.join(&sock).display());
                ok(d, prog, &["convert", "-n", "-O", "raw", "a.qcow2", &url]);
                // Read back through the export, into a file of each format.
                ok(
                    d,
                    prog,
                    &["convert", "-O", "qcow2", &url, &format!("back{i}.qcow2")],
                );
                ok(
                    d,
                    prog,
                    &[
                        "convert",
                        "-f",
                        "raw",
                        "-O",
                        "raw",
                        &url,
                        &format!("back{i}.raw"),
                    ],
                );
                // Without -n the export must be large enough; it is then raw.
                ok(d, prog, &["convert", "-O", "raw", "a.raw", &url]);
            }
            ok(
                d,
                "qemu-img",
                &["compare", "-f", "raw", "-F", "qcow2", &target, "a.qcow2"],
            );
            ok(
                d,
                "qemu-img",
                &["compare", "a.qcow2", &format!("back{i}.qcow2")],
            );
            ok(d, "qemu-img", &["check", &format!("back{i}.qcow2")]);
            ok(
                d,
                "qemu-img",
                &["compare", "a.raw", &format!("back{i}.raw")],
            );
        }
        // qcow2 bytes on an export, opened as qcow2 and converted out.
        let _q = serve_copy(d, server, "a.qcow2", "q", "q.sock");
        let q = format!("nbd+unix:///q?socket={}", d.join("q.sock").display());
        ok(d, "strata", &["convert", "-O", "raw", &q, "fromq.raw"]);
        ok(d, "qemu-img", &["compare", "a.qcow2", "fromq.raw"]);
        // Refusals: a smaller export, with and without -n; a larger source
        // without -n; resizing or formatting an export.
        let _s = serve_copy(d, server, "small.raw", "s", "s.sock");
        let s = format!("nbd+unix:///s?socket={}", d.join("s.sock").display());
        for args in [
            vec!["convert", "-n", "-O", "raw", "a.raw", &s],
            vec!["convert", "-O", "raw", "a.raw", &s],
            vec!["resize", &s, "8M"],
            vec!["resize", "-f", "raw", &s, "8M"],
            vec!["resize", "-f", "raw", &s, "1M"],
            vec!["resize", "-f", "raw", &s, "512k"],
            vec!["resize", "--shrink", "-f", "raw", &s, "512k"],
            vec!["compare", "-f", "raw", &s, "small.raw"],
        ] {
            same(d, &args);
        }
        assert_all_same();
    }
}

/// A TCP port given as a service name (`nbd`, 10809 in the services
/// database) or as a number the resolver takes past 65535 (it wraps) in the
/// `nbd:HOST:PORT` name and the option lists, as qemu-img resolves them: the
/// server reached, or not, and named with the port as written; URLs take
/// digits up to 65535 alone (0 is the default port).
#[test]
fn ports_resolve_as_qemu_img_resolves_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    let port = free_port();
    let gone = free_port();
    std::fs::copy(d.join("a.raw"), d.join("tcp-a.raw")).unwrap();
    let _ts = NbdServer::start(
        Server::Qemu,
        &[
            "-f",
            "raw",
            "-x",
            "r",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-r",
        ],
        &d.join("tcp-a.raw"),
        &format!("127.0.0.1:{port}"),
    );
    let wrapped = u32::from(port) + 65536;
    let names = [
        format!("nbd:127.0.0.1:{wrapped}:exportname=r"),
        format!("nbd:127.0.0.1:{wrapped}"),
        format!("nbd:127.0.0.1:+{port}:exportname=r"),
        format!("nbd:127.0.0.1:{}", u32::from(gone) + 65536),
        "nbd:127.0.0.1:nbd:exportname=r".into(),
        "nbd:127.0.0.1:-1".into(),
        "nbd:127.0.0.1:nosuchservice".into(),
        format!("nbd://127.0.0.1:{wrapped}/r"),
        format!("nbd://127.0.0.1:+{port}/r"),
        format!("nbd://127.0.0.1:0{port}/r"),
        "nbd://127.0.0.1:0/r".into(),
    ];
    for name in &names {
        for sub in [&["info"][..], &["info", "--output=json"], &["map"]] {
            let mut a = sub.to_vec();
            a.push(name);
            same(d, &a);
        }
    }
    for o in [
        format!("driver=nbd,host=127.0.0.1,port={wrapped},export=r"),
        format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={wrapped},export=r"),
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=nbd,export=r".into(),
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=nosuchservice".into(),
    ] {
        same(d, &["info", "--image-opts", &o]);
        same(d, &["map", "--output=json", "--image-opts", &o]);
    }
    assert_all_same();
}
