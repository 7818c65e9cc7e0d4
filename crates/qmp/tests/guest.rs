//! The QMP and guest-agent clients against a real QEMU 10 running the project's
//! test guest (built by scripts/build-test-guest.sh; cached). Two boots: one
//! guest exercised end to end, and one QEMU killed while the clients wait.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use strata_qmp::agent::FreezeStatus;
use strata_qmp::commands::{
    blockdev_snapshot_action, BlockCommit, BlockdevAdd, BlockdevCreate, BlockdevDel, Cont,
    JobComplete, JobDismiss, Migrate, MigrateSetCapabilities, MigrationCapability, QueryJobs,
    QueryMigrate, QueryStatus, SnapshotDelete, SnapshotLoad, SnapshotSave, Transaction,
};
use strata_qmp::testing::{TestGuest, TestVm};
use strata_qmp::{Agent, Command, ErrorKind, Qmp};

/// Time allowed for the guest's agent to come up (5-15 s under loaded TCG).
const AGENT_TIMEOUT: Duration = Duration::from_secs(90);

struct Booted {
    vm: TestVm,
    qmp: Qmp,
    _dir: tempfile::TempDir,
}

/// Boot the test guest on a copy of its data disk and connect QMP.
fn boot() -> Booted {
    let guest = TestGuest::ensure().unwrap_or_else(|e| panic!("the test guest is needed: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let disk: PathBuf = dir.path().join("data.qcow2");
    guest.copy_data_disk(&disk).unwrap();
    let vm = TestVm::launch(&guest, dir.path(), &[disk]).unwrap();
    let qmp = vm
        .qmp()
        .unwrap_or_else(|e| panic!("{e}\nQEMU said:\n{}", vm.qemu_log()));
    Booted { vm, qmp, _dir: dir }
}

fn agent_of(b: &Booted) -> Agent {
    b.vm.agent(&b.qmp, AGENT_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "{e}\nguest console:\n{}\nQEMU said:\n{}",
            b.vm.serial_log(),
            b.vm.qemu_log()
        )
    })
}

#[test]
fn qmp_and_agent_drive_a_booted_guest() {
    let b = boot();
    let qmp = &b.qmp;
    assert!(
        qmp.version().is_some_and(|v| v.major >= 10),
        "{:?}",
        qmp.version()
    );
    let st = qmp.execute(&QueryStatus {}).unwrap();
    assert!(st.running && st.status == "running", "{st:?}");

    qmp_errors_name_the_command(qmp);
    event_waits_time_out(qmp);

    let mut agent = agent_of(&b);
    agent.ping().unwrap();
    guest_exec_returns_output_and_exit_code(&mut agent);
    files_written_through_the_agent_read_back(&mut agent);
    fsfreeze_freezes_and_thaws_data(&mut agent);
    agent_calls_time_out_and_the_next_call_resyncs(&mut agent);
    an_agent_restart_is_survived_by_a_resync(qmp, &mut agent);
    an_external_snapshot_and_its_active_commit_move_guest_writes(qmp, &mut agent, &b.vm.dir);
    snapshot_jobs_conclude_and_failures_name_the_job(qmp);
    memory_saved_by_migration_to_a_file_and_the_source_resumes(qmp, &b.vm.dir);
    // The agent answers again after the snapshot jobs and the save, once resynced.
    agent.sync(Duration::from_secs(30)).unwrap();
    agent.ping().unwrap();
}

fn memory_saved_by_migration_to_a_file_and_the_source_resumes(qmp: &Qmp, dir: &Path) {
    let state = dir.join("memory.state");
    qmp.execute(&MigrateSetCapabilities {
        // MIGRATION events are sent only with the events capability on.
        capabilities: ["mapped-ram", "events"]
            .map(|c| MigrationCapability {
                capability: c.into(),
                state: true,
            })
            .to_vec(),
    })
    .unwrap();
    qmp.execute(&Migrate {
        uri: format!("file:{}", state.display()),
    })
    .unwrap();
    qmp.wait_event("MIGRATION completed", Duration::from_secs(60), |e| {
        e.name == "MIGRATION" && e.str("status") == Some("completed")
    })
    .unwrap();
    let info = qmp.execute(&QueryMigrate {}).unwrap();
    assert_eq!(info.status.as_deref(), Some("completed"), "{info:?}");
    // QEMU sends the completed event before it moves the run state on: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = qmp.execute(&QueryStatus {}).unwrap();
        if st.status == "postmigrate" || std::time::Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!((st.running, st.status.as_str()), (false, "postmigrate"));
    // 256 MiB of guest memory went somewhere: mapped-ram writes it at fixed
    // offsets, so the file is at least that long (sparse where pages are zero).
    let len = std::fs::metadata(&state).unwrap().len();
    assert!(len >= 256 << 20, "state file of {len} bytes");
    qmp.execute(&Cont {}).unwrap();
    assert!(qmp.execute(&QueryStatus {}).unwrap().running);
}

fn qmp_errors_name_the_command(qmp: &Qmp) {
    let e = qmp
        .execute_value(
            "blockdev-del",
            Some(serde_json::json!({"node-name": "no-such-node"})),
        )
        .unwrap_err();
    match &e.kind {
        ErrorKind::CommandFailed {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "blockdev-del");
            assert_eq!(class, "GenericError");
            assert!(desc.contains("no-such-node"), "{desc}");
        }
        other => panic!("expected CommandFailed, got {other:?}"),
    }
    assert!(e.to_string().starts_with("QMP blockdev-del: "), "{e}");
    // A typed command's failure names it too; an unknown command is QEMU's
    // CommandNotFound.
    let e = qmp
        .execute(&JobDismiss {
            id: "no-such-job".into(),
        })
        .unwrap_err();
    assert!(e.to_string().contains("job-dismiss"), "{e}");
    let e = qmp.execute_value("no-such-command", None).unwrap_err();
    assert!(
        matches!(&e.kind, ErrorKind::CommandFailed { class, .. } if class == "CommandNotFound"),
        "{e}"
    );
    // The connection is still usable after errors.
    assert!(qmp.execute(&QueryStatus {}).unwrap().running);
}

/// Wait for an event QEMU never sends; the error and how long the wait took.
fn wait_for_unsent_event(
    qmp: &Qmp,
    name: &str,
    timeout: Duration,
) -> (strata_qmp::Error, Duration) {
    let t = Instant::now();
    let e = qmp.wait_event_named(name, timeout).unwrap_err();
    assert!(e.to_string().contains(name), "{e}");
    (e, t.elapsed())
}

fn event_waits_time_out(qmp: &Qmp) {
    let (e, took) = wait_for_unsent_event(qmp, "NO_SUCH_EVENT", Duration::from_millis(300));
    assert!(e.is_timeout(), "{e}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

fn guest_exec_returns_output_and_exit_code(agent: &mut Agent) {
    let out = agent
        .exec("/bin/echo", &["hi"], Duration::from_secs(30))
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(out.stdout, b"hi\n");
    assert!(out.stderr.is_empty());
    let out = agent
        .exec(
            "/bin/sh",
            &["-c", "echo oops >&2; exit 3"],
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.stderr, b"oops\n");
    // A missing program is the agent's error, naming guest-exec.
    let e = agent
        .exec("/no/such/program", &[], Duration::from_secs(30))
        .unwrap_err();
    assert!(
        matches!(e.kind, ErrorKind::CommandFailed { ref command, .. } if command == "guest-exec"),
        "{e}"
    );
}

fn files_written_through_the_agent_read_back(agent: &mut Agent) {
    // More than one transfer chunk, every byte value.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    agent.write_file("/data/written-by-agent", &data).unwrap();
    assert_eq!(agent.read_file("/data/written-by-agent").unwrap(), data);
    // The guest itself sees the same bytes on the ext4 disk.
    let out = agent
        .exec(
            "/bin/sh",
            &[
                "-c",
                "sync; wc -c < /data/written-by-agent; grep -c ' /data ext4 ' /proc/mounts",
            ],
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "300000\n1\n");
    let e = agent.read_file("/data/no-such-file").unwrap_err();
    assert!(e.to_string().contains("guest-file-open"), "{e}");
}

fn fsfreeze_freezes_and_thaws_data(agent: &mut Agent) {
    assert_eq!(agent.fsfreeze_status().unwrap(), FreezeStatus::Thawed);
    let frozen = agent.fsfreeze_freeze().unwrap();
    let status = agent.fsfreeze_status();
    // Thaw before judging, so a failed check cannot leave the guest frozen.
    let thawed = agent.fsfreeze_thaw();
    assert!(frozen >= 1, "froze {frozen} filesystems; /data is ext4");
    assert_eq!(status.unwrap(), FreezeStatus::Frozen);
    assert_eq!(thawed.unwrap(), frozen);
    assert_eq!(agent.fsfreeze_status().unwrap(), FreezeStatus::Thawed);
}

fn agent_calls_time_out_and_the_next_call_resyncs(agent: &mut Agent) {
    let t = Instant::now();
    let e = agent
        .exec("/bin/sleep", &["3"], Duration::from_millis(400))
        .unwrap_err();
    assert!(e.is_timeout(), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // A reply timeout on the channel itself: the late reply must not be taken
    // for the next command's.
    let e = agent
        .execute_timeout(&strata_qmp::agent::GuestPing {}, Duration::from_nanos(1))
        .unwrap_err();
    assert!(e.is_timeout(), "{e}");
    agent.ping().unwrap();
    let out = agent
        .exec("/bin/echo", &["after"], Duration::from_secs(30))
        .unwrap();
    assert_eq!(out.stdout, b"after\n");
}

fn an_agent_restart_is_survived_by_a_resync(qmp: &Qmp, agent: &mut Agent) {
    // Events of the first start are not the ones awaited below.
    qmp.take_events();
    // The guest's init starts the agent again a second after it dies.
    agent.exec_start("/bin/killall", &["qemu-ga"]).unwrap();
    let port = strata_qmp::testing::AGENT_PORT;
    qmp.wait_vserport(port, false, Duration::from_secs(30))
        .unwrap();
    qmp.wait_vserport(port, true, Duration::from_secs(60))
        .unwrap();
    agent.sync(Duration::from_secs(30)).unwrap();
    let out = agent
        .exec("/bin/echo", &["again"], Duration::from_secs(30))
        .unwrap();
    assert_eq!(out.stdout, b"again\n");
}

/// The node under guest disk `qdev` (query-block's `inserted` member).
fn inserted(qmp: &Qmp, qdev: &str) -> serde_json::Value {
    let blocks = qmp.execute_value("query-block", None).unwrap();
    let dev = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"].as_str().is_some_and(|q| q.contains(qdev)))
        .unwrap_or_else(|| panic!("no {qdev} in {blocks}"));
    dev["inserted"].clone()
}

fn file_contains(path: &Path, needle: &[u8]) -> bool {
    std::fs::read(path)
        .unwrap()
        .windows(needle.len())
        .any(|w| w == needle)
}

fn an_external_snapshot_and_its_active_commit_move_guest_writes(
    qmp: &Qmp,
    agent: &mut Agent,
    dir: &Path,
) {
    let t = Duration::from_secs(120);
    let base = dir.join("data.qcow2");
    let overlay = dir.join("overlay.qcow2");
    let size = inserted(qmp, "vdisk0")["image"]["virtual-size"]
        .as_u64()
        .unwrap();
    // The overlay is made by QEMU's own jobs: the file, then qcow2 on it.
    let create_file = BlockdevCreate {
        job_id: "create-file".into(),
        options: json!({"driver": "file", "filename": overlay, "size": 0}),
    };
    qmp.run_job(&create_file, "create-file", t).unwrap();
    qmp.execute(&BlockdevAdd(
        json!({"driver": "file", "filename": overlay, "node-name": "ov-file"}),
    ))
    .unwrap();
    let create_qcow2 = BlockdevCreate {
        job_id: "create-qcow2".into(),
        options: json!({"driver": "qcow2", "file": "ov-file", "size": size,
                        "backing-file": base, "backing-fmt": "qcow2"}),
    };
    qmp.run_job(&create_qcow2, "create-qcow2", t).unwrap();
    qmp.execute(&BlockdevAdd(
        json!({"driver": "qcow2", "node-name": "ov", "file": "ov-file", "backing": null}),
    ))
    .unwrap();
    qmp.execute(&Transaction {
        actions: vec![blockdev_snapshot_action("disk0", "ov")],
    })
    .unwrap();
    assert_eq!(inserted(qmp, "vdisk0")["node-name"], "ov");

    // A guest write lands in the overlay only.
    let marker = b"strata-overlay-marker-5c1e9a";
    agent.write_file("/data/after-snapshot", marker).unwrap();
    let out = agent.exec("/bin/sync", &[], t).unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert!(
        file_contains(&overlay, marker),
        "the write is not in the overlay"
    );
    assert!(
        !file_contains(&base, marker),
        "the write reached the frozen base"
    );

    // Active commit: ready, complete (pivot to the base), conclude, dismiss.
    let commit = BlockCommit {
        job_id: "commit".into(),
        device: "ov".into(),
        auto_dismiss: Some(false),
        ..Default::default()
    };
    qmp.execute(&commit).unwrap();
    qmp.wait_block_job_ready("commit", t).unwrap();
    qmp.execute(&JobComplete {
        id: "commit".into(),
    })
    .unwrap();
    qmp.finish_job(BlockCommit::NAME, "commit", t).unwrap();
    assert_eq!(inserted(qmp, "vdisk0")["node-name"], "disk0");
    qmp.execute(&BlockdevDel {
        node_name: "ov".into(),
    })
    .unwrap();
    qmp.execute(&BlockdevDel {
        node_name: "ov-file".into(),
    })
    .unwrap();
    assert!(
        file_contains(&base, marker),
        "the commit did not reach the base"
    );
    assert_eq!(agent.read_file("/data/after-snapshot").unwrap(), marker);
}

fn snapshot_jobs_conclude_and_failures_name_the_job(qmp: &Qmp) {
    let job_timeout = Duration::from_secs(120);
    let devices = vec!["disk0".to_string()];
    let save = SnapshotSave {
        job_id: "save1".into(),
        tag: "snap1".into(),
        vmstate: "disk0".into(),
        devices: devices.clone(),
    };
    qmp.run_job(&save, "save1", job_timeout).unwrap();
    assert!(
        qmp.execute(&QueryJobs {}).unwrap().is_empty(),
        "the concluded job is dismissed"
    );
    assert!(
        qmp.execute(&QueryStatus {}).unwrap().running,
        "the guest runs on after the save"
    );

    let load = SnapshotLoad {
        job_id: "load1".into(),
        tag: "no-such-snapshot".into(),
        vmstate: "disk0".into(),
        devices: devices.clone(),
    };
    let e = qmp.run_job(&load, "load1", job_timeout).unwrap_err();
    match &e.kind {
        ErrorKind::JobFailed { job, desc } => {
            assert_eq!(job, "load1");
            assert!(desc.contains("no-such-snapshot"), "{desc}");
        }
        other => panic!("expected JobFailed, got {other:?}"),
    }
    assert!(e.to_string().contains("snapshot-load"), "{e}");
    assert!(
        qmp.execute(&QueryJobs {}).unwrap().is_empty(),
        "the failed job is dismissed"
    );
    // QEMU stops the guest for a load and leaves it stopped when the load
    // fails (even before loading anything); cont resumes it.
    let st = qmp.execute(&QueryStatus {}).unwrap();
    assert_eq!((st.running, st.status.as_str()), (false, "restore-vm"));
    qmp.execute(&Cont {}).unwrap();

    let delete = SnapshotDelete {
        job_id: "delete1".into(),
        tag: "snap1".into(),
        devices,
    };
    qmp.run_job(&delete, "delete1", job_timeout).unwrap();
    let st = qmp.execute(&QueryStatus {}).unwrap();
    assert!(
        st.running,
        "the guest stopped after the snapshot jobs: {st:?}"
    );
}

#[test]
fn killing_qemu_ends_waits_promptly_with_qemu_exited() {
    let b = boot();
    let qmp = &b.qmp;
    // The agent is not up yet (the guest is still booting): a connect waits in
    // its sync loop and must end when QEMU dies, not at its timeout.
    let killer = b.vm.killer();
    let agent_socket = b.vm.agent_socket();
    let (started, agent_started) = std::sync::mpsc::channel();
    let agent_wait = std::thread::spawn(move || {
        started.send(()).unwrap();
        let t = Instant::now();
        let r = Agent::connect(&agent_socket, Duration::from_secs(120));
        (r.err(), t.elapsed())
    });
    std::thread::spawn(move || {
        // Kill once the agent's connect is surely under way (a connect after
        // the kill would find the dead socket and retry until its timeout).
        agent_started.recv().unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        killer.kill();
    });
    let (e, took) = wait_for_unsent_event(qmp, "NEVER_SENT", Duration::from_secs(120));
    assert!(e.is_qemu_exited(), "{e}");
    assert!(took < Duration::from_secs(10), "QemuExited after {took:?}");

    // Commands after the exit name themselves.
    let e = qmp.execute(&QueryStatus {}).unwrap_err();
    assert!(e.is_qemu_exited(), "{e}");
    assert!(e.to_string().contains("query-status"), "{e}");

    let (agent_err, agent_took) = agent_wait.join().unwrap();
    let agent_err = agent_err.expect("the agent cannot answer in a killed QEMU");
    assert!(agent_err.is_qemu_exited(), "{agent_err}");
    assert!(
        agent_took < Duration::from_secs(10),
        "agent QemuExited after {agent_took:?}"
    );
}
