//! The backup repository a `strata serve` keeps its images in
//! (`--image-store`): a directory, or a bucket of a real Garage cluster
//! started for the test. Every command run on it (`strata backup`, restic,
//! the server itself) gets the store's credentials.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::api::Server;
use super::garage::Garage;
use super::restic::{reads_clean, restic, run, s, snapshots_json, strata, PASSWORD};

/// Which kind of repository holds the images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory (`--image-store repo:PATH`).
    Dir,
    /// A bucket of a one-node Garage cluster (`--image-store s3:URL`).
    S3,
}

/// A repository made with `strata backup init`, and its password in a file.
pub struct ImageRepo {
    pub kind: Kind,
    /// As `--repo` takes it: a path or `s3:http://...`.
    pub location: String,
    pub password_file: PathBuf,
    /// The cluster behind an S3 repository (stopped when this is dropped).
    garage: Option<Garage>,
}

impl ImageRepo {
    /// A new repository of `kind`, its password file in `dir` (and a
    /// directory repository at `dir/repo`).
    pub fn init(kind: Kind, dir: &Path) -> ImageRepo {
        let (location, garage) = match kind {
            Kind::Dir => (s(&dir.join("repo")).to_string(), None),
            Kind::S3 => {
                let g = Garage::start(1);
                (g.repo(0, "images"), Some(g))
            }
        };
        let password_file = dir.join("repo-password");
        std::fs::write(&password_file, PASSWORD).unwrap();
        let repo = ImageRepo {
            kind,
            location,
            password_file,
            garage,
        };
        run(repo.backup(&["init"]));
        repo
    }

    /// `cmd` with the store's credentials (none for a directory).
    pub fn env(&self, mut cmd: Command) -> Command {
        if let Some(g) = &self.garage {
            g.credentials(&mut cmd);
        }
        cmd
    }

    /// `strata backup SUB --repo LOCATION ARGS...`.
    pub fn backup(&self, args: &[&str]) -> Command {
        let (sub, rest) = args.split_first().expect("a backup subcommand");
        let mut a = vec![*sub, "--repo", &self.location];
        a.extend_from_slice(rest);
        self.env(strata(&a))
    }

    /// `restic -r LOCATION ARGS...`.
    pub fn restic(&self, args: &[&str]) -> Command {
        self.env(restic(&self.location, args))
    }

    /// What `strata serve --image-store` takes for this repository.
    pub fn store_arg(&self) -> String {
        match self.kind {
            Kind::Dir => format!("repo:{}", self.location),
            Kind::S3 => self.location.clone(),
        }
    }

    /// `strata serve` on `state` with its images in this repository.
    pub fn serve(&self, state: &Path) -> Server {
        let store = self.store_arg();
        let args = [
            "--image-store",
            &store,
            "--password-file",
            s(&self.password_file),
        ];
        Server::start_with(state, &args, |c| {
            if let Some(g) = &self.garage {
                g.credentials(c);
            }
        })
    }

    /// The IDs of the snapshots restic lists tagged as image `id`'s.
    pub fn image_snapshots(&self, id: &str) -> Vec<String> {
        let tag = format!("image-id={id}");
        snapshots_json(&run(self.restic(&["snapshots", "--json"])))
            .iter()
            .filter(|v| {
                let tags = v["tags"].as_array().cloned().unwrap_or_default();
                tags.iter().any(|t| t == "strata-image") && tags.iter().any(|t| *t == *tag)
            })
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// `restic check --read-data` and `strata backup verify` find no error.
    pub fn check(&self) {
        reads_clean(self.restic(&["check", "--read-data"]));
        reads_clean(self.backup(&["verify"]));
    }
}
