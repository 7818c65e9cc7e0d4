//! Lists come from an in-memory index of the records; the record files stay
//! the truth. Every list here is compared with the same query run over the
//! records read straight from the files at that moment: after this registry's
//! writes, after another writer's (as another process's) right away and after
//! the index had settled, and after a restart.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};
use strata_registry::index::SETTLED;
use strata_registry::list::select;
use strata_registry::{ErrorKind, ImageRecord, ListQuery, PatchOp, Registry};

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// The records as the files hold them now, read without the registry.
fn from_files(state: &Path) -> Vec<ImageRecord> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(state.join("images")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".json") && !name.starts_with('.') {
            let data = std::fs::read(state.join("images").join(&name)).unwrap();
            out.push(serde_json::from_slice(&data).unwrap());
        }
    }
    out
}

fn query(pairs: &[(&str, &str)]) -> ListQuery {
    let p: Vec<(String, String)> = pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    ListQuery::from_pairs(&p).unwrap()
}

/// Filters, sort keys (numbers, text, absent values, several keys) and small
/// pages, so markers are exercised on every one.
fn queries() -> Vec<ListQuery> {
    let qs: &[&[(&str, &str)]] = &[
        &[],
        &[("sort", "name:asc")],
        &[("sort", "disk_format:asc,name:desc")],
        &[("sort_key", "size"), ("sort_dir", "asc")],
        &[("sort_key", "min_disk"), ("sort_key", "updated_at")],
        &[("sort", "visibility:asc,virtual_size:desc")],
        &[("name", "img3")],
        &[("disk_format", "raw"), ("sort", "id:asc")],
        &[("tag", "gold")],
        &[("os_distro", "debian"), ("sort", "status:desc")],
        &[("os_hidden", "true")],
        &[("status", "active")],
        &[("visibility", "public"), ("sort", "min_ram:asc")],
    ];
    qs.iter()
        .map(|q| {
            let mut q = query(q);
            q.limit = 7;
            q
        })
        .collect()
}

/// Page through every query with markers; each page must equal the same
/// query over the files.
fn lists_match_the_files(reg: &Registry, state: &Path, what: &str) {
    let files = from_files(state);
    assert!(!files.is_empty());
    for q in queries() {
        let mut q = q;
        let mut pages = 0;
        loop {
            let got = reg.list(&q).unwrap();
            let want = select(files.clone(), &q).unwrap();
            assert_eq!(got, want, "{what}: {q:?}");
            pages += 1;
            if !got.more {
                break;
            }
            q.marker = got.images.last().map(|r| r.id.clone());
        }
        assert!(pages < 100, "{what}: paging did not end");
    }
    assert_eq!(reg.all().unwrap().len(), files.len(), "{what}");
}

/// A varied image `i`: names repeat, formats alternate, some tags, custom
/// properties, hidden and public images, and data for every fifth.
fn make(reg: &Registry, i: usize) -> String {
    let body = json!({
        "name": format!("img{}", i % 10),
        "disk_format": if i % 2 == 0 { "raw" } else { "qcow2" },
        "container_format": "bare",
        "visibility": if i % 3 == 0 { "public" } else { "private" },
        "os_hidden": i % 11 == 0,
        "min_disk": i % 4,
        "min_ram": (i * 7) % 5,
        "tags": if i % 4 == 0 { vec!["gold"] } else { vec![] },
    });
    let id = reg.create(&obj(body)).unwrap().id;
    if i % 6 == 0 {
        reg.update(&id, &[PatchOp::Add("os_distro".into(), json!("debian"))])
            .unwrap();
    }
    if i % 5 == 0 && i % 2 == 0 {
        let mut up = reg.begin_upload(&id, None).unwrap();
        up.write(&vec![i as u8; 512 * (i + 1)]).unwrap();
        up.finish().unwrap();
    }
    id
}

#[test]
fn indexed_lists_equal_the_record_files_after_own_and_other_writers_changes_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let a = Registry::open(state).unwrap();
    let ids: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let a = &a;
                s.spawn(move || (t..120).step_by(4).map(|i| make(a, i)).collect::<Vec<_>>())
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(ids.len(), 120);
    lists_match_the_files(&a, state, "after creating");

    // This registry's own changes.
    for id in &ids[..10] {
        a.update(id, &[PatchOp::Replace("name".into(), json!("renamed"))])
            .unwrap();
        a.add_tag(id, "gold").unwrap();
    }
    for id in &ids[10..20] {
        a.delete(id).unwrap();
    }
    lists_match_the_files(&a, state, "after own changes");

    // Another writer (as another process: its own registry and index), seen
    // at once, within the time the directory is not trusted to be settled.
    let b = Registry::open(state).unwrap();
    for i in 200..205 {
        make(&b, i);
    }
    for id in &ids[20..25] {
        b.update(id, &[PatchOp::Replace("name".into(), json!("by-b"))])
            .unwrap();
    }
    for id in &ids[25..30] {
        b.delete(id).unwrap();
    }
    lists_match_the_files(&a, state, "right after another writer");

    // Once settled, a list trusts the directory's stamp; another writer's
    // change (a rename of the same length included) must still be seen.
    std::thread::sleep(SETTLED + Duration::from_millis(300));
    lists_match_the_files(&a, state, "settled");
    b.update(&ids[30], &[PatchOp::Replace("name".into(), json!("img9"))])
        .unwrap();
    b.delete(&ids[31]).unwrap();
    make(&b, 300);
    lists_match_the_files(&a, state, "another writer after settling");

    // Written while this registry is closed: the reopened one sees it.
    drop(a);
    b.update(
        &ids[32],
        &[PatchOp::Replace("name".into(), json!("offline"))],
    )
    .unwrap();
    make(&b, 301);
    let a = Registry::open(state).unwrap();
    lists_match_the_files(&a, state, "after a restart");
    let offline = a.list(&query(&[("name", "offline")])).unwrap();
    assert_eq!(offline.images.len(), 1);
    assert_eq!(offline.images[0].id, ids[32]);
}

#[test]
fn creating_one_id_from_many_threads_succeeds_once_and_conflicts_for_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(dir.path()).unwrap();
    for round in 0..20 {
        let id = format!("3fa85f64-5717-4562-b3fc-2c963f66a{round:03x}");
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|t| {
                    let (reg, id) = (&reg, &id);
                    s.spawn(move || reg.create(&obj(json!({"id": id, "name": format!("t{t}")}))))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let made: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(made.len(), 1, "round {round}: {results:?}");
        for r in &results {
            if let Err(e) = r {
                assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
            }
        }
        assert_eq!(reg.get(&id).unwrap().name, made[0].name);
    }
    // Nothing but the records is left in the directory.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 20, "{names:?}");
    assert!(names.iter().all(|n| n.ends_with(".json")), "{names:?}");
}
