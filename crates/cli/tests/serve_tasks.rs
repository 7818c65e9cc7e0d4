//! Tasks of `strata serve`: an image verification runs as a task with state,
//! progress and log, fails on damaged data, and the task list survives a
//! restart (a task a killed server left running shows as interrupted). The
//! OpenAPI document describes the task types.

mod common;

use common::api::{token, Server};
use serde_json::Value;

const OCTETS: Option<&str> = Some("application/octet-stream");

fn verify(srv: &Server, tok: &str, id: &str) -> Value {
    let r = srv.req(
        "POST",
        &format!("/api/v1/images/{id}/verify"),
        Some(tok),
        None,
        b"",
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    srv.wait_task(tok, r.json()["task"].as_str().unwrap())
}

#[test]
fn verify_tasks_report_progress_and_damage_and_are_listed_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let tok = token(dir.path(), false);
    let mut srv = Server::start(dir.path(), &[]);
    let body = br#"{"name": "v", "disk_format": "raw", "container_format": "bare"}"#;
    let r = srv.req(
        "POST",
        "/v2/images",
        Some(&tok),
        Some("application/json"),
        body,
    );
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = srv.req(
        "POST",
        &format!("/api/v1/images/{id}/verify"),
        Some(&tok),
        None,
        b"",
    );
    assert_eq!(r.status, 409, "a queued image has nothing to verify");
    let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 239) as u8).collect();
    assert_eq!(
        srv.req(
            "PUT",
            &format!("/v2/images/{id}/file"),
            Some(&tok),
            OCTETS,
            &data
        )
        .status,
        204
    );

    let t = verify(&srv, &tok, &id);
    assert_eq!(t["state"], "ok", "{t}");
    assert_eq!(t["progress"], 1.0);
    assert_eq!(t["target"], id.as_str());
    assert!(t["log"].to_string().contains("match sha512"), "{t}");

    let file = dir.path().join("images").join(format!("{id}.data"));
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[5 << 20] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let t = verify(&srv, &tok, &id);
    assert_eq!(t["state"], "error", "{t}");
    assert!(t["log"].to_string().contains("does not match"), "{t}");

    let tid = t["id"].as_str().unwrap().to_string();
    assert_eq!(
        srv.req(
            "DELETE",
            &format!("/api/v1/tasks/{tid}"),
            Some(&tok),
            None,
            b""
        )
        .status,
        409
    );
    let unknown = "/api/v1/tasks/00000000-0000-4000-8000-000000000000";
    assert_eq!(srv.req("GET", unknown, Some(&tok), None, b"").status, 404);
    assert_eq!(
        srv.req(
            "GET",
            "/api/v1/tasks/..%2F..%2Ftokens",
            Some(&tok),
            None,
            b""
        )
        .status,
        404
    );

    // A task the server was running when it died.
    srv.kill();
    let cut = "11111111-1111-4111-8111-111111111111";
    let left = serde_json::json!({"id": cut, "kind": "image-verify", "target": id, "state": "running",
        "progress": 0.4, "log": ["started"], "started_at": "2026-01-01T00:00:00Z", "ended_at": null});
    std::fs::write(
        dir.path().join("tasks").join(format!("{cut}.json")),
        left.to_string(),
    )
    .unwrap();
    let srv = Server::start(dir.path(), &[]);
    let list = srv
        .req("GET", "/api/v1/tasks", Some(&tok), None, b"")
        .json();
    let states: Vec<&str> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["error", "ok", "interrupted"], "{list}");
}

#[test]
fn the_openapi_document_describes_the_task_endpoints_and_types() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    let doc = srv
        .req("GET", "/api/v1/openapi.json", None, None, b"")
        .json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    for p in [
        "/api/v1/tasks",
        "/api/v1/tasks/{id}",
        "/api/v1/images/{id}/verify",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} missing");
    }
    let task = &doc["components"]["schemas"]["Task"]["properties"];
    for field in ["id", "state", "progress", "log", "started_at"] {
        assert!(task[field].is_object(), "Task.{field} missing: {task}");
    }
}

/// What the router answers for a path no route has.
const FALLBACK_404: &str = "The resource could not be found.";

/// The routes of the Glance image API, which the document must describe too.
const GLANCE_PATHS: &[&str] = &[
    "/versions",
    "/v2/schemas/image",
    "/v2/schemas/images",
    "/v2/images",
    "/v2/images/{id}",
    "/v2/images/{id}/file",
    "/v2/images/{id}/tags/{tag}",
];

#[test]
fn the_openapi_document_lists_every_route_with_exactly_the_methods_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let tok = token(dir.path(), false);
    let srv = Server::start(dir.path(), &[]);
    let doc = srv
        .req("GET", "/api/v1/openapi.json", None, None, b"")
        .json();
    let paths = doc["paths"].as_object().unwrap();
    for p in GLANCE_PATHS {
        assert!(paths.contains_key(*p), "{p} missing from the document");
    }
    let mut asked = 0;
    for (path, ops) in paths {
        // Every placeholder names something that does not exist: a handler
        // answers its own 4xx/5xx, the router 405 (method) or its fallback.
        let concrete = path.replace(['{', '}'], "_");
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            let r = srv.req(method, &concrete, Some(&tok), None, b"");
            asked += 1;
            let fallback = String::from_utf8_lossy(&r.body).contains(FALLBACK_404);
            let routed = r.status != 405 && !(r.status == 404 && fallback);
            let documented = ops.get(method.to_lowercase()).is_some();
            assert_eq!(
                routed,
                documented,
                "{method} {path}: answered {} {} but documented: {documented}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
    }
    assert!(asked >= 5 * 25, "only {asked} requests: too few paths");
}
