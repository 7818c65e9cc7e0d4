//! Real `strata` processes SIGKILLed at random moments. A kill loses nothing the
//! process had written (the page cache keeps it), so what a kill leaves is exactly
//! what the order of the writes leaves.
//!
//! For each operation the uncut run is timed first (median of three); each kill
//! then lands at a seeded random fraction of that time, one in each n-th of the run
//! (so the first kill lands in its first n-th, the last one in its last). After
//! every kill:
//! - `qemu-img check` of every qcow2 file involved exits 0 (clean) or 3 (leaks
//!   only), never 1 or 2; but for an image the cut left marked dirty (an internal
//!   snapshot operation on a version 3 image changes refcounts and COPIED flags in
//!   place, as QEMU does, under the dirty bit): QEMU's next read-write open (a
//!   `qemu-io` here) repairs it, after which check exits 0 and every view is still
//!   the view before or after;
//! - the files the operation must not write are unchanged to the byte;
//! - every guest view, read by `qemu-img convert -O raw`, is the view before or the
//!   view after the operation, whole, except where the operation's contract allows
//!   a mix (said at each case).
//!
//! The server case kills `strata nbd serve` under a qemu-io writer, at fractions of
//! the writer's progress: every write whose flush the client saw acknowledged is in
//! the image.
//!
//! `STRATA_KILL_LOOPS` sets the kills per operation (default 15), `STRATA_KILL_SEED`
//! the seed (each operation derives its own stream from it).

mod common;

use common::{io, ok, run, STRATA};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECTOR: usize = 512;
const MIB: u64 = 1 << 20;

/// Kills per operation.
fn kills_per_op() -> usize {
    std::env::var("STRATA_KILL_LOOPS")
        .map(|v| v.parse().expect("STRATA_KILL_LOOPS must be a count"))
        .unwrap_or(15)
}

/// The seed of one operation's stream of kill moments.
fn seed(name: &str) -> u64 {
    let base = std::env::var("STRATA_KILL_SEED")
        .map(|v| v.parse().expect("STRATA_KILL_SEED must be a number"))
        .unwrap_or(0x5eed_0fc0_ffee);
    name.bytes().fold(base, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// splitmix64: deterministic, so a failing kill reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// qemu-io commands writing, over the first `size` bytes: first `compressed`
/// distinct whole clusters of `cluster` bytes compressed (QEMU writes compressed
/// only into unallocated clusters), then `count` scattered extents (512-byte
/// aligned, up to `max_len` long) with patterns from `pattern` on, one in eight a
/// write of zeroes.
fn scatter(
    rng: &mut Rng,
    size: u64,
    count: usize,
    max_len: u64,
    pattern: u8,
    compressed: usize,
    cluster: u64,
) -> Vec<String> {
    let mut cmds = Vec::new();
    let clusters = size / cluster;
    let first = rng.below(clusters);
    for i in 0..compressed as u64 {
        let off = (first + i * 7919) % clusters * cluster;
        let p = pattern.wrapping_add(0x80 + i as u8);
        cmds.push(format!("write -c -P {p} {off} {cluster}"));
    }
    for i in 0..count {
        let len = (1 + rng.below(max_len / 512)) * 512;
        let off = rng.below((size - len) / 512 + 1) * 512;
        if rng.below(8) == 0 {
            cmds.push(format!("write -z {off} {len}"));
        } else {
            let p = pattern.wrapping_add(i as u8) | 1;
            cmds.push(format!("write -P {p} {off} {len}"));
        }
    }
    cmds
}

fn create(dir: &Path, name: &str, opts: &str, backing: Option<&str>, size: u64) {
    let size = size.to_string();
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        a.extend(["-o", opts]);
    }
    if let Some(b) = backing {
        a.extend(["-b", b, "-F", "qcow2"]);
    }
    a.extend([name, &size]);
    ok(dir, "qemu-img", &a);
}

const CHAIN_SIZE: u64 = 16 * MIB;

/// base.qcow2 (64 KiB clusters, compressed ones among them) <- mid.qcow2 (4 KiB
/// clusters) <- top.qcow2, each with scattered data and zeroes; other.qcow2 is
/// base with differences (a rebase target).
fn chain(dir: &Path) {
    let mut rng = Rng(7);
    create(dir, "base.qcow2", "", None, CHAIN_SIZE);
    let cmds = scatter(&mut rng, CHAIN_SIZE, 60, 256 << 10, 1, 12, 64 << 10);
    io(dir, "qcow2", "base.qcow2", &cmds);
    create(
        dir,
        "mid.qcow2",
        "cluster_size=4k",
        Some("base.qcow2"),
        CHAIN_SIZE,
    );
    let cmds = scatter(&mut rng, CHAIN_SIZE, 60, 192 << 10, 70, 6, 4 << 10);
    io(dir, "qcow2", "mid.qcow2", &cmds);
    create(dir, "top.qcow2", "", Some("mid.qcow2"), CHAIN_SIZE);
    let cmds = scatter(&mut rng, CHAIN_SIZE, 60, 128 << 10, 140, 0, 64 << 10);
    io(dir, "qcow2", "top.qcow2", &cmds);
    ok(
        dir,
        "qemu-img",
        &["convert", "-O", "qcow2", "base.qcow2", "other.qcow2"],
    );
    let cmds = scatter(&mut rng, CHAIN_SIZE, 30, 128 << 10, 200, 0, 64 << 10);
    io(dir, "qcow2", "other.qcow2", &cmds);
}

/// The chain, and out.qcow2: an existing image of the same size with its own data
/// (the target of `convert -n`).
fn chain_and_target(dir: &Path) {
    chain(dir);
    create(dir, "out.qcow2", "", None, CHAIN_SIZE);
    let cmds = scatter(&mut Rng(11), CHAIN_SIZE, 40, 256 << 10, 30, 0, 64 << 10);
    io(dir, "qcow2", "out.qcow2", &cmds);
}

const SNAP_SIZE: u64 = 32 * MIB;

/// snap.qcow2 (4 KiB clusters, so many L2 tables and refcount blocks; compressed
/// clusters too) with snapshots s1 and s2 taken between rounds of scattered
/// writes, and more writes after s2.
fn snapshots(dir: &Path) {
    let mut rng = Rng(5);
    create(dir, "snap.qcow2", "cluster_size=4k", None, SNAP_SIZE);
    for (round, snap) in [(0u8, Some("s1")), (1, Some("s2")), (2, None)] {
        let cmds = scatter(
            &mut rng,
            SNAP_SIZE,
            120,
            96 << 10,
            1 + round * 80,
            if round == 0 { 48 } else { 0 },
            4 << 10,
        );
        io(dir, "qcow2", "snap.qcow2", &cmds);
        if let Some(s) = snap {
            ok(dir, "qemu-img", &["snapshot", "-c", s, "snap.qcow2"]);
        }
    }
}

/// What a view may be after a kill.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Rule {
    /// The view before, which the operation keeps (the uncut run is held to it too).
    Unchanged,
    /// The view before or the view after, whole; "absent" (a snapshot not there) is a view.
    Whole,
    /// Each sector from the view before or from the view after: the operation's
    /// contract allows the mix (said where it is used).
    Sectors,
    /// The output of an interrupted copy into a new file. qemu-img promises nothing
    /// about it; a user expects that it is refused or reads as an incomplete copy
    /// (each sector the source's or zero, never foreign data), that a qcow2 one
    /// qemu-img can open checks clean or leaks-only, and that running the same
    /// command again makes the whole copy.
    NewOutput,
    /// A shrink: QEMU, and strata with it, drops the clusters past the new end
    /// before it writes the new size, so a kill between leaves the old size with a
    /// tail that reads partly as zeroes. The data the shrink keeps is whole, and the
    /// user asked to lose the rest.
    Shrink,
}

/// A guest view: a file (or one of its snapshots) read as raw.
struct View {
    file: &'static str,
    fmt: &'static str,
    snapshot: Option<&'static str>,
    /// Read the snapshot by applying it to a copy (at its own size) rather than
    /// through `convert -l`, which clips it to the image's current size.
    apply: bool,
    rule: Rule,
}

fn view(file: &'static str, rule: Rule) -> View {
    View {
        file,
        fmt: "qcow2",
        snapshot: None,
        apply: false,
        rule,
    }
}

fn snap_view(snapshot: &'static str, rule: Rule) -> View {
    View {
        snapshot: Some(snapshot),
        ..view("snap.qcow2", rule)
    }
}

/// A view as read: one hash per sector, or qemu-img's refusal to read it.
#[derive(Clone, PartialEq, Debug)]
enum Seen {
    Data(Vec<u64>),
    Absent(String),
}

fn sector_hash(s: &[u8]) -> u64 {
    s.chunks(8).fold(0xcbf2_9ce4_8422_2325u64, |h, w| {
        let w = u64::from_le_bytes(w.try_into().unwrap());
        (h ^ w).wrapping_mul(0x0100_0000_01b3).rotate_left(29)
    })
}

fn zero_sector() -> u64 {
    sector_hash(&[0; SECTOR])
}

/// Read a view through qemu-img into `scratch` (a file outside the image directory).
fn read_raw(dir: &Path, v: &View, scratch: &Path) -> Result<Vec<u8>, String> {
    let out = scratch.to_str().unwrap();
    let applied = scratch.with_extension("applied");
    let mut file = v.file.to_string();
    let mut a = vec!["convert", "-U", "-f", v.fmt];
    let l;
    match v.snapshot {
        Some(s) if v.apply => {
            std::fs::copy(dir.join(v.file), &applied).unwrap();
            file = applied.to_str().unwrap().to_string();
            let o = run(dir, "qemu-img", &["snapshot", "-a", s, &file]);
            if !o.status.success() {
                let _ = std::fs::remove_file(&applied);
                return Err(String::from_utf8_lossy(&o.stderr).into_owned());
            }
        }
        Some(s) => {
            l = format!("snapshot.name={s}");
            a.extend(["-l", &l]);
        }
        None => {}
    }
    a.extend(["-O", "raw", &file, out]);
    let o = run(dir, "qemu-img", &a);
    let _ = std::fs::remove_file(&applied);
    assert!(
        o.status.code().is_some(),
        "qemu-img convert of {} died: {:?}",
        v.file,
        o.status
    );
    let r = if o.status.success() {
        Ok(std::fs::read(scratch).unwrap())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let _ = std::fs::remove_file(scratch);
    r
}

fn read_view(dir: &Path, v: &View, scratch: &Path) -> Seen {
    match read_raw(dir, v, scratch) {
        Ok(d) => Seen::Data(d.chunks(SECTOR).map(sector_hash).collect()),
        Err(e) => Seen::Absent(e),
    }
}

/// `qemu-img check`'s exit code and output.
fn check(dir: &Path, file: &str) -> (i32, String) {
    let o = run(dir, "qemu-img", &["check", "-f", "qcow2", file]);
    let code = o
        .status
        .code()
        .unwrap_or_else(|| panic!("qemu-img check {file} died: {:?}", o.status));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (code, text)
}

/// Whether the qcow2 header of `path` has the dirty bit (incompatible feature
/// bit 0, version 3 headers only).
fn is_dirty(path: &Path) -> bool {
    let h = std::fs::read(path).unwrap_or_default();
    h.len() >= 80 && u32::from_be_bytes(h[4..8].try_into().unwrap()) >= 3 && h[79] & 1 == 1
}

/// Open `file` read-write with QEMU (`qemu-io`), which repairs a dirty image as
/// it opens it, as the next VM start or qemu-img command would.
fn repair_on_open(dir: &Path, file: &str, ctx: &str) {
    let o = run(dir, "qemu-io", &["-f", "qcow2", "-c", "quit", file]);
    assert!(
        o.status.success(),
        "{ctx}: qemu-io could not open dirty {file}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn file_hash(path: &Path) -> Option<u64> {
    let d = std::fs::read(path).ok()?;
    Some(d.chunks(SECTOR).fold(d.len() as u64, |h, s| {
        let mut p = [0u8; SECTOR];
        p[..s.len()].copy_from_slice(s);
        (h ^ sector_hash(&p)).wrapping_mul(0x0100_0000_01b3)
    }))
}

/// The files of a directory, by name.
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// A fresh copy of `pristine` at `to`.
fn fresh(pristine: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for f in files(pristine) {
        std::fs::copy(pristine.join(&f), to.join(&f)).unwrap();
    }
}

/// One operation under the kill loop.
struct Op {
    name: &'static str,
    /// The arguments after `strata img`.
    args: &'static [&'static str],
    /// qcow2 files `qemu-img check` must call clean or leaks-only after a kill.
    checked: &'static [&'static str],
    /// Files the operation must not write.
    untouched: &'static [&'static str],
    views: Vec<View>,
}

/// How one view came out over the kills.
#[derive(Default)]
struct Tally {
    before: usize,
    after: usize,
    mixed: usize,
    refused: usize,
}

/// Check one view after a kill against its states before and after; `ctx` names the kill.
fn judge(v: &View, before: &Seen, after: &Seen, seen: &Seen, tally: &mut Tally, ctx: &str) {
    let what = match v.snapshot {
        Some(s) => format!("snapshot {s} of {}", v.file),
        None => v.file.to_string(),
    };
    if seen == before {
        tally.before += 1;
        return;
    }
    assert!(
        v.rule != Rule::Unchanged,
        "{ctx}: the view of {what} changed ({})",
        describe(seen)
    );
    if seen == after {
        tally.after += 1;
        return;
    }
    let (b, a) = (sectors(before), sectors(after));
    let s = match (v.rule, seen) {
        (Rule::NewOutput, Seen::Absent(_)) => {
            tally.refused += 1;
            return;
        }
        (Rule::Sectors | Rule::NewOutput | Rule::Shrink, Seen::Data(s)) => s,
        _ => panic!(
            "{ctx}: {what} is neither the view before nor the view after: {}; against before: {}; against after: {}",
            describe(seen),
            diff(sectors(seen), b),
            diff(sectors(seen), a)
        ),
    };
    let bad = match v.rule {
        Rule::Sectors => {
            assert_eq!(s.len(), b.len(), "{ctx}: {what} changed size");
            (0..s.len()).find(|&i| s[i] != b[i] && s[i] != a[i])
        }
        Rule::Shrink => {
            assert_eq!(s.len(), b.len(), "{ctx}: {what} is neither size");
            let zero = zero_sector();
            (0..s.len()).find(|&i| s[i] != b[i] && (i < a.len() || s[i] != zero))
        }
        _ => {
            // A copy that has not finished: sectors not yet written read as zero.
            assert!(
                s.len() <= a.len(),
                "{ctx}: {what} is longer than its source"
            );
            let zero = zero_sector();
            (0..s.len()).find(|&i| s[i] != a[i] && s[i] != zero)
        }
    };
    if let Some(i) = bad {
        panic!(
            "{ctx}: sector {i} (byte {}) of {what} is from neither state ({:?})",
            i * SECTOR,
            v.rule
        );
    }
    tally.mixed += 1;
}

fn sectors(s: &Seen) -> &[u64] {
    match s {
        Seen::Data(d) => d,
        Seen::Absent(_) => &[],
    }
}

/// Where two views differ, for failure messages.
fn diff(s: &[u64], other: &[u64]) -> String {
    let zero = zero_sector();
    let differ: Vec<usize> = (0..s.len().min(other.len()))
        .filter(|&i| s[i] != other[i])
        .collect();
    let zeroed = differ.iter().filter(|&&i| s[i] == zero).count();
    format!(
        "{} of {} sectors differ ({zeroed} of them read zero), the first at byte {:?}, the last at {:?}",
        differ.len(),
        other.len(),
        differ.first().map(|i| i * SECTOR),
        differ.last().map(|i| i * SECTOR)
    )
}

fn describe(s: &Seen) -> String {
    match s {
        Seen::Data(d) => format!("{} sectors", d.len()),
        Seen::Absent(e) => format!("unreadable: {}", e.trim()),
    }
}

/// Start `strata img ARGS` in `dir`.
fn spawn_img(dir: &Path, args: &[&str]) -> Child {
    Command::new(STRATA)
        .arg("img")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start strata")
}

/// Kill `child` with SIGKILL at `start + delay`; true if it was still running (the
/// kill landed mid-run). A run that ended by itself must have succeeded.
fn kill_at(mut child: Child, start: Instant, delay: Duration, ctx: &str) -> bool {
    if let Some(rest) = (start + delay).checked_duration_since(Instant::now()) {
        std::thread::sleep(rest);
    }
    let _ = child.kill();
    let o = child.wait_with_output().unwrap();
    if o.status.signal() == Some(libc::SIGKILL) {
        return true;
    }
    assert!(
        o.status.success(),
        "{ctx}: the run failed by itself: {:?} {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    false
}

/// The n kill moments, as fractions of the uncut run: one in each n-th of it.
fn moments(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|i| (i as f64 + rng.unit()) / n as f64).collect()
}

/// What one kill left in `work`: views first (each against its states before and
/// after), then the files that must be untouched, then `qemu-img check`; for a new
/// output, the command run again. Returns how many checks found leaks only.
fn after_kill(
    op: &Op,
    pristine: &Path,
    work: &Path,
    scratch: &Path,
    states: &[(Seen, Seen)],
    tallies: &mut [Tally],
    ctx: &str,
) -> usize {
    for (i, v) in op.views.iter().enumerate() {
        let seen = read_view(work, v, scratch);
        judge(v, &states[i].0, &states[i].1, &seen, &mut tallies[i], ctx);
        if v.rule == Rule::NewOutput && v.fmt == "qcow2" && work.join(v.file).exists() {
            let (code, text) = check(work, v.file);
            match seen {
                Seen::Data(_) => assert!(
                    code == 0 || code == 3,
                    "{ctx}: qemu-img check {} exits {code}: {text}",
                    v.file
                ),
                Seen::Absent(_) => assert_eq!(code, 1, "{ctx}: {}: {text}", v.file),
            }
        }
    }
    for f in op.untouched {
        assert_eq!(
            file_hash(&work.join(f)),
            file_hash(&pristine.join(f)),
            "{ctx}: {f} was written"
        );
    }
    let mut leaks = 0;
    for f in op.checked {
        let (mut code, mut text) = check(work, f);
        if code == 2 && is_dirty(&work.join(f)) {
            repair_on_open(work, f, ctx);
            (code, text) = check(work, f);
            assert_eq!(code, 0, "{ctx}: {f} after QEMU's repair on open: {text}");
            // The repair must keep every view whole; the kill was counted once above.
            for (i, v) in op.views.iter().enumerate() {
                let seen = read_view(work, v, scratch);
                judge(
                    v,
                    &states[i].0,
                    &states[i].1,
                    &seen,
                    &mut Tally::default(),
                    ctx,
                );
            }
        }
        let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("ERROR")).collect();
        assert!(
            code == 0 || code == 3,
            "{ctx}: qemu-img check {f} exits {code}: {} ERROR lines, the first: {:?}\n{}",
            errors.len(),
            errors.iter().take(3).collect::<Vec<_>>(),
            text.lines()
                .filter(|l| !l.starts_with("ERROR") && !l.starts_with("Leaked"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        leaks += usize::from(code == 3);
    }
    if op.views.iter().any(|v| v.rule == Rule::NewOutput) {
        // The user runs the command again: it must make the whole copy.
        let o = spawn_img(work, op.args).wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "{ctx}: the run after the kill failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        for (i, v) in op.views.iter().enumerate() {
            let seen = read_view(work, v, scratch);
            assert!(
                seen == states[i].1,
                "{ctx}: the run after the kill left {} {}",
                v.file,
                describe(&seen)
            );
        }
    }
    leaks
}

/// Run `op` uncut three times (timing it, and taking the views after), then kill it
/// `kills_per_op()` times, checking what each kill leaves.
fn kill_loop(setup: fn(&Path), op: Op) {
    let t = tempfile::tempdir().unwrap();
    let pristine = t.path().join("pristine");
    std::fs::create_dir_all(&pristine).unwrap();
    setup(&pristine);
    let scratch = t.path().join("view.raw");
    let work = t.path().join("work");
    let hashes = |dir: &Path| -> Vec<Option<u64>> {
        files(&pristine)
            .iter()
            .map(|f| file_hash(&dir.join(f)))
            .collect()
    };
    let original = hashes(&pristine);
    let before: Vec<Seen> = op
        .views
        .iter()
        .map(|v| read_view(&pristine, v, &scratch))
        .collect();

    let mut times = Vec::new();
    let mut after = Vec::new();
    for _ in 0..3 {
        fresh(&pristine, &work);
        let start = Instant::now();
        let o = spawn_img(&work, op.args).wait_with_output().unwrap();
        times.push(start.elapsed());
        assert!(
            o.status.success(),
            "{}: uncut run failed: {}",
            op.name,
            String::from_utf8_lossy(&o.stderr)
        );
        for f in op.checked {
            let (code, text) = check(&work, f);
            assert_eq!(code, 0, "{}: uncut run left {f}: {text}", op.name);
        }
        let seen: Vec<Seen> = op
            .views
            .iter()
            .map(|v| read_view(&work, v, &scratch))
            .collect();
        for (i, v) in op.views.iter().enumerate() {
            match v.rule {
                Rule::Unchanged => assert!(
                    seen[i] == before[i],
                    "{}: uncut run changed {}",
                    op.name,
                    v.file
                ),
                Rule::NewOutput => assert!(
                    matches!(seen[i], Seen::Data(_)),
                    "{}: uncut run left no {}",
                    op.name,
                    v.file
                ),
                _ => {}
            }
        }
        assert!(
            after.is_empty() || after == seen,
            "{}: uncut runs differ",
            op.name
        );
        after = seen;
    }
    times.sort();
    let uncut = times[1];
    let states: Vec<(Seen, Seen)> = before.into_iter().zip(after).collect();

    let n = kills_per_op();
    let seed = seed(op.name);
    let mut rng = Rng(seed);
    let (mut mid, mut mid_changed) = (0, 0);
    let mut tallies: Vec<Tally> = op.views.iter().map(|_| Tally::default()).collect();
    let mut leaks = 0;
    let mut failures = Vec::new();
    // A loaded machine can run the operation faster or slower than the timed runs:
    // when no kill of a round landed while the files were changing, more rounds
    // follow (at most three), so a pass always rests on kills inside the operation.
    // Those rounds aim at the run's second half and beyond (its writes come after
    // the reads, and a loaded run outlasts the timed one), a wider span each time.
    let mut total = 0;
    for round in 0..4 {
        if round > 0 && (mid_changed > 0 || n < 4) {
            break;
        }
        let (from, span) = if round == 0 {
            (0.0, 1.0)
        } else {
            (0.5, 0.5 + 0.25 * round as f64)
        };
        for frac in moments(&mut rng, n).into_iter().map(|f| from + f * span) {
            let k = total;
            total += 1;
            let delay = uncut.mul_f64(frac);
            let ctx = format!(
                "{}: kill {k} at {delay:?} ({frac:.3} of {uncut:?}; seed {seed:#x})",
                op.name
            );
            fresh(&pristine, &work);
            let start = Instant::now();
            let child = spawn_img(&work, op.args);
            let landed = kill_at(child, start, delay, &ctx);
            if landed {
                mid += 1;
                let changed = hashes(&work) != original || files(&work) != files(&pristine);
                mid_changed += usize::from(changed);
            }
            // Every kill is judged, so a failure report says how many kills fail.
            let judged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                after_kill(&op, &pristine, &work, &scratch, &states, &mut tallies, &ctx)
            }));
            match judged {
                Ok(l) => leaks += l,
                Err(e) => failures.push(
                    e.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default(),
                ),
            }
        }
    }
    let views: Vec<String> = op
        .views
        .iter()
        .zip(&tallies)
        .filter(|(v, _)| v.rule != Rule::Unchanged)
        .map(|(v, t)| {
            format!(
                "{}{}: {} before, {} after, {} mixed, {} refused",
                v.file,
                v.snapshot.map(|s| format!("@{s}")).unwrap_or_default(),
                t.before,
                t.after,
                t.mixed,
                t.refused
            )
        })
        .collect();
    println!(
        "kill loop {}: {total} kills, {mid} mid-run ({mid_changed} after files changed), uncut {:.1} ms, {leaks} checks with leaks; {}",
        op.name,
        uncut.as_secs_f64() * 1000.0,
        views.join("; ")
    );

    assert!(
        failures.is_empty(),
        "{}: {} of {total} kills left a wrong state:\n{}",
        op.name,
        failures.len(),
        failures
            .iter()
            .map(|f| f.chars().take(600).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        mid_changed > 0 || n < 4,
        "{}: no kill landed while the files were changing: the loop proved nothing",
        op.name
    );
}

/// The chain's layers: every operation on the chain must leave each checking clean
/// or leaks-only.
const LAYERS: &[&str] = &["base.qcow2", "mid.qcow2", "top.qcow2"];
/// Every file of the chain directory.
const INPUTS: &[&str] = &["base.qcow2", "mid.qcow2", "top.qcow2", "other.qcow2"];

/// `args` under the kill loop, on the chain.
fn on_chain(
    name: &'static str,
    args: &'static [&'static str],
    untouched: &'static [&'static str],
    views: Vec<View>,
) {
    let checked = LAYERS;
    kill_loop(
        chain,
        Op {
            name,
            args,
            checked,
            untouched,
            views,
        },
    );
}

/// `args` under the kill loop, on snap.qcow2 and its snapshots.
fn on_snapshots(name: &'static str, args: &'static [&'static str], views: Vec<View>) {
    kill_loop(
        snapshots,
        Op {
            name,
            args,
            checked: &["snap.qcow2"],
            untouched: &[],
            views,
        },
    );
}

#[test]
fn killed_convert_leaves_its_inputs_untouched() {
    let views = vec![
        view("top.qcow2", Rule::Unchanged),
        view("out.qcow2", Rule::NewOutput),
    ];
    on_chain(
        "convert -O qcow2",
        &["convert", "-O", "qcow2", "top.qcow2", "out.qcow2"],
        INPUTS,
        views,
    );
}

#[test]
fn killed_compressed_convert_leaves_its_inputs_untouched() {
    let views = vec![view("out.qcow2", Rule::NewOutput)];
    on_chain(
        "convert -c -O qcow2",
        &["convert", "-c", "-O", "qcow2", "top.qcow2", "out.qcow2"],
        INPUTS,
        views,
    );
}

#[test]
fn killed_convert_to_raw_leaves_its_inputs_untouched() {
    let views = vec![View {
        fmt: "raw",
        ..view("out.raw", Rule::NewOutput)
    }];
    on_chain(
        "convert -O raw",
        &["convert", "-O", "raw", "top.qcow2", "out.raw"],
        INPUTS,
        views,
    );
}

#[test]
fn killed_convert_into_an_existing_image_leaves_it_valid() {
    // The target is overwritten in place: each sector is its old content or the
    // source's, as with qemu-img (which promises no more).
    let op = Op {
        name: "convert -n",
        args: &["convert", "-n", "-O", "qcow2", "top.qcow2", "out.qcow2"],
        checked: &["base.qcow2", "mid.qcow2", "top.qcow2", "out.qcow2"],
        untouched: INPUTS,
        views: vec![view("out.qcow2", Rule::Sectors)],
    };
    kill_loop(chain_and_target, op);
}

#[test]
fn killed_commit_keeps_the_top_view() {
    // mid.qcow2 is overwritten cluster by cluster: until the commit ends its own
    // view is part old, part committed (other users of it see that, as with
    // qemu-img). The top's view never changes: it is emptied only once mid holds
    // everything.
    let views = vec![
        view("top.qcow2", Rule::Unchanged),
        view("mid.qcow2", Rule::Sectors),
    ];
    on_chain(
        "commit",
        &["commit", "top.qcow2"],
        &["base.qcow2", "other.qcow2"],
        views,
    );
}

#[test]
fn killed_commit_to_a_lower_base_keeps_the_top_view() {
    // -b implies -d: the top and the layer between are not written; the base is
    // part old, part committed while it runs, as above.
    let views = vec![
        view("top.qcow2", Rule::Unchanged),
        view("base.qcow2", Rule::Sectors),
    ];
    on_chain(
        "commit -b",
        &["commit", "-b", "base.qcow2", "top.qcow2"],
        &["mid.qcow2", "top.qcow2", "other.qcow2"],
        views,
    );
}

#[test]
fn killed_intermediate_commit_keeps_the_top_view() {
    // The base is part old, part committed while it runs; the top is relinked to
    // it only once it holds everything; mid.qcow2 is not written.
    let views = vec![
        view("top.qcow2", Rule::Unchanged),
        view("base.qcow2", Rule::Sectors),
    ];
    on_chain(
        "commit --top",
        &["commit", "--top", "mid.qcow2", "top.qcow2"],
        &["mid.qcow2", "other.qcow2"],
        views,
    );
}

#[test]
fn killed_stream_keeps_the_view() {
    let views = vec![view("top.qcow2", Rule::Unchanged)];
    on_chain(
        "stream -b",
        &["stream", "-b", "base.qcow2", "top.qcow2"],
        &["base.qcow2", "mid.qcow2", "other.qcow2"],
        views,
    );
}

#[test]
fn killed_full_stream_keeps_the_view() {
    let views = vec![view("top.qcow2", Rule::Unchanged)];
    on_chain(
        "stream",
        &["stream", "top.qcow2"],
        &["base.qcow2", "mid.qcow2", "other.qcow2"],
        views,
    );
}

#[test]
fn killed_safe_rebase_keeps_the_view() {
    let views = vec![view("top.qcow2", Rule::Unchanged)];
    let args = &["rebase", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"];
    on_chain(
        "rebase -b other",
        args,
        &["base.qcow2", "mid.qcow2", "other.qcow2"],
        views,
    );
}

#[test]
fn killed_shrink_keeps_what_it_keeps() {
    let views = vec![view("base.qcow2", Rule::Shrink)];
    on_chain(
        "resize --shrink",
        &["resize", "--shrink", "base.qcow2", "6M"],
        &["mid.qcow2", "top.qcow2", "other.qcow2"],
        views,
    );
}

#[test]
fn killed_shrink_keeps_the_snapshots() {
    let whole = |s| View {
        apply: true,
        ..snap_view(s, Rule::Unchanged)
    };
    let views = vec![view("snap.qcow2", Rule::Shrink), whole("s1"), whole("s2")];
    on_snapshots(
        "resize --shrink with snapshots",
        &["resize", "--shrink", "snap.qcow2", "12M"],
        views,
    );
}

#[test]
fn killed_snapshot_create_is_whole_or_not_at_all() {
    let views = vec![
        view("snap.qcow2", Rule::Unchanged),
        snap_view("s1", Rule::Unchanged),
        snap_view("s2", Rule::Unchanged),
        snap_view("s3", Rule::Whole),
    ];
    on_snapshots(
        "snapshot -c",
        &["snapshot", "-c", "s3", "snap.qcow2"],
        views,
    );
}

#[test]
fn killed_snapshot_apply_is_whole_or_not_at_all() {
    let views = vec![
        view("snap.qcow2", Rule::Whole),
        snap_view("s1", Rule::Unchanged),
        snap_view("s2", Rule::Unchanged),
    ];
    on_snapshots(
        "snapshot -a",
        &["snapshot", "-a", "s1", "snap.qcow2"],
        views,
    );
}

#[test]
fn killed_snapshot_delete_is_whole_or_not_at_all() {
    let views = vec![
        view("snap.qcow2", Rule::Unchanged),
        snap_view("s1", Rule::Whole),
        snap_view("s2", Rule::Unchanged),
    ];
    on_snapshots(
        "snapshot -d",
        &["snapshot", "-d", "s1", "snap.qcow2"],
        views,
    );
}

/// One write of the NBD writer; pattern 0 is a write of zeroes.
struct Write {
    off: u64,
    len: u64,
    pattern: u8,
}

impl Write {
    fn sectors(&self) -> std::ops::Range<usize> {
        (self.off as usize / SECTOR)..((self.off + self.len) as usize / SECTOR)
    }
}

/// `count` scattered writes over `size` bytes, one in eight of zeroes; the
/// patterns of 255 consecutive writes differ.
fn writer_script(rng: &mut Rng, count: usize, size: u64) -> Vec<Write> {
    (0..count)
        .map(|k| {
            let len = (1 + rng.below(256)) * 512;
            let off = rng.below((size - len) / 512 + 1) * 512;
            let pattern = if rng.below(8) == 0 {
                0
            } else {
                (k % 255 + 1) as u8
            };
            Write { off, len, pattern }
        })
        .collect()
}

/// `strata nbd serve` of top.qcow2 (and its chain) in `dir` on `sock`, once it
/// accepts connections.
fn serve(dir: &Path, sock: &Path) -> Child {
    let mut child = Command::new(STRATA)
        .args(["nbd", "serve", "-f", "qcow2", "-k"])
        .arg(sock)
        .arg("top.qcow2")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start strata nbd serve");
    let start = Instant::now();
    while UnixStream::connect(sock).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "strata nbd serve exited"
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "strata nbd serve never listened"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child
}

/// qemu-io writing `script` through `sock`, a flush after each write; its report
/// goes to `log`.
fn start_writer(sock: &Path, script: &[Write], log: &Path) -> Child {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for w in script {
        args.push("-c".into());
        args.push(match w.pattern {
            0 => format!("write -z {} {}", w.off, w.len),
            p => format!("write -P {p} {} {}", w.off, w.len),
        });
        args.push("-c".into());
        args.push("flush".into());
    }
    args.push(format!("nbd+unix:///?socket={}", sock.display()));
    // Line-buffered (coreutils' stdbuf), so the report follows the writes closely.
    Command::new("stdbuf")
        .arg("-oL")
        .arg("qemu-io")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("stdbuf and qemu-io must be installed")
}

/// How many writes qemu-io has reported so far.
fn reported(log: &Path) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().filter(|l| l.starts_with("wrote ")).count()
}

/// How many writes qemu-io saw acknowledged. qemu-io runs its commands in turn,
/// so every acknowledged write comes before the first failure.
fn acknowledged(log: &Path, ctx: &str) -> usize {
    let text = std::fs::read_to_string(log).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.contains(" ops; ")).collect();
    let acked = lines.iter().take_while(|l| l.starts_with("wrote ")).count();
    assert!(
        lines[acked..].iter().all(|l| l.contains("failed")),
        "{ctx}: unexpected qemu-io output: {:?}",
        &lines[acked..acked + 3.min(lines.len() - acked)]
    );
    acked
}

/// The image holds every write whose flush was acknowledged: write k's flush was,
/// when write k+1 was acknowledged. A sector written later may hold any later
/// write (the server may have carried it out and died before answering).
fn holds_flushed_writes(view: &[u8], initial: &[u8], script: &[Write], acked: usize, ctx: &str) {
    assert_eq!(view.len(), initial.len(), "{ctx}: the size changed");
    let flushed = acked.saturating_sub(1);
    let n = view.len() / SECTOR;
    let mut last: Vec<Option<u8>> = vec![None; n];
    for w in &script[..flushed] {
        for s in w.sectors() {
            last[s] = Some(w.pattern);
        }
    }
    let mut later: Vec<Vec<u8>> = vec![Vec::new(); n];
    for w in &script[flushed..] {
        for s in w.sectors() {
            later[s].push(w.pattern);
        }
    }
    for s in 0..n {
        let got = &view[s * SECTOR..][..SECTOR];
        let filled = |p: u8| got.iter().all(|&b| b == p);
        let durable = match last[s] {
            None => got == &initial[s * SECTOR..][..SECTOR],
            Some(p) => filled(p),
        };
        assert!(
            durable || later[s].iter().any(|&p| filled(p)),
            "{ctx}: sector {s} (byte {}) lost its last flushed write (pattern {:?}; \
             {flushed} writes flushed, later patterns {:?}); it holds {:?}...",
            s * SECTOR,
            last[s],
            later[s],
            &got[..8]
        );
    }
}

fn read_top(dir: &Path, scratch: &Path) -> Vec<u8> {
    read_raw(dir, &view("top.qcow2", Rule::Unchanged), scratch)
        .unwrap_or_else(|e| panic!("top.qcow2 cannot be read: {e}"))
}

#[test]
fn killed_nbd_server_keeps_every_flushed_write() {
    const WRITES: usize = 400;
    let t = tempfile::tempdir().unwrap();
    let pristine = t.path().join("pristine");
    std::fs::create_dir_all(&pristine).unwrap();
    chain(&pristine);
    let work = t.path().join("work");
    let scratch = t.path().join("view.raw");
    let sock = t.path().join("nbd.sock");
    let log = t.path().join("writer.log");
    let initial = read_top(&pristine, &scratch);
    let n = kills_per_op();
    let seed = seed("nbd serve");
    let mut rng = Rng(seed);

    // The uncut run: all writes acknowledged and kept; the server is killed after
    // the writer ends.
    fresh(&pristine, &work);
    let script = writer_script(&mut rng, WRITES, CHAIN_SIZE);
    let mut server = serve(&work, &sock);
    let start = Instant::now();
    let st = start_writer(&sock, &script, &log).wait().unwrap();
    let uncut = start.elapsed();
    assert!(st.success(), "qemu-io: {st:?}");
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(acknowledged(&log, "uncut"), WRITES);
    holds_flushed_writes(
        &read_top(&work, &scratch),
        &initial,
        &script,
        WRITES,
        "uncut",
    );

    // The writer's pace varies with the machine's load more than a single command's
    // does, so each kill lands at a fraction of its progress rather than of a time:
    // once qemu-io has reported that many writes, or it has ended.
    let (mut mid, mut leaks, mut flushed) = (0, 0, Vec::new());
    for (k, frac) in moments(&mut rng, n).into_iter().enumerate() {
        let target = (frac * WRITES as f64) as usize;
        let ctx = format!("nbd serve: kill {k} after {target} writes ({frac:.3}; seed {seed:#x})");
        fresh(&pristine, &work);
        let script = writer_script(&mut rng, WRITES, CHAIN_SIZE);
        let _ = std::fs::remove_file(&sock);
        let mut server = serve(&work, &sock);
        let mut writer = start_writer(&sock, &script, &log);
        while writer.try_wait().unwrap().is_none() && reported(&log) < target {
            std::thread::sleep(Duration::from_millis(1));
        }
        mid += usize::from(writer.try_wait().unwrap().is_none());
        server.kill().unwrap();
        assert_eq!(
            server.wait().unwrap().signal(),
            Some(libc::SIGKILL),
            "{ctx}: the server had exited"
        );
        writer.wait().unwrap();
        let acked = acknowledged(&log, &ctx);
        flushed.push(acked.saturating_sub(1));
        holds_flushed_writes(&read_top(&work, &scratch), &initial, &script, acked, &ctx);
        for f in ["base.qcow2", "mid.qcow2"] {
            assert_eq!(
                file_hash(&work.join(f)),
                file_hash(&pristine.join(f)),
                "{ctx}: {f} was written"
            );
        }
        let (code, text) = check(&work, "top.qcow2");
        assert!(
            code == 0 || code == 3,
            "{ctx}: qemu-img check top.qcow2 exits {code}: {text}"
        );
        leaks += usize::from(code == 3);
    }
    flushed.sort();
    println!(
        "kill loop nbd serve: {n} kills, {mid} while the writer ran, uncut writer {:.1} ms, \
         {leaks} checks with leaks; flushed writes at the kill: min {:?}, median {:?}, max {:?} of {WRITES}",
        uncut.as_secs_f64() * 1000.0,
        flushed.first(),
        flushed.get(n / 2),
        flushed.last()
    );
    assert!(mid > 0 || n < 4, "no kill landed while the writer ran");
}
