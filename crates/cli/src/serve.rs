//! `strata serve` (the HTTP API), `strata token` (its credentials) and
//! `strata image` (the image registry, on the local state directory).

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use strata_api::{Role, ServeOptions, Tokens};
use strata_registry::{ImageRecord, ListQuery, Registry};
use strata_vm::StateDir;

#[derive(clap::Args)]
pub struct ServeCli {
    /// Address to listen on (port 0 picks a free one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:9292")]
    listen: SocketAddr,
    /// State directory (default: $STRATA_STATE_DIR, else /var/lib/strata).
    #[arg(long = "state-dir", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// PEM certificate chain: serve HTTPS (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Refuse images larger than this many bytes (413).
    #[arg(long, value_name = "BYTES")]
    max_image_size: Option<u64>,
}

pub fn run_serve(c: ServeCli) -> i32 {
    let state = StateDir::resolve(c.state_dir);
    let opts = ServeOptions {
        listen: c.listen,
        state_dir: state.root().to_path_buf(),
        tls: c.tls_cert.zip(c.tls_key),
        max_image_size: c.max_image_size,
    };
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    let r = strata_api::serve(opts, |addr| {
        println!("strata serve: listening on {scheme}://{addr}");
        let _ = std::io::stdout().flush();
    });
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("strata serve: {e}");
            1
        }
    }
}

#[derive(clap::Args)]
pub struct TokenCli {
    #[arg(long = "state-dir", global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(clap::Subcommand)]
enum TokenCommand {
    /// Make a new API token and print it (it is stored only as a hash).
    Create {
        /// The token may only read.
        #[arg(long)]
        read_only: bool,
    },
    /// List the tokens (their public IDs and roles).
    List,
}

pub fn run_token(c: TokenCli) -> i32 {
    let state = StateDir::resolve(c.state_dir);
    let tokens = Tokens::new(state.root());
    let r: Result<()> = (|| {
        match c.command {
            TokenCommand::Create { read_only } => {
                let role = if read_only {
                    Role::ReadOnly
                } else {
                    Role::Admin
                };
                println!("{}", tokens.create(role)?);
            }
            TokenCommand::List => {
                for t in tokens.entries()? {
                    let role = if t.role == Role::Admin {
                        "admin"
                    } else {
                        "read-only"
                    };
                    println!("{}  {role}  {}", t.id, t.created_at);
                }
            }
        }
        Ok(())
    })();
    finish("token", r)
}

fn finish(what: &str, r: Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("strata {what}: {e:#}");
            1
        }
    }
}

#[derive(clap::Args)]
pub struct ImageCli {
    #[arg(long = "state-dir", global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// `json` for machine-readable output.
    #[arg(long, global = true, default_value = "human")]
    output: String,
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(clap::Subcommand)]
enum ImageCommand {
    /// List images (newest first).
    List {
        /// Only images with this name.
        #[arg(long)]
        name: Option<String>,
        /// Only images with this status.
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one image.
    Show { id: String },
    /// Write an image's data to FILE (verified against its sha512).
    Download {
        id: String,
        #[arg(long, short = 'f')]
        file: PathBuf,
    },
    /// Delete an image (refused when protected, or while disks cloned from
    /// it read it, unless --force: the clones keep its cached copy).
    Delete {
        id: String,
        #[arg(long)]
        force: bool,
    },
    /// Make an image of a VM's disk as it was at a snapshot (running or not).
    CreateFromSnapshot(crate::image_ops::FromSnapshotArgs),
    /// Make an image of a VM's disk as it is now, while the guest runs.
    CreateFromVm(crate::image_ops::FromVmArgs),
    /// Make an image from a local file: create, upload, checksum.
    CreateFromFile {
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// Disk format (qcow2, raw, ...).
        #[arg(long, default_value = "qcow2")]
        disk_format: String,
        #[arg(long, default_value = "bare")]
        container_format: String,
    },
}

pub fn run_image(c: ImageCli) -> i32 {
    let state = StateDir::resolve(c.state_dir);
    let json = match c.output.as_str() {
        "human" => false,
        "json" => true,
        other => {
            eprintln!("strata image: unknown output format '{other}' (human or json)");
            return 1;
        }
    };
    let r = (|| -> Result<()> {
        let reg = Registry::open(state.root()).context("open the image registry")?;
        image(&reg, c.command, json)
    })();
    finish("image", r)
}

fn show(rec: &ImageRecord, json: bool) -> Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&strata_api::images::image_json(rec))?
        );
        return Ok(());
    }
    for (k, v) in rec.to_json() {
        let v = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        };
        println!("{k:<18} {v}");
    }
    Ok(())
}

fn image(reg: &Registry, cmd: ImageCommand, json: bool) -> Result<()> {
    match cmd {
        ImageCommand::List { name, status } => {
            let mut pairs = vec![(
                "limit".to_string(),
                strata_registry::list::MAX_LIMIT.to_string(),
            )];
            pairs.extend(name.map(|n| ("name".to_string(), n)));
            pairs.extend(status.map(|s| ("status".to_string(), s)));
            let mut q = ListQuery::from_pairs(&pairs)?;
            let mut all = Vec::new();
            loop {
                let page = reg.list(&q)?;
                let more = page.more;
                q.marker = page.images.last().map(|r| r.id.clone());
                all.extend(page.images);
                if !more {
                    break;
                }
            }
            if json {
                let v: Vec<_> = all.iter().map(strata_api::images::image_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<36}  {:<8}  {:>12}  NAME", "ID", "STATUS", "SIZE");
                for r in &all {
                    let size = r.size.map(|s| s.to_string()).unwrap_or_default();
                    println!(
                        "{:<36}  {:<8}  {:>12}  {}",
                        r.id,
                        r.status.as_str(),
                        size,
                        r.name.as_deref().unwrap_or("")
                    );
                }
            }
        }
        ImageCommand::Show { id } => show(&reg.get(&id)?, json)?,
        ImageCommand::Download { id, file } => download(reg, &id, &file)?,
        ImageCommand::Delete { id, force: false } => reg.delete(&id)?,
        ImageCommand::Delete { id, force: true } => reg.delete_forced(&id)?,
        ImageCommand::CreateFromSnapshot(a) => {
            show(&crate::image_ops::from_snapshot(reg, a)?, json)?
        }
        ImageCommand::CreateFromVm(a) => show(&crate::image_ops::from_running(reg, a)?, json)?,
        ImageCommand::CreateFromFile {
            file,
            name,
            disk_format,
            container_format,
        } => {
            let mut body = serde_json::Map::new();
            body.insert("name".into(), name.into());
            body.insert("disk_format".into(), disk_format.into());
            body.insert("container_format".into(), container_format.into());
            let rec = reg.create(&body)?;
            let mut src =
                std::fs::File::open(&file).with_context(|| format!("open {}", file.display()))?;
            let mut up = reg.begin_upload(&rec.id, None)?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = src
                    .read(&mut buf)
                    .with_context(|| format!("read {}", file.display()))?;
                if n == 0 {
                    break;
                }
                up.write(&buf[..n])?;
            }
            let rec = up.finish()?;
            show(&rec, json)?;
        }
    }
    Ok(())
}

/// Download to a temporary file beside `file` and rename it into place only
/// when every byte arrived and matched the image's sha512.
fn download(reg: &Registry, id: &str, file: &Path) -> Result<()> {
    let (_, mut reader) = reg.download(id, None)?;
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.part-{}",
        file.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let r = (|| -> Result<()> {
        let mut out =
            std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        std::io::copy(&mut reader, &mut out).with_context(|| format!("download image {id}"))?;
        out.sync_all()?;
        std::fs::rename(&tmp, file).with_context(|| format!("rename to {}", file.display()))?;
        Ok(())
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    if r.is_ok() && !file.exists() {
        bail!("download of {id} did not produce {}", file.display());
    }
    r
}
