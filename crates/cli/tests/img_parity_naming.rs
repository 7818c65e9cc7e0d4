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
