//! A Garage S3 cluster on loopback for the tests: one or more `garage server`
//! processes (the real server, built with `cargo install --locked garage`; a
//! missing binary fails the test), joined into one layout with a replication
//! factor equal to the node count, one bucket and one access key. Each node's
//! configuration is `scripts/garage-node.toml` filled in, the file
//! `scripts/garage-cluster.sh` fills in too.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The S3 region the cluster's signatures use (`s3_region` in the node template).
pub const REGION: &str = "garage";
/// The bucket every cluster is given.
pub const BUCKET: &str = "strata";

/// The node configuration template shared with `scripts/garage-cluster.sh`.
const NODE_TEMPLATE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/garage-node.toml"
));

/// One `garage server` process.
struct Node {
    root: PathBuf,
    config: PathBuf,
    s3_port: u16,
    rpc_port: u16,
    child: Option<Child>,
}

/// A running cluster. Dropping it kills every node.
pub struct Garage {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    key_id: String,
    secret: String,
}

/// The garage binary: `$GARAGE`, else `garage` on PATH, else cargo's bin directory.
pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("GARAGE") {
        return PathBuf::from(p);
    }
    let in_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("garage").is_file()))
        .unwrap_or(false);
    if in_path {
        return PathBuf::from("garage");
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("HOME or CARGO_HOME is set");
    let p = home.join("bin/garage");
    assert!(
        p.is_file(),
        "garage is not installed (scripts/install-deps.sh runs `cargo install --locked garage`)"
    );
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn garage(config: &Path, args: &[&str]) -> Output {
    let out = Command::new(binary())
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .expect("garage runs");
    assert!(
        out.status.success(),
        "garage {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Retry `f` until it returns `Some` or `timeout` passes.
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Node {
    /// Start (or restart) the server, its output appended to the node's log.
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("log"))
            .unwrap();
        let child = Command::new(binary())
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("garage server starts");
        self.child = Some(child);
    }

    fn node_id(&self) -> String {
        wait_for("the garage node's id", Duration::from_secs(30), || {
            let out = Command::new(binary())
                .arg("-c")
                .arg(&self.config)
                .args(["node", "id", "-q"])
                .output()
                .ok()?;
            let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (out.status.success() && id.contains('@')).then_some(id)
        })
    }

    /// Wait until the server answers its admin RPC (`node id` reads only the
    /// node's key file, so it answers before the server listens).
    fn wait_listening(&self) {
        wait_for("the garage server's RPC", Duration::from_secs(30), || {
            let out = Command::new(binary())
                .arg("-c")
                .arg(&self.config)
                .arg("status")
                .output()
                .ok()?;
            out.status.success().then_some(())
        })
    }
}

impl Garage {
    /// Start `n` nodes, each storing a full replica of every object.
    pub fn start(n: usize) -> Garage {
        let dir = tempfile::tempdir().unwrap();
        let secret: String = (0..32).map(|i| format!("{:02x}", i * 7 + 3)).collect();
        let mut nodes = Vec::new();
        for i in 0..n {
            let root = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&root).unwrap();
            let (s3_port, rpc_port) = (free_port(), free_port());
            let config = root.join("garage.toml");
            let text = NODE_TEMPLATE
                .replace("@ROOT@", &root.display().to_string())
                .replace("@REPLICAS@", &n.to_string())
                .replace("@RPC_PORT@", &rpc_port.to_string())
                .replace("@S3_PORT@", &s3_port.to_string())
                .replace("@RPC_SECRET@", &secret);
            assert!(
                !text.lines().any(|l| !l.starts_with('#') && l.contains('@')),
                "a placeholder left in:\n{text}"
            );
            std::fs::write(&config, text).unwrap();
            let mut node = Node {
                root,
                config,
                s3_port,
                rpc_port,
                child: None,
            };
            node.start();
            nodes.push(node);
        }
        let mut g = Garage {
            dir,
            nodes,
            key_id: String::new(),
            secret: String::new(),
        };
        g.form_cluster();
        g
    }

    fn admin(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&garage(&self.nodes[0].config, args).stdout).into_owned()
    }

    /// Connect the nodes, give each a role, apply the layout, make the bucket and key.
    fn form_cluster(&mut self) {
        let ids: Vec<String> = self.nodes.iter().map(Node::node_id).collect();
        for node in &self.nodes {
            node.wait_listening();
        }
        for id in &ids[1..] {
            self.admin(&["node", "connect", id]);
        }
        for id in &ids {
            let short = id.split('@').next().unwrap();
            self.admin(&["layout", "assign", "-z", "dc1", "-c", "1G", short]);
        }
        self.admin(&["layout", "apply", "--version", "1"]);
        self.admin(&["bucket", "create", BUCKET]);
        let key = self.admin(&["key", "create", "strata-tests"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim_start_matches(':').trim().to_string())
                .unwrap_or_else(|| panic!("no '{name}' in garage's key output:\n{key}"))
        };
        self.key_id = field("Key ID");
        self.secret = field("Secret key");
        self.admin(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            BUCKET,
            "--key",
            "strata-tests",
        ]);
        // The S3 API answers once every node has the new layout.
        for node in &self.nodes {
            let addr = format!("127.0.0.1:{}", node.s3_port);
            wait_for("garage's S3 port", Duration::from_secs(30), || {
                std::net::TcpStream::connect(&addr).ok()
            });
        }
    }

    /// A repository location in the bucket, served by node `node`.
    pub fn repo(&self, node: usize, prefix: &str) -> String {
        format!(
            "s3:http://127.0.0.1:{}/{BUCKET}/{prefix}",
            self.nodes[node].s3_port
        )
    }

    /// Put the cluster's credentials and region in `cmd`'s environment.
    pub fn credentials<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_DEFAULT_REGION", REGION)
            .env_remove("AWS_REGION")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_ENDPOINT")
    }

    /// The access key's id and secret.
    pub fn key(&self) -> (&str, &str) {
        (&self.key_id, &self.secret)
    }

    /// SIGKILL node `i` (the others keep serving).
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start node `i` again after [`Self::kill_node`], on its old ports and
    /// data; it rejoins the cluster from the peers it recorded, and its S3 port
    /// answers when this returns.
    pub fn restart_node(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {i} is running");
        self.nodes[i].start();
        self.nodes[i].node_id();
        // Its peers gave up on it: it calls them at once rather than on its
        // next retry, and serves requests once connected to every node again.
        let peers: Vec<String> = (0..self.nodes.len())
            .filter(|&j| j != i)
            .map(|j| self.nodes[j].node_id())
            .collect();
        for id in &peers {
            // Retried: the server may not listen yet when its id is known.
            wait_for(
                "the restarted node to call its peers",
                Duration::from_secs(30),
                || {
                    Command::new(binary())
                        .arg("-c")
                        .arg(&self.nodes[i].config)
                        .args(["node", "connect", id])
                        .output()
                        .ok()
                        .filter(|o| o.status.success())
                },
            );
        }
        let n = self.nodes.len() as u64;
        let start = Instant::now();
        loop {
            let out = garage(&self.nodes[i].config, &["json-api", "GetClusterHealth"]);
            let last = String::from_utf8_lossy(&out.stdout).into_owned();
            let health: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
            if health["connectedNodes"] == n {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "node {i} did not rejoin the cluster: {last}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let addr = format!("127.0.0.1:{}", self.nodes[i].s3_port);
        wait_for(
            "the restarted node's S3 port",
            Duration::from_secs(30),
            || std::net::TcpStream::connect(&addr).ok(),
        );
    }

    /// Bytes of object data node `i` stores (its data directory's files).
    pub fn stored_bytes(&self, i: usize) -> u64 {
        fn walk(p: &Path) -> u64 {
            std::fs::read_dir(p).map_or(0, |rd| {
                rd.flatten()
                    .map(|e| match e.file_type() {
                        Ok(t) if t.is_dir() => walk(&e.path()),
                        _ => e.metadata().map_or(0, |m| m.len()),
                    })
                    .sum()
            })
        }
        walk(&self.nodes[i].root.join("data"))
    }

    /// The cluster's scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }
}
