//! Block-graph work on a running VM's QEMU: where an image file sits in a disk's
//! backing chain, streaming a layer's data into the image above it so that image
//! skips the layer (the live counterpart of `engine::rebase_past`), releasing
//! nodes nothing uses any more, and settling the jobs an interrupted command left
//! behind before recovery looks at the graph.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_qmp::commands::{
    BlockStream, BlockdevDel, Cont, JobCancel, JobDismiss, JobFinalize, QueryJobs, Stop,
};
use strata_qmp::Qmp;

use crate::error::{Error, Result};
use crate::qemu::{self, disk_device};

/// The prefix of the ids of the jobs strata starts for its own operations.
pub(crate) const JOB_PREFIX: &str = "strata-";

/// Time allowed for one block job or snapshot job.
pub(crate) const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// A stamp that makes file, node and job names unique.
pub(crate) fn stamp() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}{:06}", d.as_secs() % 100_000_000, d.subsec_micros())
}

/// True when `a` and `b` name the same file (compared resolved, when they exist).
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    a == b || canon(a) == canon(b)
}

/// The image files of each of the `n` disks' chains as QEMU has them open,
/// active layer first, from `query-block`.
pub(crate) fn chains(qmp: &Qmp, n: usize) -> Result<Vec<Vec<PathBuf>>> {
    let blocks = qmp.execute_value("query-block", None)?;
    let list = blocks.as_array().cloned().unwrap_or_default();
    (0..n)
        .map(|i| {
            let prefix = format!("/machine/peripheral/{}/", disk_device(i));
            let block = list
                .iter()
                .find(|b| {
                    b.get("qdev")
                        .and_then(Value::as_str)
                        .is_some_and(|q| q.starts_with(&prefix))
                })
                .ok_or_else(|| Error::Qemu(format!("QEMU reports no disk {}", disk_device(i))))?;
            let mut files = Vec::new();
            let mut image = block.pointer("/inserted/image");
            while let Some(img) = image {
                if let Some(f) = img.get("filename").and_then(Value::as_str) {
                    files.push(PathBuf::from(f));
                }
                image = img.get("backing-image");
            }
            Ok(files)
        })
        .collect()
}

/// The name of the format node QEMU opened on `file`.
pub(crate) fn node_of_file(qmp: &Qmp, file: &Path) -> Result<String> {
    named_nodes(qmp, file)?
        .into_iter()
        .find(|(_, drv)| drv != "file")
        .map(|(n, _)| n)
        .ok_or_else(|| Error::Qemu(format!("QEMU has no node open on '{}'", file.display())))
}

/// (node name, driver) of every node QEMU has open on `file`.
fn named_nodes(qmp: &Qmp, file: &Path) -> Result<Vec<(String, String)>> {
    let nodes = qmp.execute_value("query-named-block-nodes", Some(json!({"flat": true})))?;
    Ok(nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| {
            n.get("file")
                .and_then(Value::as_str)
                .is_some_and(|f| same_file(Path::new(f), file))
        })
        .filter_map(|n| {
            Some((
                n.get("node-name")?.as_str()?.to_string(),
                n.get("drv")?.as_str()?.to_string(),
            ))
        })
        .collect())
}

/// When `file` is a backing layer of one of the running VM's `n` disks, make the
/// image above it skip it: QEMU streams what `file` provides (down to its own
/// backing file) into that image with `block-stream` while the guest runs, then
/// points it at what lies below `file`. The image shows the same content
/// throughout, and its link changes only once the copied data is on disk (see
/// [`flushed_pause`]), so a kill at any point loses nothing. Returns whether it
/// streamed.
/// Refused when `file` is a disk's active layer.
pub(crate) fn stream_past(qmp: &Qmp, n: usize, file: &Path) -> Result<bool> {
    for chain in chains(qmp, n)? {
        let Some(k) = chain.iter().position(|x| same_file(x, file)) else {
            continue;
        };
        if k == 0 {
            return Err(Error::State(format!(
                "'{}' is the active layer of a running disk; it cannot be streamed past",
                file.display()
            )));
        }
        let above = node_of_file(qmp, &chain[k - 1])?;
        let base = chain.get(k + 1).map(|b| node_of_file(qmp, b)).transpose()?;
        let job = format!("{JOB_PREFIX}stream-{}", stamp());
        qmp.execute(&BlockStream {
            job_id: job.clone(),
            device: above,
            base_node: base,
            auto_finalize: Some(false),
            auto_dismiss: Some(false),
        })?;
        qmp.wait_job_status(&job, "pending", JOB_TIMEOUT)?;
        flushed_pause(qmp, || {
            qmp.execute(&JobFinalize { id: job.clone() })?;
            Ok(qmp.finish_job("block-stream", &job, JOB_TIMEOUT)?)
        })?;
        release(qmp, file);
        return Ok(true);
    }
    Ok(false)
}

/// Run `switch` (a change of QEMU's block graph that makes an image's newly
/// copied data the only copy) with the guest paused, after QEMU wrote every
/// node's cached metadata to disk (`stop` flushes all block nodes), and resume
/// the guest after it when it ran. Without the flush a QEMU killed after the
/// switch would lose the copy's metadata while the old copy is already unlinked.
/// The guest's pause is the time of the flush and the switch.
pub(crate) fn flushed_pause<T>(qmp: &Qmp, switch: impl FnOnce() -> Result<T>) -> Result<T> {
    let was_running = qemu::run_state(qmp)? == "running";
    qmp.execute(&Stop {})?;
    let out = switch();
    if was_running {
        match qmp.execute(&Cont {}) {
            // A QEMU gone after the switch leaves nothing to resume; what the
            // switch did (and recorded) stands.
            Err(e) if !e.is_qemu_exited() && out.is_ok() => return Err(e.into()),
            _ => {}
        }
    }
    out
}

/// Close the nodes QEMU still has open on `file` that nothing uses (nodes named
/// on the command line or added by strata outlive their place in a chain):
/// format nodes first, then the protocol node. A node still in use stays.
pub(crate) fn release(qmp: &Qmp, file: &Path) {
    let Ok(mut nodes) = named_nodes(qmp, file) else {
        return;
    };
    nodes.sort_by_key(|(_, drv)| drv == "file");
    for (node_name, _) in nodes {
        let _ = qmp.execute(&BlockdevDel { node_name });
    }
}

/// Let the jobs an interrupted strata command started come to rest: a running
/// one is waited for, a commit waiting for its pivot is cancelled (its base
/// holds only copies of what the top shows; recovery merges again), a stream
/// waiting to be finalized is finalized after a flush, a concluded one is
/// dismissed. Jobs strata did not start are left alone.
pub(crate) fn settle_jobs(qmp: &Qmp) -> Result<()> {
    let deadline = Instant::now() + JOB_TIMEOUT;
    loop {
        let mine: Vec<_> = qmp
            .execute(&QueryJobs {})?
            .into_iter()
            .filter(|j| j.id.starts_with(JOB_PREFIX))
            .collect();
        if mine.is_empty() {
            return Ok(());
        }
        for j in &mine {
            let id = j.id.clone();
            match j.status.as_str() {
                "concluded" => {
                    let _ = qmp.execute(&JobDismiss { id });
                }
                "ready" => {
                    let _ = qmp.execute(&JobCancel { id });
                }
                "pending" => {
                    flushed_pause(qmp, || Ok(qmp.execute(&JobFinalize { id })?))?;
                }
                _ => {}
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Qemu(format!(
                "block job '{}' left by an interrupted command did not finish in {JOB_TIMEOUT:?}",
                mine[0].id
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
