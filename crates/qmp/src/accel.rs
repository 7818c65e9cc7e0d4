//! Choosing QEMU's accelerator. `/dev/kvm` opening is not enough: on hosts that
//! are themselves VMs with a paravirtual nested hypervisor, it opens but a guest
//! hangs early. KVM counts as usable only when `/dev/kvm` opens read-write AND
//! the hardware module (`kvm_intel` or `kvm_amd`) is loaded. The environment
//! variable `STRATA_ACCEL` (`kvm` or `tcg`) overrides the detection.

use std::path::Path;

/// The environment variable that forces an accelerator.
pub const ACCEL_ENV: &str = "STRATA_ACCEL";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// QEMU's name for it (`-accel NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The accelerator to use, and why (worth telling a user who gets TCG).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// Pick the accelerator: `STRATA_ACCEL` if set, else KVM when usable, else TCG.
/// An `STRATA_ACCEL` value other than `kvm` or `tcg` is an error.
pub fn choose() -> Result<AccelChoice, String> {
    choose_with(
        std::env::var(ACCEL_ENV).ok().as_deref(),
        Path::new("/dev/kvm"),
        Path::new("/sys/module"),
    )
}

/// `choose` with its inputs given: the override value, the KVM device and the
/// directory listing loaded modules.
pub fn choose_with(
    forced: Option<&str>,
    kvm_dev: &Path,
    modules: &Path,
) -> Result<AccelChoice, String> {
    match forced {
        Some("kvm") => {
            return Ok(AccelChoice {
                accel: Accel::Kvm,
                reason: format!("{ACCEL_ENV}=kvm"),
            })
        }
        Some("tcg") => {
            return Ok(AccelChoice {
                accel: Accel::Tcg,
                reason: format!("{ACCEL_ENV}=tcg"),
            })
        }
        Some("") | None => {}
        Some(other) => {
            return Err(format!(
                "{ACCEL_ENV}={other:?} is not an accelerator (use kvm or tcg)"
            ))
        }
    }
    let tcg = |reason: String| AccelChoice {
        accel: Accel::Tcg,
        reason,
    };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm_dev)
    {
        return Ok(tcg(format!("{} cannot be opened ({e})", kvm_dev.display())));
    }
    match ["kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| modules.join(m).exists())
    {
        Some(m) => Ok(AccelChoice {
            accel: Accel::Kvm,
            reason: format!("{} opens and {m} is loaded", kvm_dev.display()),
        }),
        None => Ok(tcg(format!(
            "{} opens but neither kvm_intel nor kvm_amd is loaded (a nested, paravirtual KVM cannot boot guests)",
            kvm_dev.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_host(kvm: bool, module: Option<&str>) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        if kvm {
            std::fs::write(d.path().join("kvm"), b"").unwrap();
        }
        std::fs::create_dir(d.path().join("modules")).unwrap();
        std::fs::create_dir(d.path().join("modules/kvm")).unwrap();
        if let Some(m) = module {
            std::fs::create_dir(d.path().join("modules").join(m)).unwrap();
        }
        d
    }

    fn pick(forced: Option<&str>, host: &tempfile::TempDir) -> Result<AccelChoice, String> {
        choose_with(
            forced,
            &host.path().join("kvm"),
            &host.path().join("modules"),
        )
    }

    #[test]
    fn kvm_needs_the_device_and_a_hardware_module() {
        assert_eq!(
            pick(None, &fake_host(true, Some("kvm_intel")))
                .unwrap()
                .accel,
            Accel::Kvm
        );
        assert_eq!(
            pick(None, &fake_host(true, Some("kvm_amd"))).unwrap().accel,
            Accel::Kvm
        );
        // The device opens but only a paravirtual module is loaded: TCG.
        let c = pick(None, &fake_host(true, Some("kvm_pvm"))).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("kvm_intel"), "{}", c.reason);
        // A module without the device: TCG.
        assert_eq!(
            pick(None, &fake_host(false, Some("kvm_intel")))
                .unwrap()
                .accel,
            Accel::Tcg
        );
    }

    #[test]
    fn the_environment_override_wins_and_bad_values_are_refused() {
        let host = fake_host(false, None);
        assert_eq!(pick(Some("kvm"), &host).unwrap().accel, Accel::Kvm);
        assert_eq!(
            pick(Some("tcg"), &fake_host(true, Some("kvm_intel")))
                .unwrap()
                .accel,
            Accel::Tcg
        );
        assert_eq!(pick(Some(""), &host).unwrap().accel, Accel::Tcg);
        let e = pick(Some("xen"), &host).unwrap_err();
        assert!(e.contains("STRATA_ACCEL") && e.contains("xen"), "{e}");
    }
}
