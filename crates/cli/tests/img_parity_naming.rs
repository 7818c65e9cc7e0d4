//! QEMU's ways of naming an image, through both tools: `--object` secrets,
//! `--image-opts` option lists and `json:` pseudo-filenames on every subcommand
//! that opens an image. stdout, stderr and the exit code must be identical, and
//! images written through an option-list name read the same by both tools.

mod common;

use common::{assert_all_same, ok, same, same_image, sh};
use std::path::Path;

/// A qcow2 image with data, a raw image and a secret file in `d`.
fn images(d: &Path) {
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"],
    );
    common::io(d, "qcow2", "a.qcow2", &["write -P 7 64k 128k"]);
    sh(d, "qemu-img", &["create", "-q", "-f", "raw", "r.raw", "4M"]);
    std::fs::write(d.join("key.txt"), "s3cret\n").unwrap();
}

#[test]
fn object_definitions_are_accepted_and_refused_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    let objects: &[&[&str]] = &[
        &["--object", "secret,id=s0,data=abc"],
        &["--object", "secret,id=s0,file=key.txt"],
        &["--object", "secret,id=s0,data=YWJj,format=base64"],
        &["--object", "qom-type=secret,id=s0,data=x,"],
        &[
            "--object",
            "secret,id=s0,data=a",
            "--object",
            "secret,id=s1,data=b",
        ],
        &[
            "--object",
            "secret,id=s0,data=a",
            "--object",
            "secret,id=s0,data=b",
        ],
        &["--object", "secret,data=abc"],
        &["--object", "secret,id=s0"],
        &["--object", "secret,id=s0,data=a,file=key.txt"],
        &["--object", "secret,id=s0,file=missing.txt"],
        &["--object", "secret,id=s0,data=a,format=hex"],
        &["--object", "secret,id=s0,data=a b,format=base64"],
        &["--object", "secret,id=s0,data=a,foo=bar"],
        &["--object", "secret,id=s0,data"],
        &["--object", "secret,id=0s,data=a"],
        &["--object", "bogus,id=s0"],
        &["--object", "id=s0"],
        &["--object", ""],
    ];
    for o in objects {
        for sub in [&["info"][..], &["check"], &["map"], &["snapshot", "-l"]] {
            let mut a: Vec<&str> = sub.to_vec();
            a.extend_from_slice(o);
            a.push("a.qcow2");
            same(d, &a);
        }
    }
    same(
        d,
        &[
            "create",
            "-q",
            "--object",
            "secret,id=s0,data=a",
            "-f",
            "qcow2",
            "n.qcow2",
            "1M",
        ],
    );
    same(
        d,
        &[
            "create",
            "--object",
            "secret,id=s0",
            "-f",
            "qcow2",
            "n2.qcow2",
            "1M",
        ],
    );
    same(d, &["create", "--image-opts", "n3.qcow2", "1M"]);
    assert_all_same();
}

#[test]
fn image_option_lists_and_json_names_open_what_qemu_img_opens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    let names: &[&str] = &[
        "driver=qcow2,file.filename=a.qcow2",
        "driver=qcow2,file.driver=file,file.filename=a.qcow2,lazy-refcounts=on",
        "driver=qcow2,file.filename=a.qcow2,l2-cache-size=1M,file.locking=off",
        "file.filename=a.qcow2",
        "driver=raw,file.filename=r.raw",
        "driver=qcow2,file.filename=a.qcow2,foo=bar",
        "driver=qcow2,file.filename=a.qcow2,file.foo=bar",
        "driver=bogus,file.filename=a.qcow2",
        "driver=qcow2,file.filename=missing.qcow2",
        "driver=qcow2",
        "driver=qcow2,filename=a.qcow2",
    ];
    for n in names {
        for sub in ["info", "check", "map"] {
            same(d, &[sub, "--image-opts", n]);
        }
        same(d, &["snapshot", "-l", "--image-opts", n]);
        same(
            d,
            &[
                "compare",
                "--image-opts",
                n,
                "driver=raw,file.filename=r.raw",
            ],
        );
    }
    same(d, &["info", "-f", "qcow2", "--image-opts", names[0]]);
    let jsons: &[&str] = &[
        r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"}}"#,
        r#"json:{"driver":"qcow2","file.filename":"a.qcow2","lazy-refcounts":true}"#,
        r#"json:{"file":{"filename":"a.qcow2"}}"#,
        r#"json:{"driver":"qcow2","file.filename":"a.qcow2",}"#,
        r#"json:[1]"#,
        r#"json:{"driver":"qcow2","file":"a.qcow2"}"#,
        r#"json:{"driver":"qcow2","file.filename":"a.qcow2","bogus":1}"#,
        r#"json:{}"#,
    ];
    for j in jsons {
        for sub in ["info", "check", "map"] {
            same(d, &[sub, j]);
        }
        same(d, &["compare", j, "a.qcow2"]);
        same(d, &["measure", "-O", "qcow2", j]);
    }
    // -f names the format of a json: name, over its driver.
    same(d, &["info", "-f", "raw", jsons[0]]);
    assert_all_same();
}

#[test]
fn convert_and_writing_subcommands_take_option_list_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    for (tool, out) in [("strata", "o.raw"), ("qemu-img", "t.raw")] {
        sh(d, "qemu-img", &["create", "-q", "-f", "raw", out, "4M"]);
        let target = format!("driver=raw,file.filename={out}");
        let source = "driver=qcow2,file.filename=a.qcow2";
        let args = ["convert", "-n", "--source-image-opts", source];
        ok(
            d,
            tool,
            &[&args[..], &["--target-image-opts", &target]].concat(),
        );
    }
    sh(
        d,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", "o.raw", "t.raw"],
    );
    sh(d, "qemu-img", &["compare", "a.qcow2", "o.raw"]);
    let target = [
        "--target-image-opts",
        "a.qcow2",
        "driver=raw,file.filename=o.raw",
    ];
    let source = [
        "--image-opts",
        "driver=qcow2,file.filename=a.qcow2",
        "o.raw",
    ];
    for refused in [
        &[&["convert"][..], &target].concat(),
        &[&["convert", "-n", "-O", "raw"][..], &target].concat(),
        &[&["convert", "-n", "-f", "qcow2"][..], &source].concat(),
    ] {
        same(d, refused);
    }
    // Writing subcommands change the image the options name.
    let steps: [&[&str]; 3] = [
        &["resize", "--image-opts", "NAME", "8M"],
        &["bitmap", "--add", "--image-opts", "NAME", "b0"],
        &["amend", "-o", "lazy_refcounts=on", "--image-opts", "NAME"],
    ];
    for (i, step) in steps.iter().enumerate() {
        let imgs = [format!("w{i}-o.qcow2"), format!("w{i}-t.qcow2")];
        for (tool, img) in ["strata", "qemu-img"].iter().zip(&imgs) {
            std::fs::copy(d.join("a.qcow2"), d.join(img)).unwrap();
            let name = format!("driver=qcow2,file.filename={img}");
            let args: Vec<&str> = step
                .iter()
                .map(|a| if *a == "NAME" { name.as_str() } else { a })
                .collect();
            ok(d, tool, &args);
        }
        same_image(d, &imgs[0], &imgs[1], step[0]);
    }
    assert_all_same();
}

#[test]
fn file_prefixes_colons_and_protocol_drivers_as_formats_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    std::fs::copy(d.join("a.qcow2"), d.join("c:d.qcow2")).unwrap();
    let cases: &[&[&str]] = &[
        &["info", "file:a.qcow2"],
        &["info", "c:d.qcow2"],
        &["info", "file:c:d.qcow2"],
        &["info", "./c:d.qcow2"],
        &["info", "nosuch:x"],
        &["info", "file:missing.qcow2"],
        &["info", "file:"],
        &["info", "-f", "raw", "c:d.qcow2"],
        &["info", "-f", "file", "c:d.qcow2"],
        &["info", "-f", "file", "file:a.qcow2"],
        &["info", "-f", "file", "a.qcow2"],
        &["info", "--output=json", "-f", "file", "a.qcow2"],
        &["info", "--backing-chain", "-f", "file", "a.qcow2"],
        &["info", "-f", "file", "/dev/null"],
        &["info", "-f", "host_device", "a.qcow2"],
        &["info", "-f", "host_device", "/dev/null"],
        &["info", "--output=json", "-f", "host_device", "/dev/null"],
        &["info", "-f", "bogus", "a.qcow2"],
        &["info", "--image-opts", "driver=file,filename=a.qcow2"],
        &[
            "info",
            "--image-opts",
            "driver=host_device,filename=a.qcow2",
        ],
        &[
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=c:d.qcow2",
        ],
        &["check", "-f", "file", "a.qcow2"],
        &["check", "file:a.qcow2"],
        &["map", "-f", "file", "a.qcow2"],
        &["map", "--output=json", "-f", "file", "a.qcow2"],
        &["map", "file:c:d.qcow2"],
        &["compare", "-f", "file", "-F", "raw", "a.qcow2", "a.qcow2"],
        &["compare", "file:a.qcow2", "c:d.qcow2"],
        &["measure", "-O", "qcow2", "-f", "file", "a.qcow2"],
        &["snapshot", "-l", "-f", "file", "a.qcow2"],
        &["snapshot", "-l", "file:a.qcow2"],
        &["amend", "-f", "file", "-o", "size=3M", "r.raw"],
        &["create", "-f", "raw", "out:4", "1M"],
        &["convert", "a.qcow2", "out:8"],
        &["dd", "if=a.qcow2", "of=out:11"],
    ];
    // Outputs: the prefix is taken off, `file` writes raw.
    let writes: &[&[&str]] = &[
        &["create", "-f", "file", "out1.img", "1M"],
        &["create", "-f", "qcow2", "file:out2.qcow2", "1M"],
        &["create", "-f", "raw", "file:out:3", "1M"],
        &["convert", "-O", "file", "a.qcow2", "out5.img"],
        &["convert", "-O", "raw", "file:a.qcow2", "file:out6.img"],
        &["convert", "-f", "file", "a.qcow2", "out7.img"],
        &["dd", "-O", "file", "if=a.qcow2", "of=out9.img"],
        &["dd", "if=file:a.qcow2", "of=file:out10.img"],
    ];
    for c in cases.iter().chain(writes) {
        same(d, c);
    }
    assert_all_same();
    // What strata wrote, alone, reads right to qemu-img.
    for c in writes {
        ok(d, "strata", c);
    }
    for (out, fmt, guest) in [
        ("out1.img", "raw", None),
        ("out2.qcow2", "qcow2", None),
        ("./out:3", "raw", None),
        ("out5.img", "raw", Some("a.qcow2")),
        ("out6.img", "raw", Some("a.qcow2")),
        ("out9.img", "raw", Some("a.qcow2")),
        ("out10.img", "raw", Some("a.qcow2")),
    ] {
        let info = common::ok(d, "qemu-img", &["info", "--output=json", out]);
        assert!(
            info.contains(&format!("\"format\": \"{fmt}\"")),
            "{out}: {info}"
        );
        if let Some(src) = guest {
            sh(d, "qemu-img", &["compare", src, out]);
        }
    }
    // -f file reads the file's own bytes: the qcow2 file as it is on disk.
    sh(
        d,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", "a.qcow2", "out7.img"],
    );
}

/// A fixture directory for naming cases: `t.qcow2` over `b.qcow2` and a raw
/// `r.raw`.
fn naming_fixture(root: &Path) -> std::path::PathBuf {
    let d = root.join("fx");
    std::fs::create_dir(&d).unwrap();
    common::qcow2(&d, "b.qcow2", "4M", &[]);
    common::io(&d, "qcow2", "b.qcow2", &["write -P 3 0 64k"]);
    common::qcow2(&d, "t.qcow2", "4M", &["-b", "b.qcow2", "-F", "qcow2"]);
    common::io(&d, "qcow2", "t.qcow2", &["write -P 5 1M 64k"]);
    sh(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "r.raw", "1M"],
    );
    d
}

/// In `d`: a luks image `l.luks` and an encrypted qcow2 `e.qcow2` (secret
/// `abc` for both), a raw `r.raw`.
fn encrypted_images(d: &Path) {
    sh(d, "qemu-img", &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    let secret = ["--object", "secret,id=s0,data=abc"];
    sh(
        d,
        "qemu-img",
        &[
            &["create", "-q", "-f", "luks"][..],
            &secret,
            &["-o", "key-secret=s0,iter-time=10", "l.luks", "1M"],
        ]
        .concat(),
    );
    sh(
        d,
        "qemu-img",
        &[
            &["create", "-q", "-f", "qcow2"][..],
            &secret,
            &[
                "-o",
                "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                "e.qcow2",
                "1M",
            ],
        ]
        .concat(),
    );
}

#[test]
fn writing_subcommands_refuse_force_share_named_in_the_image_options() {
    let dir = tempfile::tempdir().unwrap();
    let fx = naming_fixture(dir.path());
    let on = "driver=qcow2,file.filename=t.qcow2,force-share=on";
    let on_file = "driver=qcow2,file.filename=t.qcow2,file.force-share=on";
    let on_unknown = "driver=qcow2,file.filename=t.qcow2,force-share=on,foo=bar";
    let on_missing = "driver=qcow2,file.filename=nope.qcow2,force-share=on";
    let json = r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"t.qcow2"},"force-share":true}"#;
    let mut n = 0;
    for name in [on, on_file, on_unknown, on_missing] {
        let cases: [&[&str]; 11] = [
            &["commit", "--image-opts", name],
            &[
                "rebase",
                "-u",
                "-b",
                "b.qcow2",
                "-F",
                "qcow2",
                "--image-opts",
                name,
            ],
            &["rebase", "-b", "", "--image-opts", name],
            &["bitmap", "--add", "--image-opts", name, "b0"],
            &["snapshot", "-c", "s", "--image-opts", name],
            &["snapshot", "-d", "s", "--image-opts", name],
            &["snapshot", "-a", "s", "--image-opts", name],
            &["amend", "-o", "lazy_refcounts=on", "--image-opts", name],
            &["resize", "--image-opts", name, "8M"],
            &["convert", "-n", "--target-image-opts", "r.raw", name],
            &["snapshot", "-l", "--image-opts", name],
        ];
        for c in cases {
            n += 1;
            common::same_in_dir_copies(&fx, n, c);
        }
    }
    let cases: [&[&str]; 8] = [
        &["commit", json],
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", json],
        &["bitmap", "--add", json, "b0"],
        &["snapshot", "-c", "s", json],
        &["convert", "-n", "-O", "qcow2", "r.raw", json],
        &["snapshot", "-U", "-c", "s", "t.qcow2"],
        &["snapshot", "-U", "-l", "t.qcow2"],
        &[
            "convert",
            "-n",
            "-O",
            "qcow2",
            "r.raw",
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"t.qcow2"}}"#,
        ],
    ];
    for c in cases {
        n += 1;
        common::same_in_dir_copies(&fx, n, c);
    }
    // info opens no backing file: a backing node given by options is an
    // option nothing takes.
    for name in [
        "driver=qcow2,file.filename=t.qcow2,backing.driver=qcow2,backing.file.filename=b.qcow2",
        "driver=qcow2,file.filename=t.qcow2,backing=foo",
        r#"json:{"driver":"qcow2","file":{"filename":"t.qcow2"},"backing":{"driver":"raw","file":{"filename":"r.raw"}}}"#,
    ] {
        let opts = !name.starts_with("json:");
        for args in [&["info"][..], &["info", "--backing-chain"]] {
            let mut a = args.to_vec();
            if opts {
                a.push("--image-opts");
            }
            a.push(name);
            same(&fx, &a);
        }
    }
    assert_all_same();
}

#[test]
fn encrypted_images_opened_for_their_data_want_the_secret_before_unknown_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    encrypted_images(d);
    let luks = "driver=luks,file.filename=l.luks,foo=bar";
    let enc = "driver=qcow2,file.filename=e.qcow2,foo=bar";
    let luks_json = r#"json:{"driver":"luks","file":{"filename":"l.luks"},"foo":1}"#;
    let cases: &[&[&str]] = &[
        &["info", "--image-opts", luks],
        &["info", "--image-opts", enc],
        &["check", "--image-opts", luks],
        &["map", "--image-opts", luks],
        &["compare", "--image-opts", luks, "r.raw"],
        &["measure", "-O", "raw", "--image-opts", luks],
        &["snapshot", "-l", "--image-opts", enc],
        &["snapshot", "-c", "s", "--image-opts", enc],
        &["convert", "--image-opts", luks, "-O", "raw", "o.raw"],
        &["convert", "-n", "--target-image-opts", "r.raw", luks],
        &["convert", "-n", "--target-image-opts", "r.raw", enc],
        &["resize", "--image-opts", luks, "2M"],
        &["resize", luks_json, "2M"],
        &[
            "resize",
            "--image-opts",
            "file.filename=l.luks,foo=bar",
            "2M",
        ],
        &["amend", "-o", "size=2M", "--image-opts", luks],
        &["commit", "--image-opts", enc],
        &["bitmap", "--add", "--image-opts", enc, "b0"],
        &["rebase", "-u", "-b", "", "--image-opts", enc],
        &["bench", "-c", "1", "--image-opts", luks],
        &[
            "resize",
            "--image-opts",
            "driver=luks,file.filename=l.luks,key-secret=nope,foo=bar",
            "2M",
        ],
        &[
            "resize",
            "--image-opts",
            "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=nope,foo=bar",
            "2M",
        ],
        &[
            "resize",
            "--object",
            "secret,id=s0,data=abc",
            "--image-opts",
            "driver=luks,file.filename=l.luks,key-secret=s0,foo=bar",
            "2M",
        ],
        &[
            "check",
            "--image-opts",
            "driver=luks,file.filename=l.luks,foo=bar,file.x=1",
        ],
    ];
    // Every case is refused: nothing is written.
    for c in cases {
        same(d, c);
    }
    assert_all_same();
}

#[test]
fn blkdebug_over_json_and_nbd_names_opens_or_refuses_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    let gone = d.join("gone.sock");
    let unix = format!("blkdebug::nbd:unix:{}", gone.display());
    let unix_url = format!("blkdebug::nbd+unix:///x?socket={}", gone.display());
    let names: &[&str] = &[
        "blkdebug::json:{}",
        "blkdebug::json:{",
        r#"blkdebug::json:{"driver":"file","filename":"a.qcow2"}"#,
        r#"blkdebug::json:{"filename":"a.qcow2"}"#,
        r#"blkdebug::json:{"driver":"file","filename":"a.qcow2","foo":1}"#,
        r#"blkdebug::json:{"driver":"file","filename":"nope"}"#,
        r#"blkdebug::json:{"driver":"file"}"#,
        r#"blkdebug::json:{"driver":"bogus"}"#,
        r#"blkdebug::json:{"driver":"raw"}"#,
        r#"blkdebug::json:{"file":{"driver":"file","filename":"a.qcow2"}}"#,
        "blkdebug::nbd:x",
        "blkdebug::nbd:",
        "blkdebug::nbd://",
        &unix,
        &unix_url,
    ];
    for n in names {
        for sub in ["info", "check", "map"] {
            same(d, &[sub, n]);
        }
    }
    assert_all_same();
}

#[test]
fn a_wrong_secret_is_refused_before_an_unknown_option_on_an_encrypted_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    encrypted_images(d);
    for image in [
        "driver=luks,file.filename=l.luks,key-secret=s0,foo=bar",
        "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s0,foo=bar",
    ] {
        for data in ["wrong", "abc"] {
            let object = format!("secret,id=s0,data={data}");
            for sub in [&["check"][..], &["map"], &["info"]] {
                let mut a = sub.to_vec();
                a.extend(["--object", &object, "--image-opts", image]);
                same(d, &a);
            }
            // Refused before anything is written.
            same(
                d,
                &["resize", "--object", &object, "--image-opts", image, "2M"],
            );
        }
    }
    assert_all_same();
}

#[test]
fn nbd_addresses_with_a_port_that_is_no_number_fail_to_resolve_as_in_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in [
        "nbd:localhost:x",
        "nbd:127.0.0.1:1x",
        "nbd::x",
        "nbd:a:b:c",
        "nbd:localhost:x:exportname=e",
        "nbd:localhost",
        "nbd:localhost:",
        "nbd:[::1",
        "nbd:[::1]",
        "nbd:[::1]:",
        "nbd:[]:x",
        "nbd:[::1]:x",
        "blkdebug::nbd:localhost:x",
    ] {
        same(d, &["info", name]);
    }
    for opts in [
        "driver=nbd,host=localhost,port=x",
        "driver=nbd,server.type=inet,server.host=localhost,server.port=x",
    ] {
        same(d, &["info", "--image-opts", opts]);
    }
    assert_all_same();
}

#[test]
fn a_backing_node_named_by_node_name_or_left_empty_is_treated_as_qemu_img_treats_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    sh(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "t.qcow2",
        ],
    );
    let names = [
        "driver=qcow2,file.filename=t.qcow2,backing=x",
        "driver=qcow2,file.filename=t.qcow2,backing=x,foo=1",
        "driver=qcow2,file.filename=t.qcow2,backing=",
        "driver=qcow2,file.filename=t.qcow2,backing=,foo=1",
        "driver=raw,file.filename=r.raw,backing=x",
        "driver=raw,file.filename=r.raw,backing=",
    ];
    for name in names {
        for sub in [
            &["info"][..],
            &["map"],
            &["check"],
            &["measure", "-O", "qcow2"],
        ] {
            let mut a = sub.to_vec();
            a.extend(["--image-opts", name]);
            same(d, &a);
        }
    }
    same(
        d,
        &[
            "map",
            r#"json:{"driver":"qcow2","file":{"filename":"t.qcow2"},"backing":""}"#,
        ],
    );
    assert_all_same();
}

/// Images whose backing files are given by options in place of the ones their
/// headers name: a chain `top.qcow2` over `base.qcow2`, a chain `t3.qcow2`
/// over `mid.qcow2` over `base.qcow2`, an image `nob.qcow2` naming none, and
/// other images to give as backing files (raw ones shorter and longer than
/// the overlays).
fn backing_node_fixture(d: &Path) {
    let create = |args: &[&str]| sh(d, "qemu-img", &[&["create", "-q"][..], args].concat());
    create(&["-f", "qcow2", "base.qcow2", "1M"]);
    common::io(d, "qcow2", "base.qcow2", &["write -P 0x11 0 64k"]);
    create(&["-f", "qcow2", "other.qcow2", "1M"]);
    common::io(d, "qcow2", "other.qcow2", &["write -P 0x22 64k 64k"]);
    create(&["-f", "raw", "base.raw", "1M"]);
    common::io(d, "raw", "base.raw", &["write -P 0x33 128k 64k"]);
    create(&["-f", "raw", "small.raw", "64k"]);
    common::io(d, "raw", "small.raw", &["write -P 0x44 0 64k"]);
    create(&["-f", "raw", "big.raw", "2M"]);
    common::io(d, "raw", "big.raw", &["write -P 0x55 0 2M"]);
    let overlay = |name: &str, backing: &str| {
        create(&["-f", "qcow2", "-b", backing, "-F", "qcow2", name]);
    };
    overlay("top.qcow2", "base.qcow2");
    common::io(d, "qcow2", "top.qcow2", &["write -P 0x66 192k 64k"]);
    overlay("mid.qcow2", "base.qcow2");
    common::io(d, "qcow2", "mid.qcow2", &["write -P 0x77 256k 64k"]);
    overlay("t3.qcow2", "mid.qcow2");
    create(&["-f", "qcow2", "nob.qcow2", "1M"]);
}

#[test]
fn backing_files_given_by_options_are_opened_in_place_of_the_headers_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    backing_node_fixture(d);
    let opts = |rest: &str| format!("driver=qcow2,file.filename={rest}");
    let names = [
        opts("top.qcow2,backing.driver=qcow2,backing.file.filename=other.qcow2"),
        opts("top.qcow2,backing.driver=raw,backing.file.filename=base.raw"),
        opts("top.qcow2,backing.driver=raw,backing.file.driver=file,backing.file.filename=small.raw"),
        opts("top.qcow2,backing.driver=raw,backing.file.filename=big.raw"),
        // The header's file, in another format, or in the recorded one.
        opts("top.qcow2,backing.driver=raw"),
        opts("top.qcow2,backing.driver=qcow2"),
        // An image naming no backing file gets one (probed without a driver).
        opts("nob.qcow2,backing.driver=raw,backing.file.filename=base.raw"),
        opts("nob.qcow2,backing.file.filename=base.raw"),
        // Nested nodes, and a node without a backing file of its own.
        opts("t3.qcow2,backing.driver=qcow2,backing.file.filename=mid.qcow2,backing.backing.driver=raw,backing.backing.file.filename=base.raw"),
        opts("t3.qcow2,backing.backing.driver=qcow2,backing.backing.file.filename=other.qcow2"),
        opts("t3.qcow2,backing.driver=qcow2,backing.file.filename=mid.qcow2,backing.backing="),
        opts("top.qcow2,backing.driver=raw,backing.file.filename=base.raw,backing.backing="),
        r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"t3.qcow2"},"backing":{"driver":"qcow2","file":{"driver":"file","filename":"mid.qcow2"},"backing":null}}"#.into(),
        r#"json:{"driver":"qcow2","file":{"filename":"top.qcow2"},"backing":{"driver":"raw","file":{"filename":"base.raw"}}}"#.into(),
        r#"json:{"driver":"qcow2","file":{"filename":"t3.qcow2"},"backing":{"driver":"qcow2","file":{"filename":"top.qcow2"}}}"#.into(),
        // Refusals: no such driver, file or option, no file for a driver, a
        // file not in the driver's format, a raw image with a backing file.
        opts("top.qcow2,backing.driver=bogus,backing.file.filename=base.raw"),
        opts("top.qcow2,backing.driver=raw,backing.file.filename=missing.raw"),
        opts("top.qcow2,backing.driver=raw,backing.file.filename=base.raw,backing.foo=bar"),
        opts("top.qcow2,backing.driver=raw,backing.file.filename=base.raw,backing.lazy-refcounts=on"),
        opts("top.qcow2,backing.driver=raw,backing.file.filename=base.raw,backing.file.foo=1"),
        opts("top.qcow2,backing.driver=raw,backing.file.driver=host_device,backing.file.filename=base.raw"),
        opts("top.qcow2,backing.driver=qcow2,backing.file.filename=base.raw"),
        opts("top.qcow2,backing.file.filename=base.raw"),
        opts("nob.qcow2,backing.driver=raw"),
        opts("top.qcow2,backing.driver=raw,backing.file.filename=base.raw,backing.backing.driver=raw"),
        "driver=raw,file.filename=base.raw,backing.driver=raw,backing.file.filename=small.raw".into(),
    ];
    let mut converts = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let json = name.starts_with("json:");
        fn with_name<'a>(
            json: bool,
            name: &'a str,
            sub: &[&'a str],
            after: &[&'a str],
        ) -> Vec<&'a str> {
            let mut a = sub.to_vec();
            if !json {
                a.push("--image-opts");
            }
            a.push(name);
            a.extend_from_slice(after);
            a
        }

        for sub in [
            &["map"][..],
            &["map", "--output=json"],
            &["check"],
            &["measure", "-O", "qcow2"],
            // info opens no backing file: the options are left over.
            &["info", "--backing-chain"],
        ] {
            same(d, &with_name(json, name, sub, &[]));
        }
        let other = if json {
            "base.raw"
        } else {
            "driver=raw,file.filename=base.raw"
        };
        same(d, &with_name(json, name, &["compare"], &[other]));
        // convert reads the chain the options give.
        let outs = [format!("o{i}.raw"), format!("t{i}.raw")];
        let ran: Vec<_> = ["strata", "qemu-img"]
            .iter()
            .zip(&outs)
            .map(|(tool, out)| {
                common::outcome(
                    d,
                    tool,
                    &with_name(json, name, &["convert", "-O", "raw"], &[out]),
                )
            })
            .collect();
        let read = |f: &String| std::fs::read(d.join(f)).ok();
        if ran[0] != ran[1] || read(&outs[0]) != read(&outs[1]) {
            converts.push(format!("convert {name}: {:?} {:?}", ran[0], ran[1]));
        }
    }
    assert!(converts.is_empty(), "{converts:#?}");
    assert_all_same();
}

#[test]
fn writing_subcommands_refuse_read_only_nodes_once_the_image_opens() {
    let dir = tempfile::tempdir().unwrap();
    let fx = naming_fixture(dir.path());
    let names = [
        "driver=qcow2,file.filename=t.qcow2,read-only=on",
        "driver=qcow2,file.filename=t.qcow2,file.read-only=on",
        "driver=qcow2,file.filename=t.qcow2,read-only=on,file.read-only=off",
        // Shared, but read-only: the write is what is refused.
        "driver=qcow2,file.filename=t.qcow2,read-only=on,force-share=on",
        // Whatever fails the open is said first.
        "driver=qcow2,file.filename=nope.qcow2,read-only=on",
        "driver=qcow2,file.filename=t.qcow2,read-only=on,foo=bar",
        "driver=qcow2,file.filename=t.qcow2,read-only=on,lazy-refcounts=maybe",
        // A secret id nothing defines is looked up only to decrypt.
        "driver=qcow2,file.filename=t.qcow2,read-only=on,encrypt.key-secret=s9",
        "driver=qcow2,file.filename=t.qcow2,read-only=off",
        "driver=raw,file.filename=r.raw,read-only=on",
    ];
    let mut n = 0;
    for name in names {
        let cases: [&[&str]; 8] = [
            &["commit", "--image-opts", name],
            &["rebase", "-b", "", "--image-opts", name],
            &["bitmap", "--add", "--image-opts", name, "b0"],
            &["snapshot", "-c", "s", "--image-opts", name],
            &["amend", "-o", "lazy_refcounts=on", "--image-opts", name],
            &["resize", "--image-opts", name, "8M"],
            &["check", "-r", "all", "--image-opts", name],
            &["convert", "-n", "--target-image-opts", "r.raw", name],
        ];
        for c in cases {
            n += 1;
            common::same_in_dir_copies(&fx, n, c);
        }
    }
    for c in [
        &["info", "--image-opts", names[0]][..],
        &["map", "--image-opts", names[1]],
        // The backing file's own switch: commit reopens it for writing.
        &[
            "commit",
            "--image-opts",
            "driver=qcow2,file.filename=t.qcow2,backing.read-only=on",
        ],
        &[
            "amend",
            "-o",
            "compat=1.1",
            r#"json:{"driver":"qcow2","read-only":true,"file":{"driver":"file","filename":"t.qcow2"}}"#,
        ],
        &[
            "resize",
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"t.qcow2","read-only":true}}"#,
            "8M",
        ],
    ] {
        n += 1;
        common::same_in_dir_copies(&fx, n, c);
    }
    assert_all_same();
}

#[test]
fn option_values_are_refused_as_qemu_img_refuses_them_and_after_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let fx = naming_fixture(dir.path());
    let values = [
        "read-only=maybe",
        "auto-read-only=2",
        "force-share=maybe",
        "cache.direct=maybe",
        "cache.no-flush=maybe",
        "read-only=n",
        "read-only=yes",
        "file.read-only=maybe",
        "file.locking=maybe",
        "file.locking=auto",
        "file.aio=x",
        "file.aio=native",
        "file.aio=native,cache.direct=on",
        "lazy-refcounts=maybe",
        "lazy-refcounts=y",
        "pass-discard-other=2",
        "cache-size=x",
        "cache-size=-1",
        "cache-size=1k",
        "l2-cache-size=1M,refcount-cache-size=1M,cache-size=2M",
        "cache-clean-interval=x",
        "cache-clean-interval=-1",
        "cache-clean-interval=0x10",
        "overlap-check=x",
        "overlap-check.template=all",
        "overlap-check.main-header=x",
        "discard=maybe",
        "discard=unmap,detect-zeroes=unmap",
        "detect-zeroes=unmap",
        "detect-zeroes=x",
        "foo=bar",
        "file.foo=bar",
        "encrypt.key-secret=s9",
    ];
    for v in values {
        for file in ["t.qcow2", "nope.qcow2"] {
            let name = format!("driver=qcow2,file.filename={file},{v}");
            same(&fx, &["info", "--image-opts", &name]);
        }
    }
    for name in [
        "driver=file,filename=r.raw,locking=x",
        "driver=file,filename=r.raw,read-only=x",
        "driver=raw,file.filename=r.raw,lazy-refcounts=x",
        r#"json:{"driver":"qcow2","read-only":1,"file":{"filename":"t.qcow2"}}"#,
        r#"json:{"driver":"qcow2","read-only":"on","file":{"filename":"t.qcow2"}}"#,
    ] {
        let mut a = vec!["info"];
        if !name.starts_with("json:") {
            a.push("--image-opts");
        }
        a.push(name);
        same(&fx, &a);
    }
    // Spellings of a switch QEMU takes in -o too.
    for (n, v) in ["y", "n", "maybe"].into_iter().enumerate() {
        let o = format!("lazy_refcounts={v}");
        let c = ["create", "-f", "qcow2", "-o", &o, "n.qcow2", "1M"];
        common::same_in_dir_copies(&fx, n, &c);
    }
    assert_all_same();
}
